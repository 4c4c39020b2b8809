"""Thin Ray drivers, one per job; the only place that decides how work is spread."""
