"""Heads on cached embeddings, fine-tuning, the model folder, predict and explain."""
