"""Frozen-backbone embeddings and classical features, cached per settings and image set."""
