"""Flax/JAX decoder LMs loading HF and GGUF checkpoints."""
