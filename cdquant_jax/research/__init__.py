"""Research workflow: sweeps over run configs, their results store, layer-problem banks.

  sweep.py   the sweep schema (YAML) and its expansion into points (resolved configs, hashes)
  runner.py  running a sweep's points (in order or in worker processes), resuming, recording
  store.py   SWEEP_DIR/results.jsonl: append-only rows, one per finished or failed point
  cache.py   the content-addressed cache of token ids shared by a sweep's points
  bank.py    layer-problem banks: every linear's (W, H) on the full-precision model
The reporting modules (results, tables, plots, report, paper) read the rows of store.py.
"""
