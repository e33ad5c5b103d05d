"""`cdquant generate --model DIR --prompt TEXT`: greedy generation from a quantized model.

DIR is a quantized model directory (pipeline/export.py: model.json, params.safetensors,
quantized.safetensors, tokenizer.json). Every quantized linear keeps its packed
QuantizedWeight and runs through `kernels.packed_matmul` (models.layers.linear dispatches on
it); generation uses the model's KV cache (CausalLM.generate: one prefill, then one cached
decode step per token, B = 1 rows through the kernel). `--implementation` picks the kernel,
passed to the model as its `LinearOptions` ("auto": the Pallas kernel on a GPU, the reference
elsewhere; "pallas_triton" on CPU runs the Pallas interpreter, slowly); `--dense` dequantizes every weight first (the comparison run).
Bad input exits with code 2 and one line naming the flag or file (cli/errors.py).
"""

from __future__ import annotations

import argparse
import time

from cdquant_jax.cli import errors
from cdquant_jax.kernels.packed_matmul import IMPLEMENTATIONS, select_implementation
from cdquant_jax.models.errors import ModelLoadError
from cdquant_jax.models.layers import LinearOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True, help="quantized model directory")
  p.add_argument("--prompt", required=True)
  p.add_argument("--max-new-tokens", type=int, default=32)
  p.add_argument("--implementation", default="auto",
                 choices=("auto",) + tuple(sorted(IMPLEMENTATIONS)),
                 help="packed_matmul implementation (default: auto)")
  p.add_argument("--dense", action="store_true",
                 help="dequantize the weights and run the plain dense model instead")


def generate_text(directory: str, prompt: str, max_new_tokens: int, *, dense: bool = False,
                  implementation: str = "auto") -> str:
  """The greedy continuation of `prompt` by the quantized model in `directory`, its packed
  linears run by the packed_matmul `implementation`."""
  from cdquant_jax.pipeline import export  # pylint: disable=import-outside-toplevel
  with errors.loading(directory):
    model, params, tokenizer = export.load_quantized_model(directory)
  if tokenizer is None:
    raise ModelLoadError(f"{directory}: no tokenizer.json, cannot encode a text prompt")
  errors.require(len(tokenizer.encode(prompt).ids) >= 1,
                 f"--prompt {prompt!r} encodes to no tokens")
  if dense:
    params = export.dense_params(params)
  model = model.with_linear_options(LinearOptions(implementation=implementation))
  return model.generate(params, prompt, max_new_tokens, tokenizer=tokenizer)


def run(args: argparse.Namespace) -> int:
  errors.require(args.max_new_tokens >= 1,
                 f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  errors.require(args.prompt != "", "--prompt is empty")
  try:
    _, _, why = select_implementation(args.implementation)
  except ValueError as e:  # the named kernel cannot run here
    raise errors.UsageError(f"--implementation {args.implementation}: {e}") from e
  start = time.perf_counter()
  text = generate_text(args.model, args.prompt, args.max_new_tokens, dense=args.dense,
                       implementation=args.implementation)
  seconds = time.perf_counter() - start
  print(text)
  print(f"[{args.max_new_tokens} new tokens in {seconds:.2f} s incl. compilation; "
        f"kernel: {'dense (dequantized)' if args.dense else why}]")
  return 0
