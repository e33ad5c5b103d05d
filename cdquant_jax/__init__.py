"""cdquant_jax: post-training weight quantization of LLMs in JAX (GPTQ, CDQuant, SpQR)."""

__version__ = "0.1.0"
