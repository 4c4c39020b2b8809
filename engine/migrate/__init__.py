"""Migration workflow: move an alias to a new embedding model in gated, resumable phases."""
