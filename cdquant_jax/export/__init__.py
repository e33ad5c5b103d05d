"""Export a quantized run directory to the formats serving stacks load.

    from cdquant_jax.export import export_model
    export_model("runs/smollm2/gptq_w4", "gptq", "out/gptq")      # or "compressed-tensors", "gguf"

One consumer format per module: `gptq` (GPTQ v1 checkpoint: transformers / GPTQModel / vLLM),
`compressed_tensors` (pack-quantized: llm-compressor's output, vLLM / transformers), `gguf`
(llama.cpp). Each module says in its docstring what its layout is and what it cannot hold; a
run with such a module raises `ExportError` naming the module, the reason and the formats that
can hold it, before anything is written.
"""

from __future__ import annotations

from cdquant_jax.export import common, compressed_tensors, gguf, gptq
from cdquant_jax.export.common import ExportError, ExportOptions

FORMATS = {gptq.NAME: gptq, compressed_tensors.NAME: compressed_tensors, gguf.NAME: gguf}

__all__ = ["FORMATS", "ExportError", "ExportOptions", "export_model", "check_exportable"]


def check_exportable(grids: dict[str, common.LinearGrid], fmt: str,
                     options: ExportOptions) -> None:
  """Raises ExportError for the first module `fmt` cannot hold (naming the formats that can)."""
  writer = FORMATS[fmt]
  for name, g in grids.items():
    reason = writer.why_not(g, options)
    if reason is None or (fmt == gguf.NAME and options.gguf_dense_fallback):
      continue
    others = [other for other, module in FORMATS.items()
              if other != fmt and module.why_not(g, options) is None]
    if fmt == gguf.NAME:
      others.append("gguf with gguf_dense_fallback / --gguf-dense (dequantized F32)")
    raise common.refusal(name, fmt, reason, others)


def export_model(run_dir: "str | common.Run", fmt: str, output: str,
                 options: ExportOptions = ExportOptions()) -> dict:
  """Writes the run directory `run_dir` (a path, or a `common.Run` already read) as format
  `fmt` into `output`; returns a summary (format, modules, and the format's quantization
  config or tensor types).

  Raises:
    ExportError: a module or the model that `fmt` cannot hold (nothing is written then), or an
      unknown format.
  """
  if fmt not in FORMATS:
    raise ExportError(f"unknown export format {fmt!r} (formats: {', '.join(FORMATS)})")
  run = common.load_run(run_dir) if isinstance(run_dir, str) else run_dir
  grids = common.decode_all(run)
  if not grids:
    raise ExportError(f"{run.directory}: the run has no quantized linear")
  check_exportable(grids, fmt, options)
  details = FORMATS[fmt].write(run, grids, output, options)
  return {"format": fmt, "output": output, "modules": len(grids), "details": details}
