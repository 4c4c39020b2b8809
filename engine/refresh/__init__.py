"""Refresh workflow: re-embed only what changed in a new corpus snapshot and publish a new version."""
