"""Vector search over embeddings (FAISS)."""
