"""Calibration / evaluation data: the GPTQ protocol, local files, a bundled corpus.

Public API:
  calibration_windows(source, tokenizer, *, nsamples, seqlen, seed, path) -> [nsamples, seqlen] int32
  evaluation_ids(source, tokenizer, *, seqlen, path) -> [1, N] int32
  token_hash(ids) -> sha256 hex string
  as_encoder(tokenizer, *, add_special_tokens) -> Encoder
"""

from cdquant_jax.data.sources import CALIBRATION_SOURCES
from cdquant_jax.data.sources import EVALUATION_SOURCES
from cdquant_jax.data.sources import calibration_windows
from cdquant_jax.data.sources import evaluation_ids
from cdquant_jax.data.tokenize import Encoder
from cdquant_jax.data.tokenize import as_encoder
from cdquant_jax.data.tokenize import token_hash

__all__ = [
    "CALIBRATION_SOURCES", "EVALUATION_SOURCES", "Encoder", "as_encoder", "calibration_windows",
    "evaluation_ids", "token_hash",
]
