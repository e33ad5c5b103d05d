"""Paths into parameter trees (nested dicts, with a list of per-block dicts under "layers").

A path is a tuple of keys, e.g. ("layers", 3, "self_attn", "q_proj", "weight"); its dotted
name is "layers.3.self_attn.q_proj.weight" (the safetensors key of run directories).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

Params = dict[str, Any]
Path = tuple[Any, ...]


def get_path(tree: Any, path: Path) -> Any:
  """The node of `tree` at `path`."""
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: Any, path: Path, value: Any) -> Any:
  """A copy of `tree` with `path` set to `value`; the input and its other nodes are shared."""
  if not path:
    return value
  head, rest = path[0], path[1:]
  if isinstance(tree, list):
    return tree[:head] + [set_path(tree[head], rest, value)] + tree[head + 1:]
  return {**tree, head: set_path(tree[head], rest, value)}


def insert_path(tree: dict, path: Path, value: Any) -> None:
  """Assigns `value` at `path` in place, creating nodes on the way: a list before an int key
  (the per-block list under "layers", filled with empty dicts), a dict otherwise."""
  node = tree
  for key, nxt in zip(path[:-1], path[1:]):
    if isinstance(key, int):
      while len(node) <= key:
        node.append({})
      node = node[key]
    else:
      node = node.setdefault(key, [] if isinstance(nxt, int) else {})
  node[path[-1]] = value


def flat_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[Path, Any]:
  """{path: leaf} over the leaves of `tree`, in tree order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): leaf
          for path, leaf in leaves}


def dotted(path: Path) -> str:
  """("layers", 0, "mlp") -> "layers.0.mlp"."""
  return ".".join(str(k) for k in path)
