"""Compression: k-means palettization with per-group LUTs, mixed-bit allocation, 8-bit embeddings."""
