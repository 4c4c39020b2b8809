"""Training data without labels: synthetic queries for an embed run's chunks from an OpenAI-compatible endpoint."""
