"""`QuantizedWeight`: the one packed container of every method, and its reference dequantizer.

`dequantize(qw)` (pure jnp) is THE specification the Pallas kernels are tested against, and
`dequantize(pack_result(result)) == result.Q` bit for bit in f32 (`pack_result` checks it).

Layout (transposed for y = x @ Wᵀ; N = d_out output channels, K = d_in input features)
-------------------------------------------------------------------------------------
Storage order. Row k of every K-indexed array is input feature perm[k]; `perm` is the stable
argsort of the grid's group index, so each first-level group is a contiguous run of G = d_in /
n_groups rows: group(k) = k // G (per-channel: G = d_in, one group). When that order is the
identity (no act-order, static groups, per-channel) `perm` is None (meta.has_perm False). K is
padded to k_pad = the next multiple of 32 with zero codes; padded x columns must be zero.

  field             dtype / shape                         meaning
  ----------------  ------------------------------------  ------------------------------------
  codes             uint32, packed C[k, n] ∈ [0, 2^bits)  `packing.py`: bits 2, 4 (and 1, 8):
                    [k_pad·bits/32, N]  or                flat, value j of word i is
                    [bits, k_pad/32, N] (3, 5, 6, 7 bits) C[(32/bits)·i + j, n] at bit j·bits;
                                                          3 bits: three word planes, chunk c
                                                          (k = 32c..32c+31) is one 96-bit little-
                                                          endian stream over planes 0, 1, 2
                                                          (values 10 and 21 straddle two words).
  scale, zero       first-level statistics, rows = n_groups_pad = ceil(k_pad / G) (rows past
                    n_groups are padding: scale = zero = 0); one of three formats (meta.*_format):
                      "f16" / "f32": float [n_groups_pad, N] (f16 iff every value is exactly
                                     representable, so the round trip is exact);
                      "qq" (SpQR second level): uint32 codes of bits meta.qq_{scale,zero}_bits,
                                     packed like `codes` along the group axis, logical
                                     [padded_rows(n_groups_pad), N];
  {scale,zero}_qq_{scale,zero}
                    float16 (meta.qq_dtype "f16"; "f32" only when a solver kept non-f16 second-
                    level stats) [n_groups_pad, N / qq_groupsize], only for "qq" stats: second-
                    level scale and zero of the output channels n in [qq·m, qq·m + qq), group g.
  perm              int32 [d_in] or None (see above).
  outlier_row_offsets int32 [N + 1]   CSR over output channels n (None when nnz = 0);
  outlier_col_idx   int32 [nnz]       input features in ORIGINAL order (use the un-permuted x);
  outlier_values    float16 [nnz]     ADDITIVE corrections: W = dense + S.

Dequantization (all f32; this exact order of operations is what makes the round trip exact):
  "qq" stat[g, n] = f32(qq_scale[g, n // qq]) · (code[g, n] − f32(qq_zero[g, n // qq])),
                    rounded to f32 before it is used below (the solver's grid.scale / grid.zero)
  dense[k, n]     = scale[k // G, n] · (C[k, n] − zero[k // G, n])        (k < d_in)
  W[n, perm[k]]   = dense[k, n];   then  W[n, col] += f32(value) for each outlier of row n.
Both flavours dequantize as s · (q − z) (zeros in code units; GPTQ zeros are integers).
Every multiply and subtract is rounded on its own. A compiled program that computes a "qq" zero
and the dense weight together may fuse q − z2s · (c − z2z) into one multiply-add (XLA:CPU always
allows FMA fusion), which skips the rounding of z and can be one ulp off. `dequantize` therefore
runs two compiled programs, the statistics (`first_level_stats`) and then the weight from them;
traced inside a larger jit it is one program again and exact only up to that fusion.
A kernel computes y[b, n] = Σ_k x[b, perm[k]] · dense[k, n] + Σ_j x[b, col_j] · value_j.
3-bit planes in Pallas: pass `codes` three times with BlockSpec((None, bk/32, bn),
lambda j: (w, 0, j)) for w = 0, 1, 2 (squeezed plane axis, power-of-2 blocks) and decode slot v
as in environment.md 3.3(c); checked to lower for Triton (cuda) and to be exact in interpret mode.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cdquant_jax.quant import packing

FORMAT_VERSION = 1
FLOAT_FORMATS = ("f16", "f32")
STAT_FORMATS = FLOAT_FORMATS + ("qq",)
QQ_FIELDS = ("scale_qq_scale", "scale_qq_zero", "zero_qq_scale", "zero_qq_zero")
ARRAY_FIELDS = ("codes", "scale", "zero") + QQ_FIELDS + (
    "perm", "outlier_row_offsets", "outlier_col_idx", "outlier_values")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantMeta:
  """Static description of a `QuantizedWeight` (hashable; JSON-serialisable via `asdict`)."""

  # Producing method ("rtn", "gptq", "cd", "spqr", ...), free text.
  method: str
  # Width of the weight codes.
  bits: int
  # G: storage rows per first-level group (d_in for per-channel grids).
  group_size: int
  # "gptq" or "spqr" (parameter rule of the solver; both dequantize as s·(q − z)).
  flavor: str
  sym: bool
  d_out: int
  d_in: int
  # d_in rounded up to a multiple of 32.
  k_pad: int
  # Real groups (d_in / G) and stored stat rows (ceil(k_pad / G)).
  n_groups: int
  n_groups_pad: int
  # "f16", "f32" or "qq" for the first-level scale and zero.
  scale_format: str
  zero_format: str
  # Second level (SpQR): output channels per second-level group and code widths; 0 = unused.
  qq_groupsize: int = 0
  qq_scale_bits: int = 0
  qq_zero_bits: int = 0
  # dtype of the stored second-level statistics, "f16" (or "f32" when not representable).
  qq_dtype: str = "f16"
  # SpQR `round_zero` (only affects the paper's bits formula).
  round_zero: bool = False
  has_perm: bool = False
  # Number of outliers (0: no outlier arrays).
  nnz: int = 0
  format_version: int = FORMAT_VERSION

  def validate(self) -> None:
    """Raises ValueError naming the inconsistent field."""
    if self.format_version != FORMAT_VERSION:
      raise ValueError(f"unsupported format_version {self.format_version} "
                       f"(this code reads {FORMAT_VERSION})")
    if self.qq_dtype not in FLOAT_FORMATS:
      raise ValueError(f"qq_dtype must be one of {FLOAT_FORMATS}, got {self.qq_dtype!r}")
    for name in ("scale_format", "zero_format"):
      if getattr(self, name) not in STAT_FORMATS:
        raise ValueError(f"{name} must be one of {STAT_FORMATS}, got {getattr(self, name)!r}")
    if self.k_pad != packing.padded_rows(self.d_in):
      raise ValueError(f"k_pad={self.k_pad} is not d_in={self.d_in} padded to 32")
    if self.n_groups * self.group_size != self.d_in:
      raise ValueError(f"n_groups={self.n_groups} × group_size={self.group_size} != "
                       f"d_in={self.d_in}")
    if self.n_groups_pad != -(-self.k_pad // self.group_size):
      raise ValueError(f"n_groups_pad={self.n_groups_pad} != ceil(k_pad / group_size)")
    if "qq" in (self.scale_format, self.zero_format) and (
        self.qq_groupsize <= 0 or self.d_out % self.qq_groupsize):
      raise ValueError(f"qq_groupsize={self.qq_groupsize} must divide d_out={self.d_out}")

  def stat_bits(self, which: str) -> int:
    """Code width of a "qq" first-level statistic ("scale" or "zero")."""
    return self.qq_scale_bits if which == "scale" else self.qq_zero_bits


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedWeight:
  """A packed quantized [d_out, d_in] weight; see the module docstring for every field."""

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array
  scale_qq_scale: jax.Array | None = None
  scale_qq_zero: jax.Array | None = None
  zero_qq_scale: jax.Array | None = None
  zero_qq_zero: jax.Array | None = None
  perm: jax.Array | None = None
  outlier_row_offsets: jax.Array | None = None
  outlier_col_idx: jax.Array | None = None
  outlier_values: jax.Array | None = None
  meta: QuantMeta = dataclasses.field(metadata=dict(static=True))

  def arrays(self) -> dict[str, jax.Array]:
    """The stored arrays by field name (None fields left out)."""
    out = {name: getattr(self, name) for name in ARRAY_FIELDS}
    return {name: a for name, a in out.items() if a is not None}

  @property
  def shape(self) -> tuple[int, int]:
    return (self.meta.d_out, self.meta.d_in)


def expected_shapes(meta: QuantMeta) -> dict[str, tuple[tuple[int, ...], str]]:
  """Field -> (shape, numpy dtype name) of every array a container with `meta` must hold."""
  n = meta.d_out
  out = {"codes": (packing.packed_shape(meta.k_pad, n, meta.bits), "uint32")}
  for which in ("scale", "zero"):
    fmt = getattr(meta, f"{which}_format")
    if fmt == "qq":
      rows = packing.padded_rows(meta.n_groups_pad)
      out[which] = (packing.packed_shape(rows, n, meta.stat_bits(which)), "uint32")
      for level in ("scale", "zero"):
        out[f"{which}_qq_{level}"] = ((meta.n_groups_pad, n // meta.qq_groupsize),
                                      "float16" if meta.qq_dtype == "f16" else "float32")
    else:
      out[which] = ((meta.n_groups_pad, n), "float16" if fmt == "f16" else "float32")
  if meta.has_perm:
    out["perm"] = ((meta.d_in,), "int32")
  if meta.nnz:
    out["outlier_row_offsets"] = ((n + 1,), "int32")
    out["outlier_col_idx"] = ((meta.nnz,), "int32")
    out["outlier_values"] = ((meta.nnz,), "float16")
  return out


def check_arrays(qw: QuantizedWeight, name: str = "weight") -> None:
  """Raises ValueError naming `name` and the field when an array's shape/dtype breaks the layout."""
  qw.meta.validate()
  expected = expected_shapes(qw.meta)
  present = qw.arrays()
  if set(present) != set(expected):
    raise ValueError(f"{name}: arrays {sorted(present)} do not match the metadata, "
                     f"which needs {sorted(expected)}")
  for field, (shape, dtype) in expected.items():
    a = present[field]
    if tuple(a.shape) != shape or np.dtype(a.dtype).name != dtype:
      raise ValueError(f"{name}.{field}: expected {dtype}{list(shape)}, "
                       f"got {np.dtype(a.dtype).name}{list(a.shape)}")


# ----------------------------------------------------------------------------------------------
# Dequantization (the reference the kernels are tested against).


def first_level_stat(qw: QuantizedWeight, which: str) -> jax.Array:
  """First-level "scale" or "zero" as f32 [n_groups_pad, N] (rows past n_groups are padding)."""
  meta = qw.meta
  stored = getattr(qw, which)
  if getattr(meta, f"{which}_format") != "qq":
    return stored.astype(jnp.float32)
  codes = packing.unpack_codes(stored, meta.stat_bits(which))[:meta.n_groups_pad]
  qq_scale = getattr(qw, f"{which}_qq_scale").astype(jnp.float32)
  qq_zero = getattr(qw, f"{which}_qq_zero").astype(jnp.float32)
  # [n_groups_pad, N / qq] -> [n_groups_pad, N]: one second-level value per qq output channels
  qq_scale = jnp.repeat(qq_scale, meta.qq_groupsize, axis=1)
  qq_zero = jnp.repeat(qq_zero, meta.qq_groupsize, axis=1)
  return qq_scale * (codes.astype(jnp.float32) - qq_zero)


@jax.jit
def first_level_stats(qw: QuantizedWeight) -> tuple[jax.Array, jax.Array]:
  """(scale, zero) f32 [n_groups_pad, N], as a compiled program of their own: its outputs are
  f32 arrays, so no later multiply-add can absorb their rounding (see the module docstring)."""
  return first_level_stat(qw, "scale"), first_level_stat(qw, "zero")


def dense_storage(qw: QuantizedWeight, scale: jax.Array, zero: jax.Array) -> jax.Array:
  """Dense part in storage layout, f32 [k_pad, N] (padded rows are exactly 0), from the
  first-level statistics [n_groups_pad, N] of `first_level_stats`."""
  meta = qw.meta
  codes = packing.unpack_codes(qw.codes, meta.bits).astype(jnp.float32)  # [k_pad, N]
  # [n_groups_pad, N] -> [n_groups_pad·G, N] -> rows k < k_pad: row k takes group k // G
  rows = lambda stat: jnp.repeat(stat, meta.group_size, axis=0)[:meta.k_pad]
  return rows(scale) * (codes - rows(zero))


@jax.jit
def _dense_from_stats(qw: QuantizedWeight, scale: jax.Array, zero: jax.Array) -> jax.Array:
  """`dense_storage` in ORIGINAL input order, f32 [d_out, d_in]."""
  meta = qw.meta
  dense_t = dense_storage(qw, scale, zero)[:meta.d_in].T  # [N, d_in], columns in storage order
  if qw.perm is None:
    return dense_t
  return jnp.zeros_like(dense_t).at[:, qw.perm].set(dense_t)


def weight_without_outliers(qw: QuantizedWeight) -> jax.Array:
  """Dense part without outliers, f32 [d_out, d_in] in ORIGINAL input order."""
  return _dense_from_stats(qw, *first_level_stats(qw))


def outlier_rows(qw: QuantizedWeight) -> jax.Array:
  """int32 [nnz] output channel of every outlier, expanded from the CSR row offsets."""
  counts = jnp.diff(qw.outlier_row_offsets)
  return jnp.repeat(jnp.arange(qw.meta.d_out, dtype=jnp.int32), counts,
                    total_repeat_length=qw.meta.nnz)


def dequantize(qw: QuantizedWeight) -> jax.Array:
  """The weight W [d_out, d_in] f32 (original order): dense(codes, stats) + outliers.

  Called outside jit it is bit-exact to the specification in the module docstring (the
  statistics are a compiled program of their own); under jit see the note there.
  """
  W = weight_without_outliers(qw)
  if qw.meta.nnz == 0:
    return W
  return _with_outliers(qw, W)


@jax.jit
def _with_outliers(qw: QuantizedWeight, W: jax.Array) -> jax.Array:
  """W [d_out, d_in] plus the f32 outlier values at their positions."""
  values = qw.outlier_values.astype(jnp.float32)
  return W.at[outlier_rows(qw), qw.outlier_col_idx].add(values)


# ----------------------------------------------------------------------------------------------
# Packing a solver result.


def storage_order(group_index: np.ndarray, n_groups: int) -> tuple[int, np.ndarray | None]:
  """(G, perm): group length and the storage permutation (None when it is the identity).

  Raises ValueError unless every group has the same number d_in / n_groups of columns.
  """
  d_in = group_index.shape[0]
  if n_groups <= 0 or d_in % n_groups:
    raise ValueError(f"n_groups={n_groups} does not divide d_in={d_in}")
  G = d_in // n_groups
  if group_index.min() < 0 or group_index.max() >= n_groups:
    raise ValueError(f"group_index outside [0, {n_groups}): "
                     f"[{group_index.min()}, {group_index.max()}]")
  counts = np.bincount(group_index, minlength=n_groups)
  if (counts != G).any():
    g = int(np.flatnonzero(counts != G)[0])
    raise ValueError(f"group {g} has {counts[g]} columns; packing needs {G} in every group")
  perm = np.argsort(group_index, kind="stable").astype(np.int32)
  return G, (None if (perm == np.arange(d_in)).all() else perm)


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
  """Zero-pads the first axis of `a` to `rows`."""
  return np.concatenate([a, np.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)])


def _fits_f16(a: np.ndarray) -> bool:
  return np.array_equal(a.astype(np.float16).astype(np.float32).view(np.uint32),
                        a.astype(np.float32).view(np.uint32))


def _float_stat(values: np.ndarray, n_groups_pad: int) -> tuple[str, np.ndarray]:
  """[d_out, n_groups] f32 -> (format, [n_groups_pad, N] f16 when exact, else f32)."""
  rows = _pad_rows(np.ascontiguousarray(values.T, np.float32), n_groups_pad)
  return ("f16", rows.astype(np.float16)) if _fits_f16(rows) else ("f32", rows)


def _qq_stat(stats, which: str, d_out: int, n_groups: int, n_groups_pad: int
             ) -> dict[str, np.ndarray]:
  """Packs SpQR's second-level codes and stats of the first-level `which` stat (f32 stats)."""
  codes, qq_scale, qq_zero = (np.asarray(a) for a in stats.level(which))
  qq = stats.qq_groupsize
  if codes.shape != (d_out, n_groups):
    raise ValueError(f"spqr.{which}_codes has shape {codes.shape}, expected {(d_out, n_groups)}")
  rows = packing.padded_rows(n_groups_pad)
  out = {which: packing.pack_codes(_pad_rows(codes.T, rows), stats.bits(which))}
  for level, stat in (("scale", qq_scale), ("zero", qq_zero)):
    key = f"{which}_qq_{level}"
    stat = np.asarray(stat, np.float32)
    if stat.shape != (d_out // qq, n_groups):
      raise ValueError(f"spqr.{key} has shape {stat.shape}, expected {(d_out // qq, n_groups)}")
    out[key] = _pad_rows(np.ascontiguousarray(stat.T), n_groups_pad)
  return out


def _first_mismatch(got: np.ndarray, want: np.ndarray) -> np.ndarray:
  """Bool mask where two f32 arrays differ (NaN equals NaN, +0 equals −0)."""
  return ~((got == want) | (np.isnan(got) & np.isnan(want)))


def _raise_mismatch(what: str, bad: np.ndarray, got: np.ndarray, want: np.ndarray) -> None:
  idx = tuple(int(i) for i in np.argwhere(bad)[0])
  raise ValueError(f"{what} at {int(bad.sum())} positions; first {list(idx)}: "
                   f"packed {got[idx]!r} vs solver {want[idx]!r}")


def _outliers(Q: np.ndarray, dense: np.ndarray, mask: np.ndarray, method: str,
              allow_lossy: bool) -> dict[str, np.ndarray]:
  """CSR of additive float16 corrections Q − dense at the outlier positions."""
  rows, cols = np.nonzero(mask)  # row-major: rows ascending, columns ascending within a row
  values = (Q[rows, cols] - dense[rows, cols]).astype(np.float16)
  rebuilt = dense[rows, cols] + values.astype(np.float32)
  bad = _first_mismatch(rebuilt, Q[rows, cols])
  if bad.any() and not allow_lossy:
    j = int(np.flatnonzero(bad)[0])
    raise ValueError(
        f"pack_result({method}): {int(bad.sum())} outlier values are not dense + float16 "
        f"(first at [{rows[j]}, {cols[j]}]: Q={Q[rows[j], cols[j]]!r}, dense="
        f"{dense[rows[j], cols[j]]!r}, dense + f16(Q − dense)={rebuilt[j]!r}); "
        "pass allow_lossy_outliers=True to store the nearest float16 correction")
  counts = np.bincount(rows, minlength=Q.shape[0])
  return dict(outlier_row_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
              outlier_col_idx=cols.astype(np.int32), outlier_values=values)


def _stat_fields(grid, stats, d_out: int, n_groups_pad: int):
  """(array fields, {"scale"/"zero": format}, qq_dtype) of the first- and second-level stats.

  `stats` is the result's SpQRStats (None: both levels stored as floats).
  """
  n_groups = int(grid.scale.shape[1])
  fields, formats = {}, {}
  for which, values in (("scale", grid.scale), ("zero", grid.zero)):
    if stats is None or stats.level(which) is None:
      formats[which], fields[which] = _float_stat(np.asarray(values, np.float32), n_groups_pad)
      continue
    bits, qq = stats.bits(which), stats.qq_groupsize
    if bits <= 0 or qq <= 0 or d_out % qq:
      raise ValueError(f"{which}: second-level codes need spqr.qq_{which}_bits > 0 (got {bits}) "
                       f"and a qq_groupsize dividing d_out={d_out} (got {qq})")
    formats[which] = "qq"
    fields.update(_qq_stat(stats, which, d_out, n_groups, n_groups_pad))
  qq_fields = [k for k in QQ_FIELDS if k in fields]
  qq_dtype = "f16" if all(_fits_f16(fields[k]) for k in qq_fields) else "f32"
  if qq_dtype == "f16":
    fields.update({k: fields[k].astype(np.float16) for k in qq_fields})
  return fields, formats, qq_dtype


def pack_result(result, *, allow_lossy_outliers: bool = False) -> QuantizedWeight:
  """Packs a `SolveResult` into a `QuantizedWeight` and checks dequantize(·) == result.Q.

  Everything the format records comes from the result: bits, flavour, sym and round_zero from
  `result.grid`, the method name from `result.method`, and (SpQR) the second-level codes,
  float statistics (stored as float16 when all are representable, else float32), code widths
  and qq_groupsize from `result.spqr`.

  Args:
    result: the solver's SolveResult.
    allow_lossy_outliers: store outliers whose correction Q − dense is not exactly a float16
      (the round trip is then exact everywhere but at those outliers).
  Raises:
    ValueError: naming the field/position when the result cannot be stored exactly.
  """
  method, grid = result.method, result.grid
  Q = np.asarray(result.Q, np.float32)
  codes = np.asarray(result.codes)
  _check_codes(codes, Q.shape, grid.maxq)
  n_groups = int(grid.scale.shape[1])
  G, perm = storage_order(np.asarray(grid.group_index), n_groups)
  if result.spqr is not None and result.spqr.groupsize != G:
    raise ValueError(f"spqr.groupsize={result.spqr.groupsize} but the grid's groups have {G} "
                     "columns")
  qw = _pack_dense(result, codes, G, perm)
  stats = first_level_stats(qw)
  _check_stored_stats(stats, grid, n_groups, method)
  # Becomes dequantize(qw) in numpy: dense + f32(outlier values).
  W = np.array(_dense_from_stats(qw, *stats))
  mask = np.asarray(result.outlier_mask, bool)
  if mask.any():
    qw = _add_outliers(qw, Q, W, mask, method, allow_lossy_outliers)
  bad = _first_mismatch(W, Q)
  if allow_lossy_outliers:
    bad &= ~mask
  if bad.any():
    _raise_mismatch(f"pack_result({method}): dequantized weight differs from result.Q", bad, W, Q)
  return qw


def _check_codes(codes: np.ndarray, shape: tuple[int, int], maxq: int) -> None:
  """Raises ValueError unless the codes have the weight's shape and lie in [0, maxq]."""
  if codes.shape != shape:
    raise ValueError(f"codes shape {codes.shape} != Q shape {shape}")
  if codes.min() < 0 or codes.max() > maxq:
    raise ValueError(f"codes outside [0, {maxq}]: [{codes.min()}, {codes.max()}]")


def _pack_dense(result, codes: np.ndarray, G: int, perm: np.ndarray | None) -> QuantizedWeight:
  """The container of the result's codes [d_out, d_in] and statistics, without outliers.

  G is the group size and perm the storage order of the columns (None: the identity).
  """
  grid, stats = result.grid, result.spqr
  d_out, d_in = codes.shape
  k_pad = packing.padded_rows(d_in)
  n_groups_pad = -(-k_pad // G)
  order = np.arange(d_in) if perm is None else perm
  fields, formats, qq_dtype = _stat_fields(grid, stats, d_out, n_groups_pad)
  # [d_out, d_in] -> [k_pad, d_out] codes in storage order, packed along the input axis.
  fields["codes"] = packing.pack_codes(_pad_rows(codes[:, order].T, k_pad), result.bits)
  qq_bits = {w: stats.bits(w) if formats[w] == "qq" else 0 for w in ("scale", "zero")}
  meta = QuantMeta(method=result.method, bits=result.bits, group_size=G,
                   flavor=grid.flavor.value, sym=grid.sym, d_out=d_out, d_in=d_in, k_pad=k_pad,
                   n_groups=int(grid.scale.shape[1]), n_groups_pad=n_groups_pad,
                   scale_format=formats["scale"], zero_format=formats["zero"],
                   qq_groupsize=stats.qq_groupsize if any(qq_bits.values()) else 0,
                   qq_scale_bits=qq_bits["scale"], qq_zero_bits=qq_bits["zero"],
                   qq_dtype=qq_dtype, round_zero=grid.round_zero, has_perm=perm is not None)
  meta.validate()
  return QuantizedWeight(**{k: jnp.asarray(v) for k, v in fields.items()},
                         perm=None if perm is None else jnp.asarray(perm), meta=meta)


def _check_stored_stats(stats: tuple[jax.Array, jax.Array], grid, n_groups: int,
                        method: str) -> None:
  """Raises ValueError unless the stored first-level statistics (scale, zero) of
  `first_level_stats` equal the grid's scale / zero [d_out, n_groups]."""
  for stat, which, values in zip(stats, ("scale", "zero"), (grid.scale, grid.zero)):
    stored = np.asarray(stat)[:n_groups].T  # [d_out, n_groups]
    values = np.asarray(values, np.float32)
    bad = _first_mismatch(stored, values)
    if bad.any():
      _raise_mismatch(f"pack_result({method}): stored grid.{which} differs", bad, stored, values)


def _add_outliers(qw: QuantizedWeight, Q: np.ndarray, W: np.ndarray, mask: np.ndarray,
                  method: str, allow_lossy: bool) -> QuantizedWeight:
  """`qw` with the outliers at `mask` [d_out, d_in] stored as CSR float16 corrections of the
  dense weight W; adds them to W in place (W becomes dequantize(qw))."""
  csr = _outliers(Q, W, mask, method, allow_lossy)
  W[np.nonzero(mask)] += csr["outlier_values"].astype(np.float32)
  return dataclasses.replace(qw, **{k: jnp.asarray(v) for k, v in csr.items()},
                             meta=dataclasses.replace(qw.meta, nnz=int(mask.sum())))
