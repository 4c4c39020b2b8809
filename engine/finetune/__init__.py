"""Fine-tuning workflow: train an embedding model on mined triplets and benchmark it before and after."""
