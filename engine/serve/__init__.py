"""Serving: the alias searcher that hot-swaps versions (alias), its HTTP API (app, server, metrics, batching), and the Ray Serve application (ray_app, config)."""
