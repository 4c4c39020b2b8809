"""Index versions: parameter choice, build steps, shards, recall gate, searcher, version verification."""
