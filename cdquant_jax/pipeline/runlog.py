"""The per-linear JSONL log of a run and its progress bar.

One record per quantized linear (keys): module, layer, shape [d_out, d_in], method, objective
(tr((W − Q) H (W − Q)ᵀ) on the undamped H), energy (tr(W H Wᵀ)), relative_objective
(objective / energy), outlier_share, percdamp and damp (the damping the solver used, after any
escalation), escalations, bits_formula and bits_stored (both bit counts of the packed weight),
lossy_outliers (SpQR outliers rounded to float16 on packing), seconds (solve + pack), nsamples.
Records live in memory and are written atomically as a whole file after every block, so the
log always matches the last checkpoint.
"""

from __future__ import annotations

import json
import os

from cdquant_jax import io_utils
from cdquant_jax.solvers.diagnostics import Diagnostics

LOG_FILE = "log.jsonl"


def damping(diagnostics: Diagnostics) -> dict[str, float | None]:
  """The damping fields of a SolveResult's diagnostics (None when the solver used none)."""
  d = diagnostics.damping
  if d is None:
    return dict(percdamp=None, damp=None, escalations=None)
  return dict(percdamp=float(d.percdamp), damp=float(d.damp), escalations=int(d.escalations))


def write_log(directory: str, records: list[dict]) -> None:
  text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
  io_utils.atomic_write_text(os.path.join(directory, LOG_FILE), text)


def read_log(directory: str) -> list[dict]:
  path = os.path.join(directory, LOG_FILE)
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A tqdm bar over blocks (no-op when disabled)."""

  def __init__(self, total: int, initial: int, enabled: bool, desc: str = "quantize"):
    self.bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self.bar = tqdm(total=total, initial=initial, desc=desc, unit="block")

  def status(self, text: str) -> None:
    if self.bar is not None:
      self.bar.set_postfix_str(text, refresh=True)

  def advance(self) -> None:
    if self.bar is not None:
      self.bar.update(1)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
