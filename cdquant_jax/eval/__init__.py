"""Evaluation: GPTQ-protocol perplexity and an lm-evaluation-harness adapter."""

from cdquant_jax.eval.lm_eval_adapter import JaxLM
from cdquant_jax.eval.perplexity import perplexity

__all__ = ["JaxLM", "perplexity"]
