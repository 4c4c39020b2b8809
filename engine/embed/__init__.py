"""The data path: corpus reading and validation, normalisation, chunking, tokenizers, encoders, unit stages, plan."""
