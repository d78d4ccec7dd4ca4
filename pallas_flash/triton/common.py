"""Pieces shared by the Triton-lowered forward and backward kernels.

Conventions inside the kernels:
- logits live in the log2 domain: ``s = (q . k) * scale * log2(e)``, so the
  softmax uses ``exp2``;
- the backward kernels read ``lse2``: the log-sum-exp in the log2 domain with
  ``+inf`` for rows that see no key, so that ``exp2(s - lse2)`` is exactly 0
  there without any per-element mask;
- block ranges are split in three: masked blocks before, unmasked blocks,
  masked blocks after. Blocks outside the range are never loaded. Causal,
  window, lengths and segment ids (packed documents) all narrow the range;
  a dense mask or bias does not (it is applied in every block it reaches).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_flash import dropout
from pallas_flash.spec import LOG2E, AttentionInputs, AttentionSpec


def cdiv(a, b: int):
    """Ceiling division of a non-negative (possibly traced) int by a static int."""
    if isinstance(a, int):
        return -(-a // b)
    a = jnp.asarray(a)
    return lax.div(a + jnp.asarray(b - 1, a.dtype), jnp.asarray(b, a.dtype))


def fdiv(a, b: int):
    """Floor division of a non-negative (possibly traced) int by a static int."""
    if isinstance(a, int):
        return a // b
    a = jnp.asarray(a)
    return lax.div(a, jnp.asarray(b, a.dtype))


def _max(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return jnp.maximum(a, b)


def _min(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return jnp.minimum(a, b)


def where_index(cond, a, b):
    """``jnp.where`` for scalar block indices, which may be Python ints.

    Python-int branches become int32 constants first: the Triton lowering of
    ``select_n`` gives a weakly typed literal branch the predicate's type
    (i1), a module Triton then rejects.
    """
    if isinstance(cond, bool):
        return a if cond else b
    a = jnp.asarray(a, jnp.int32) if isinstance(a, int) else a
    b = jnp.asarray(b, jnp.int32) if isinstance(b, int) else b
    return jnp.where(cond, a, b)


def _clip(x, lo, hi):
    return _min(_max(x, lo), hi)


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """Matrix product with float32 accumulation.

    float32 operands multiply in full float32 (Triton's "ieee"), not TF32:
    a caller who feeds float32 asks for float32 accuracy; bf16/fp16 operands
    use the tensor cores as they are.
    """
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 and b.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def col_mask(head_dim: int, head_dim_padded: int):
    """``[1, Dp]`` mask of the real head-dim columns, or None when none are padding."""
    if head_dim == head_dim_padded:
        return None
    return lax.broadcasted_iota(jnp.int32, (1, head_dim_padded), 1) < head_dim


def load_tile(ref, start, size: int, *, limit: int | None, dmask, head=None):
    """Rows ``[start, start + size)`` of a ``[T, Dp]`` (or ``[T, G, Dp]``) ref.

    Rows at or past the static ``limit`` and padded columns read as zero.
    """
    rows = pl.ds(start, size)
    view = ref.at[rows, :] if head is None else ref.at[rows, head, :]
    mask = dmask
    if limit is not None:
        in_rows = (start + lax.broadcasted_iota(jnp.int32, (size, 1), 0)) < limit
        mask = in_rows if mask is None else (in_rows & mask)
    if mask is None:
        return view[...]
    return plgpu.load(view, mask=mask, other=0.0)


def load_row_stat(ref, start, size: int, *, limit: int | None, other: float, head=None):
    """A ``[size]`` slice of a per-row statistic (lse, delta); rows past ``limit`` read ``other``."""
    rows = pl.ds(start, size)
    view = ref.at[rows] if head is None else ref.at[head, rows]
    if limit is None:
        return view[...]
    in_rows = (start + lax.broadcasted_iota(jnp.int32, (size,), 0)) < limit
    return plgpu.load(view, mask=in_rows, other=other)


def load_ids(ref, start, size: int, *, limit: int | None):
    rows = pl.ds(start, size)
    if limit is None:
        return ref[rows]
    in_rows = (start + lax.broadcasted_iota(jnp.int32, (size,), 0)) < limit
    return plgpu.load(ref.at[rows], mask=in_rows, other=-1)


def store_tile(ref, value, start, size: int, *, limit: int | None, dmask):
    """Write ``value`` to rows ``[start, start + size)`` of a ``[T, Dp]`` ref, skipping rows past ``limit`` and padded columns."""
    if not isinstance(start, int):
        # Interpret mode's store wants one index dtype, and the bare ``:`` below
        # takes the default int (int64 under jax_enable_x64; a no-op otherwise).
        start = lax.convert_element_type(start, jax.dtypes.canonicalize_dtype(jnp.int64))
    view = ref.at[pl.ds(start, size), :]
    mask = dmask
    if limit is not None:
        in_rows = (start + lax.broadcasted_iota(jnp.int32, (size, 1), 0)) < limit
        mask = in_rows if mask is None else (in_rows & mask)
    if mask is None:
        view[...] = value
    else:
        plgpu.store(view, value, mask=mask)


def store_row_stat(ref, value, start, size: int, *, limit: int | None):
    """Write a ``[size]`` per-row statistic at rows ``[start, start + size)``, skipping rows past ``limit``."""
    view = ref.at[pl.ds(start, size)]
    if limit is None:
        view[...] = value
    else:
        in_rows = (start + lax.broadcasted_iota(jnp.int32, (size,), 0)) < limit
        plgpu.store(view, value, mask=in_rows)


def split_loops(ranges, body, carry, *, any_full: bool):
    """Run ``body(i, carry, masked=...)`` over the three ranges of ``kv_block_range``.

    ``[lo, flo)`` and ``[fhi, hi)`` with the element mask, ``[flo, fhi)``
    without. ``any_full=False`` (the sequence is shorter than one block, so no
    block is ever fully inside it) runs one masked loop over ``[lo, hi)``.
    Loops whose bounds are static and empty are not emitted.
    """
    lo, flo, fhi, hi = ranges
    loops = ((lo, flo, True), (flo, fhi, False), (fhi, hi, True)) if any_full else ((lo, hi, True),)
    for a, b, masked in loops:
        if isinstance(a, int) and isinstance(b, int) and a >= b:
            continue
        carry = lax.fori_loop(a, b, functools.partial(_int32_index, body, masked=masked), carry)
    return carry


def _int32_index(body, i, carry, **kwargs):
    # Static Python bounds give an int64 loop index under jax_enable_x64; the
    # kernels index in int32 throughout.
    return body(lax.convert_element_type(i, jnp.int32), carry, **kwargs)


def kv_block_range(
    q0,
    *,
    spec: AttentionSpec,
    block_q: int,
    block_k: int,
    seq_k: int,
    kv_len=None,
    q_len=None,
    seg_range=None,
    seq_q: int | None = None,
):
    """Key blocks seen by the query block starting at ``q0`` (forward and dQ).

    Returns ``(lo, flo, fhi, hi)``: blocks ``[lo, flo)`` and ``[fhi, hi)`` need
    the element mask, ``[flo, fhi)`` are fully visible; blocks outside
    ``[lo, hi)`` are skipped. Python ints where everything is static.
    ``seq_q`` and ``q_len`` trim the block's last row (a ragged tail, padded
    rows): rows past them are never stored, so they need not be exact.
    """
    left, right = spec.left, spec.right
    q1 = q0 + (block_q - 1)  # the block's last row that matters
    if seq_q is not None:
        q1 = _min(q1, seq_q - 1)
    if q_len is not None:
        q1 = _min(q1, q_len - 1)
    kv_valid = seq_k if kv_len is None else _min(seq_k, kv_len)
    kmin = 0 if left is None else _max(q0 - left, 0)  # visible keys of the block: [kmin, kmax)
    kmax = kv_valid if right is None else _min(kv_valid, q1 + right + 1)
    lo = fdiv(kmin, block_k)
    hi = where_index(kmax > kmin, cdiv(_max(kmax, 0), block_k), lo)
    flo = 0 if left is None else cdiv(_max(q1 - left, 0), block_k)
    fhi = fdiv(kv_valid, block_k)
    if right is not None:
        fhi = _min(fhi, fdiv(_max(q0 + right + 1, 0), block_k))
    if seg_range is not None:  # (lo, hi, flo, fhi) of segment_block_ranges
        lo = _max(lo, seg_range[0])
        hi = _min(hi, seg_range[1])
        flo = _max(flo, seg_range[2])
        fhi = _min(fhi, seg_range[3])
    if q_len is not None:
        hi = where_index(q0 < q_len, hi, lo)
    hi = _max(hi, lo)
    flo = _clip(flo, lo, hi)
    fhi = _clip(fhi, flo, hi)
    return lo, flo, fhi, hi


def q_block_range(
    k0,
    *,
    spec: AttentionSpec,
    block_q: int,
    block_k: int,
    seq_q: int,
    q_len=None,
    kv_len=None,
    seg_range=None,
    seq_k: int | None = None,
):
    """Query blocks that see the key block starting at ``k0`` (dK/dV).

    Same contract as ``kv_block_range``. Query tails and padded query rows need
    no mask here: their ``lse2`` is ``+inf``, so their probabilities are 0.
    ``seq_k`` and ``kv_len`` trim the block's last key (the kernel masks a
    block that straddles ``kv_len`` everywhere).
    """
    left, right = spec.left, spec.right
    k1 = k0 + (block_k - 1)  # the block's last key that matters
    if seq_k is not None:
        k1 = _min(k1, seq_k - 1)
    if kv_len is not None:
        k1 = _min(k1, kv_len - 1)
    q_valid = seq_q if q_len is None else _min(seq_q, q_len)
    qmin = 0 if right is None else _max(k0 - right, 0)  # queries that see the block: [qmin, qmax)
    qmax = q_valid if left is None else _min(q_valid, k1 + left + 1)
    lo = fdiv(qmin, block_q)
    hi = where_index(qmax > qmin, cdiv(_max(qmax, 0), block_q), lo)
    flo = 0 if right is None else cdiv(_max(k1 - right, 0), block_q)
    fhi = _min(hi, seq_q // block_q)  # a ragged last query block loads under a row mask
    if left is not None:
        fhi = _min(fhi, fdiv(k0 + left + 1, block_q))
    if seg_range is not None:  # (lo, hi, flo, fhi) of segment_block_ranges
        lo = _max(lo, seg_range[0])
        hi = _min(hi, seg_range[1])
        flo = _max(flo, seg_range[2])
        fhi = _min(fhi, seg_range[3])
    if kv_len is not None:
        hi = where_index(k0 < kv_len, hi, lo)
    hi = _max(hi, lo)
    flo = _clip(flo, lo, hi)
    fhi = _clip(fhi, flo, hi)
    return lo, flo, fhi, hi


def visible(q_pos, k_pos, *, spec: AttentionSpec, kv_limit=None, q_seg=None, k_seg=None):
    """Element mask from broadcastable query and key positions (and segment ids)."""
    mask = None

    def _and(m, x):
        return x if m is None else (m & x)

    if kv_limit is not None:
        mask = _and(mask, k_pos < kv_limit)
    if spec.left is not None:
        mask = _and(mask, k_pos >= q_pos - spec.left)
    if spec.right is not None:
        mask = _and(mask, k_pos <= q_pos + spec.right)
    if q_seg is not None:
        mask = _and(mask, q_seg == k_seg)
    return mask


def segment_block_ranges(q_seg: jax.Array, kv_seg: jax.Array, block_q: int, block_k: int, *, over: str):
    """Per-block ranges of blocks that share segment ids (computed in XLA, O(T^2 / block^2)).

    ``over="kv"``: for each query block, key blocks; ``over="q"``: for each
    key block, query blocks. Returns int32 ``[B, n]`` arrays ``(lo, hi, flo,
    fhi)``: blocks outside ``[lo, hi)`` share no id with the block (their id
    intervals do not overlap: exact for sorted, packed ids and conservative,
    still correct, for any others, since the kernels mask elements);
    ``[flo, fhi)`` are blocks whose ids all equal the block's own single id
    (no segment mask needed there), or an empty range when those are not one
    contiguous run (then every block in ``[lo, hi)`` is masked).
    """

    def block_min_max(ids, block):
        b, t = ids.shape
        n = -(-t // block)
        pad = n * block - t
        ids = jnp.pad(ids, ((0, 0), (0, pad)), mode="edge").reshape(b, n, block)
        return ids.min(-1), ids.max(-1)

    qmin, qmax = block_min_max(q_seg, block_q)
    kmin, kmax = block_min_max(kv_seg, block_k)
    if over == "kv":
        (amin, amax), (omin, omax) = (qmin, qmax), (kmin, kmax)
    else:
        (amin, amax), (omin, omax) = (kmin, kmax), (qmin, qmax)
    overlap = (amin[:, :, None] <= omax[:, None, :]) & (omin[:, None, :] <= amax[:, :, None])
    same = (amin == amax)[:, :, None] & (omin == omax)[:, None, :] & (amin[:, :, None] == omin[:, None, :])

    def first_last(m):
        n_other = m.shape[-1]
        any_ = m.any(-1)
        first = jnp.argmax(m, axis=-1)
        last = n_other - jnp.argmax(m[..., ::-1], axis=-1)
        return any_, jnp.where(any_, first, 0).astype(jnp.int32), jnp.where(any_, last, 0).astype(jnp.int32)

    _, lo, hi = first_last(overlap)
    any_same, flo, fhi = first_last(same)
    contiguous = any_same & (same.sum(-1) == fhi - flo)
    flo = jnp.where(contiguous, flo, lo)
    fhi = jnp.where(contiguous, fhi, lo)
    return lo, hi, flo, fhi


def extra_inputs(
    inputs: AttentionInputs,
    spec: AttentionSpec,
    block_rows: int,
    block_cols: int,
    *,
    over: str,
    group: int = 1,
):
    """BlockSpecs and arrays for the optional inputs, in the order ``unpack_extras`` takes them.

    Every grid here is ``(block, batch, head)``: per query head for
    ``over="kv"`` (forward, dQ), per KV head for ``over="q"`` (dK/dV, whose
    program loops over the ``group`` query heads of its KV head). Lengths,
    ALiBi slopes and the dropout seed travel whole; segment ids and the
    per-block ranges of ``segment_block_ranges`` per batch; a dense mask or
    bias as the whole ``[Tq or 1, Tk or 1]`` plane of its (batch, head), with
    broadcast (size-1) batch and head dims mapped to index 0. The kernels load
    ``[block_q, block_k]`` tiles of it themselves.
    """

    def whole_spec(a):
        nd = a.ndim
        return pl.BlockSpec(a.shape, lambda i, b, h: (0,) * nd)

    def per_batch(i, b, h):
        return (b, 0)

    def dense_spec(shape):
        nb, nh, tq, tk = shape
        head_block = None
        if over == "q" and nh > 1 and group > 1:
            head_block = group  # the KV head's whole query group; the kernel indexes it

        def index(i, b, h):
            return (b if nb > 1 else 0, h if nh > 1 else 0, 0, 0)

        return pl.BlockSpec((None, head_block, tq, tk), index)

    specs, args = [], []
    if spec.has_q_lengths:
        specs.append(whole_spec(inputs.q_lengths))
        args.append(inputs.q_lengths)
    if spec.has_kv_lengths:
        specs.append(whole_spec(inputs.kv_lengths))
        args.append(inputs.kv_lengths)
    if spec.has_segments:
        ranges = segment_block_ranges(inputs.q_segment_ids, inputs.kv_segment_ids, block_rows, block_cols, over=over)
        for a in (inputs.q_segment_ids, inputs.kv_segment_ids, *ranges):
            specs.append(pl.BlockSpec((None, a.shape[1]), per_batch))
            args.append(a)
    if spec.has_mask:
        specs.append(dense_spec(spec.mask_shape))
        args.append(inputs.mask)
    if spec.has_bias:
        specs.append(dense_spec(spec.bias_shape))
        args.append(inputs.bias)
    if spec.has_alibi:
        specs.append(whole_spec(inputs.alibi_slopes))
        args.append(inputs.alibi_slopes)
    if spec.has_dropout:
        specs.append(whole_spec(inputs.dropout_seed))
        args.append(inputs.dropout_seed)
    return specs, args


@dataclasses.dataclass(frozen=True)
class Extras:
    """The refs of ``extra_inputs`` inside a kernel (None where the feature is off)."""

    q_len: object = None
    kv_len: object = None
    segments: tuple | None = None  # (q_ids, kv_ids, block_lo, block_hi, block_flo, block_fhi)
    mask: object = None
    bias: object = None
    slopes: object = None
    seed: object = None


def unpack_extras(refs, spec: AttentionSpec):
    """Split the refs of ``extra_inputs`` off the front of a kernel's ``refs``: ``(Extras, rest)``."""
    refs = list(refs)

    def take(on: bool, n: int = 1):
        nonlocal refs
        if not on:
            return None
        got, refs = refs[:n], refs[n:]
        return tuple(got) if n > 1 else got[0]

    ex = Extras(
        q_len=take(spec.has_q_lengths),
        kv_len=take(spec.has_kv_lengths),
        segments=take(spec.has_segments, 6),
        mask=take(spec.has_mask),
        bias=take(spec.has_bias),
        slopes=take(spec.has_alibi),
        seed=take(spec.has_dropout),
    )
    return ex, refs


def load_qk_tile(ref, q0, k0, block_q: int, block_k: int, *, q_limit, k_limit, other, head=None):
    """The ``[block_q, block_k]`` tile at ``(q0, k0)`` of a ``[Tq or 1, Tk or 1]`` mask/bias ref.

    A broadcast (size-1) dim stays size 1 in the tile. Rows at or past
    ``q_limit`` and columns at or past ``k_limit`` (static or traced; None for
    none) read ``other``. ``head`` indexes a leading query-group dim.
    """
    tq, tk = ref.shape[-2:]
    if tq == 1:
        rows, nr, q_limit = pl.ds(0, 1), 1, None
    else:
        rows, nr = pl.ds(q0, block_q), block_q
    if tk == 1:
        cols, nc, k_limit = pl.ds(0, 1), 1, None
    else:
        cols, nc = pl.ds(k0, block_k), block_k
    view = ref.at[rows, cols] if head is None else ref.at[head, rows, cols]
    mask = None
    if q_limit is not None:
        mask = (q0 + lax.broadcasted_iota(jnp.int32, (nr, 1), 0)) < q_limit
    if k_limit is not None:
        in_cols = (k0 + lax.broadcasted_iota(jnp.int32, (1, nc), 1)) < k_limit
        mask = in_cols if mask is None else (mask & in_cols)
    if mask is None:
        return view[...]
    mask = jnp.broadcast_to(mask, (nr, nc))
    return plgpu.load(view, mask=mask, other=other)


def store_qk_tile(ref, value, q0, k0, *, q_limit, k_limit):
    """Write a ``[block_q, block_k]`` tile at ``(q0, k0)`` of a ``[Tq, Tk]`` ref, skipping rows/cols past the limits."""
    nr, nc = value.shape
    if not isinstance(q0, int):
        q0 = lax.convert_element_type(q0, jax.dtypes.canonicalize_dtype(jnp.int64))
    if not isinstance(k0, int):
        k0 = lax.convert_element_type(k0, jax.dtypes.canonicalize_dtype(jnp.int64))
    view = ref.at[pl.ds(q0, nr), pl.ds(k0, nc)]
    mask = None
    if q_limit is not None:
        mask = (q0 + lax.broadcasted_iota(jnp.int32, (nr, 1), 0)) < q_limit
    if k_limit is not None:
        in_cols = (k0 + lax.broadcasted_iota(jnp.int32, (1, nc), 1)) < k_limit
        mask = in_cols if mask is None else (mask & in_cols)
    if mask is None:
        view[...] = value
    else:
        plgpu.store(view, value, mask=jnp.broadcast_to(mask, (nr, nc)))


def log2_logits(s, *, spec: AttentionSpec, q_pos, k_pos, bias=None, slope=None):
    """Log2-domain logits from the raw ``q . k`` tile ``s``, and the soft-cap's tanh (or None).

    ``logits = cap * tanh(scale * s / cap)`` (or ``scale * s``), plus the bias
    tile and ``slope * (k_pos - q_pos)``, all times ``log2(e)``. Positions and
    the bias tile broadcast against ``s`` in either orientation (``[bq, bk]``
    or the transposed ``[bk, bq]``).
    """
    t = None
    if spec.soft_cap is not None:
        t = jnp.tanh(s * (spec.scale / spec.soft_cap))
        s2 = t * (spec.soft_cap * LOG2E)
    else:
        s2 = s * (spec.scale * LOG2E)
    if bias is not None:
        s2 = s2 + bias.astype(jnp.float32) * LOG2E
    if slope is not None:
        s2 = s2 + (slope * LOG2E) * (k_pos - q_pos).astype(jnp.float32)
    return s2, t


def alibi_slope(ex: Extras, b, head):
    """The float32 ALiBi slope of (batch ``b``, query head ``head``), or None."""
    if ex.slopes is None:
        return None
    nb = ex.slopes.shape[0]
    return ex.slopes[b if nb > 1 else 0, head]


def dropout_key(ex: Extras, b, head, num_heads: int):
    """The per-(batch, head) dropout hash key, or None without dropout."""
    if ex.seed is None:
        return None
    return dropout.head_key(ex.seed[0], ex.seed[1], b, head, num_heads)


def dropout_keep(key, q_pos, k_pos, *, spec: AttentionSpec):
    return dropout.keep_mask(key, q_pos, k_pos, rate=spec.dropout_rate)


def kv_visible_limit(kv_len, k_tail: int | None, seq_k: int):
    """The exclusive key bound the element mask applies: ``kv_len`` (clipped to ``seq_k``), the ragged tail, or None."""
    if kv_len is None:
        return k_tail
    return kv_len if k_tail is None else jnp.minimum(kv_len, seq_k)


@dataclasses.dataclass(frozen=True)
class QueryBlockTiles:
    """Logits and visibility of the ``[block_q, block_k]`` tiles of one query block.

    The forward and dQ kernels (one program per query block) build it once,
    after loading their query block. Then they call ``logits`` and ``visible``
    for each key block their loops visit.
    """

    ex: Extras
    spec: AttentionSpec
    q0: object
    q_pos: object  # [block_q, 1] int32
    block_q: int
    block_k: int
    q_tail: int | None
    k_tail: int | None
    kv_limit: object  # kv_visible_limit
    q_seg: object = None  # [block_q, 1] segment ids (then ``ex.segments`` holds the key ids), or None
    slope: object = None

    def logits(self, s, k0, k_pos, k_limit):
        """``log2_logits`` of the raw tile ``s`` at key block ``k0``, with its bias tile."""
        bias = None
        if self.ex.bias is not None:
            bias = load_qk_tile(
                self.ex.bias, self.q0, k0, self.block_q, self.block_k, q_limit=self.q_tail, k_limit=k_limit, other=0.0
            )
        return log2_logits(s, spec=self.spec, q_pos=self.q_pos, k_pos=k_pos, bias=bias, slope=self.slope)

    def visible(self, k0, k_pos, *, masked: bool, k_limit):
        """The tile's element mask (structural masks in masked blocks, a dense mask anywhere), or None."""
        vis = None
        if masked:
            k_seg = None
            if self.q_seg is not None:
                k_seg = load_ids(self.ex.segments[1], k0, self.block_k, limit=self.k_tail)[None, :]
            vis = visible(self.q_pos, k_pos, spec=self.spec, kv_limit=self.kv_limit, q_seg=self.q_seg, k_seg=k_seg)
        if self.ex.mask is not None:
            tile = load_qk_tile(
                self.ex.mask, self.q0, k0, self.block_q, self.block_k, q_limit=self.q_tail, k_limit=k_limit, other=False
            )
            vis = tile if vis is None else (vis & tile)
        return vis
