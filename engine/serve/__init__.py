"""Serving: the alias searcher that hot-swaps versions, and its HTTP API."""
