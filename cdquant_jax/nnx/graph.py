"""Paths into an NNX module graph: finding blocks and linears, swapping modules in place.

A path is the tuple of attribute names and list indices `nnx.iter_graph` yields, e.g.
("layers", 3, "attn", "q_proj"); its dotted name is "layers.3.attn.q_proj" (the module name
the pipeline's include/exclude/rules regexes are matched against).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Sequence

from flax import nnx

from cdquant_jax.nnx.qlinear import SUPPORTED, is_quantized

Path = tuple[Any, ...]
BlocksSpec = str | Callable[[nnx.Module], Sequence[nnx.Module]]


def dotted(path: Path) -> str:
  return ".".join(str(k) for k in path)


def get_node(root: Any, path: Path) -> Any:
  """The node of the graph at `path` (attributes by name, list items by index)."""
  for key in path:
    root = root[key] if isinstance(key, int) else getattr(root, key)
  return root


def set_node(root: Any, path: Path, value: Any) -> None:
  """Replaces the node at `path` (a non-empty path) in place."""
  parent, key = get_node(root, path[:-1]), path[-1]
  if isinstance(key, int):
    parent[key] = value
  else:
    setattr(parent, key, value)


def modules(root: nnx.Module) -> list[tuple[Path, nnx.Module]]:
  """(path, module) of every module of the graph (each shared module once), in path order
  (list items by index, so layers.10 comes after layers.9)."""
  found = [(tuple(p), m) for p, m in nnx.iter_graph(root) if isinstance(m, nnx.Module)]
  return sorted(found, key=lambda item: tuple((isinstance(k, str), k) for k in item[0]))


def _matches(pattern: str, path: Path) -> bool:
  """Segment-wise glob: "layers.*" matches ("layers", 3), not ("layers", 3, "attn")."""
  parts = pattern.split(".")
  return len(parts) == len(path) and all(fnmatch.fnmatchcase(str(k), p)
                                         for k, p in zip(path, parts))


def find_blocks(model: nnx.Module, blocks: BlocksSpec) -> list[tuple[Path, nnx.Module]]:
  """(path, block) of the blocks in model order.

  blocks: a dotted glob over module paths ("layers.*", "model.blocks.*") or a callable
    model -> [blocks] (their paths are looked up by identity, order kept).
  Raises ValueError (one line) when nothing matches or a returned block is not in the graph.
  """
  every = modules(model)
  if callable(blocks):
    by_id = {id(m): p for p, m in every}
    chosen = list(blocks(model))
    missing = [type(b).__name__ for b in chosen if id(b) not in by_id]
    if missing:
      raise ValueError(f"quantize_nnx: blocks callable returned modules not in the model "
                       f"graph: {missing}")
    found = [(by_id[id(b)], b) for b in chosen]
    where = getattr(blocks, "__name__", "callable")
  else:
    found = [(p, m) for p, m in every if p and _matches(blocks, p)]
    where = f"pattern {blocks!r}"
  if not found:
    raise ValueError(f"quantize_nnx: no blocks match {where} (module paths: "
                     f"{', '.join(dotted(p) for p, _ in every[:8] if p)}"
                     f"{', ...' if len(every) > 9 else ''})")
  return found


def find_linears(block: nnx.Module) -> list[Path]:
  """Paths (relative to the block) of its supported, not yet quantized linears."""
  return [p for p, m in modules(block)
          if p and isinstance(m, SUPPORTED) and not is_quantized(m)]
