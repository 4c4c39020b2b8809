"""embedctl: distributed batch embedding and indexing engine (library)."""

__version__ = "0.1.0"
