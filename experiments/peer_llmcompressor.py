"""The llm-compressor side of `bench_pipeline.py --peer llm-compressor` (benchmark only).

Runs in its own virtual environment, `.venv-peer` (`make peer-venv`, pinned by
requirements-peer.lock): torch, llmcompressor and their dependencies are never dependencies of
cdquant_jax, and this script imports nothing from it. It reads what our side wrote into
--workdir and writes its results there:

  calibration.npy  int32 [N, T]  calibration windows (our `data.calibration_windows`);
  evaluation.npy   int32 [W, S]  evaluation windows (our `perplexity.split_windows`);
  peer.json        written here: settings, versions, token hashes of both arrays (the scheme
                   of `cdquant_jax.data.token_hash`), phase seconds, peak RSS, perplexities.

Steps, each timed: load the GGUF into transformers (dequantized to float32, the weights our
loader uses), the unquantized perplexity, `oneshot` with a `GPTQModifier` whose one config group
holds our grid (bits, group size, sym), then the perplexity of the fake-quantized model. The
perplexity is the GPTQ protocol of `cdquant_jax/eval/perplexity.py`: per window the summed
next-token NLL of float32 log-softmax, summed in float64 over windows, ppl = exp(nll / (W·(S-1))).

    .venv-peer/bin/python experiments/peer_llmcompressor.py --workdir DIR --gguf FILE.gguf
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import sys
import time


def token_hash(array) -> str:
  """sha256 of `shape=d0,d1;` then the C-order int32 little-endian values (our scheme)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  digest = hashlib.sha256()
  digest.update(b"shape=" + ",".join(str(d) for d in array.shape).encode() + b";")
  digest.update(np.ascontiguousarray(array, dtype="<i4").tobytes())
  return digest.hexdigest()


INPUTS = ("calibration.npy", "evaluation.npy")


def read_inputs(workdir: str):
  """(calibration ids [N, T], evaluation windows [W, S]), int32, as our side wrote them."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  arrays = tuple(np.load(os.path.join(workdir, name)) for name in INPUTS)
  for name, array in zip(INPUTS, arrays):
    if array.dtype != np.int32 or array.ndim != 2:
      raise ValueError(f"{name}: expected int32 [rows, tokens], got {array.dtype} {array.shape}")
  return arrays


def peak_rss_mib() -> float:
  """Peak resident set of this process (Linux ru_maxrss is in KiB), MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
  """User + system CPU seconds of this process so far (all its threads)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def load_model(gguf: str, config_dir: str):
  """(model, tokenizer): SmolLM2 from the GGUF file through transformers, float32, eval mode.

  oneshot needs the tokenizer as its processor, although the calibration data is tokenized, and
  re-reads config.json from `model.config.name_or_path`, which a GGUF directory does not have:
  the loaded model's own config is written to `config_dir` and named there, without the
  `quantization_config` {quant_method: gguf} that transformers leaves on it (the weights are
  plain float32 tensors after its load; oneshot refuses a model whose config names another
  quantization method).
  """
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import AutoModelForCausalLM, AutoTokenizer  # pylint: disable=import-outside-toplevel
  where, name = os.path.dirname(gguf), os.path.basename(gguf)
  model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
  if any(p.dtype != torch.float32 for p in model.parameters()):
    raise TypeError("transformers did not dequantize the GGUF to float32")
  del model.config.quantization_config
  model.config.save_pretrained(config_dir)
  model.config.name_or_path = config_dir
  return model.eval(), AutoTokenizer.from_pretrained(where, gguf_file=name)


def window_nll(logits, ids):
  """[B] float64 summed next-token NLL per window.

  Args:
    logits: [B, T, V] float.
    ids: [B, T] int64.
  """
  import torch  # pylint: disable=import-outside-toplevel
  shifted = logits[:, :-1].float()
  # [B, T-1, V] -> [B, T-1]: log normaliser minus the target's logit, as `window_nll` does.
  log_normaliser = torch.logsumexp(shifted, dim=-1)
  target_logit = torch.gather(shifted, -1, ids[:, 1:, None])[..., 0]
  return (log_normaliser - target_logit).sum(dim=-1).double()


def perplexity(model, windows, batch_size: int) -> dict:
  """GPTQ-protocol perplexity of `model` on windows [W, S] (batches of `batch_size`)."""
  import torch  # pylint: disable=import-outside-toplevel
  nll_sum = 0.0
  with torch.no_grad():
    for start in range(0, windows.shape[0], batch_size):
      ids = torch.from_numpy(windows[start:start + batch_size]).long()
      logits = model(input_ids=ids, use_cache=False).logits
      nll_sum += float(window_nll(logits, ids).sum())
  n_tokens = windows.shape[0] * (windows.shape[1] - 1)
  return dict(ppl=math.exp(nll_sum / n_tokens), nll_sum=nll_sum, n_tokens=n_tokens,
              n_windows=int(windows.shape[0]))


def gptq_recipe(args):
  """GPTQModifier on every decoder Linear (lm_head ignored) with our grid and sweep settings."""
  from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # pylint: disable=import-outside-toplevel
  from llmcompressor.modifiers.gptq import GPTQModifier  # pylint: disable=import-outside-toplevel
  weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.sym, strategy="group",
                             group_size=args.group_size, observer="minmax")
  scheme = QuantizationScheme(targets=["Linear"], weights=weights)
  return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                      block_size=args.blocksize, dampening_frac=args.percdamp, actorder=None)


def calibration_dataset(ids):
  """datasets.Dataset of pre-tokenized windows [N, T] (llm-compressor skips tokenization)."""
  import datasets  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  return datasets.Dataset.from_dict(dict(input_ids=ids.tolist(),
                                         attention_mask=np.ones_like(ids).tolist()))


def quantize(model, tokenizer, ids, args) -> None:
  """llm-compressor's oneshot GPTQ in place on `model` (fake-quantized weights afterwards)."""
  from llmcompressor import oneshot  # pylint: disable=import-outside-toplevel
  oneshot(model=model, tokenizer=tokenizer, dataset=calibration_dataset(ids), recipe=gptq_recipe(args),
          num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
          batch_size=args.calib_batch_size, shuffle_calibration_samples=False,
          pipeline=args.pipeline, log_dir=None)


def versions() -> dict:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  return {name: metadata.version(name) for name in
          ("torch", "llmcompressor", "compressed-tensors", "transformers", "accelerate", "datasets",
           "numpy", "gguf")}


def run(args) -> dict:
  """The timed steps; the results dict of peer.json."""
  start = time.perf_counter()
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  calib, windows = read_inputs(args.workdir)
  timing = {}
  mark = start

  def phase(name):
    nonlocal mark
    now = time.perf_counter()
    timing[name] = round(now - mark, 3)
    mark = now

  phase("import_seconds")  # with reading the .npy inputs
  model, tokenizer = load_model(args.gguf, os.path.join(args.workdir, "peer_hf_config"))
  if args.smoke_layers:
    model.model.layers = model.model.layers[:args.smoke_layers]
    model.config.num_hidden_layers = args.smoke_layers
  phase("load_seconds")
  baseline = perplexity(model, windows, args.batch_size)
  phase("baseline_eval_seconds")
  quantize(model, tokenizer, calib, args)
  phase("quantize_seconds")
  quantized = perplexity(model, windows, args.batch_size)
  phase("eval_seconds")
  timing["total_seconds"] = round(time.perf_counter() - start, 3)
  return dict(settings=dict(bits=args.bits, group_size=args.group_size, sym=args.sym,
                            percdamp=args.percdamp, blocksize=args.blocksize, actorder=None,
                            pipeline=args.pipeline, calib_batch_size=args.calib_batch_size,
                            eval_batch_size=args.batch_size, threads=torch.get_num_threads(),
                            smoke_layers=args.smoke_layers),
              calibration_hash=token_hash(calib), evaluation_hash=token_hash(windows),
              calibration_shape=list(calib.shape), evaluation_shape=list(windows.shape),
              timing=timing, peak_rss_mib=round(peak_rss_mib(), 1),
              cpu_seconds=round(cpu_seconds(), 1), baseline=baseline,
              quantized=quantized, versions=versions())


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="calibration.npy, evaluation.npy in; peer.json out")
  p.add_argument("--gguf", required=True, help="the SmolLM2 GGUF file our side loads")
  p.add_argument("--bits", type=int, default=3)
  p.add_argument("--group-size", type=int, default=64)
  p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
  p.add_argument("--percdamp", type=float, default=0.01, help="relative damping (mean diag H)")
  p.add_argument("--blocksize", type=int, default=128)
  p.add_argument("--calib-batch-size", type=int, default=8, help="calibration windows per forward")
  p.add_argument("--batch-size", type=int, default=4, help="evaluation windows per forward")
  p.add_argument("--pipeline", default="sequential", help="llm-compressor calibration pipeline")
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--smoke-layers", type=int, default=0,
                 help="keep only the first decoder layers (a quick check of this script; "
                 "the benchmark never sets it)")
  args = p.parse_args()
  results = run(args)
  with open(os.path.join(args.workdir, "peer.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(json.dumps(results), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
