"""Block ranges for the Triton kernels: which blocks a program visits, and which of them need the element mask.

Every kernel walks the blocks of the other sequence in three loops
(``split_loops``): masked blocks before, fully visible blocks with no mask at
all, masked blocks after. Blocks outside the range are never loaded. Causal,
window, position offsets (folded into ``AttentionSpec.left``/``right``),
lengths and segment ids (packed documents) all narrow the range; a dense mask
or bias does not (it is applied in every block it reaches).

Block indices may be Python ints (everything static) or traced int32 scalars;
the helpers below keep static values static so that static empty loops are
not emitted at all.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_flash.spec import AttentionSpec


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


def split_loops(ranges, body, carry, *, any_full: bool):
    """Run ``body(i, carry, masked=...)`` over the three ranges of ``kv_block_range``.

    ``[lo, full_lo)`` and ``[full_hi, hi)`` with the element mask, ``[full_lo, full_hi)``
    without. ``any_full=False`` (the sequence is shorter than one block, so no
    block is ever fully inside it) runs one masked loop over ``[lo, hi)``.
    Loops whose bounds are static and empty are not emitted.
    """
    lo, full_lo, full_hi, hi = ranges
    loops = ((lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True)) if any_full else ((lo, hi, True),)
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

    Returns ``(lo, full_lo, full_hi, hi)``: blocks ``[lo, full_lo)`` and ``[full_hi, hi)`` need
    the element mask, ``[full_lo, full_hi)`` are fully visible; blocks outside
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
    full_lo = 0 if left is None else cdiv(_max(q1 - left, 0), block_k)
    full_hi = fdiv(kv_valid, block_k)
    if right is not None:
        full_hi = _min(full_hi, fdiv(_max(q0 + right + 1, 0), block_k))
    if seg_range is not None:  # (lo, hi, full_lo, full_hi) of segment_block_ranges
        lo = _max(lo, seg_range[0])
        hi = _min(hi, seg_range[1])
        full_lo = _max(full_lo, seg_range[2])
        full_hi = _min(full_hi, seg_range[3])
    if q_len is not None:
        hi = where_index(q0 < q_len, hi, lo)
    hi = _max(hi, lo)
    full_lo = _clip(full_lo, lo, hi)
    full_hi = _clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


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
    full_lo = 0 if right is None else cdiv(_max(k1 - right, 0), block_q)
    full_hi = _min(hi, fdiv(q_valid, block_q))  # a block straddling the query length or Tq loads under a row mask
    if left is not None:
        full_hi = _min(full_hi, fdiv(k0 + left + 1, block_q))
    if seg_range is not None:  # (lo, hi, full_lo, full_hi) of segment_block_ranges
        lo = _max(lo, seg_range[0])
        hi = _min(hi, seg_range[1])
        full_lo = _max(full_lo, seg_range[2])
        full_hi = _min(full_hi, seg_range[3])
    if kv_len is not None:
        hi = where_index(k0 < kv_len, hi, lo)
    hi = _max(hi, lo)
    full_lo = _clip(full_lo, lo, hi)
    full_hi = _clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def segment_block_ranges(q_seg: jax.Array, kv_seg: jax.Array, block_q: int, block_k: int, *, over: str):
    """Per-block ranges of blocks that share segment ids (computed in XLA, O(T^2 / block^2)).

    ``over="kv"``: for each query block, key blocks; ``over="q"``: for each
    key block, query blocks. Returns int32 ``[B, n]`` arrays ``(lo, hi, full_lo,
    full_hi)``: blocks outside ``[lo, hi)`` share no id with the block (their id
    intervals do not overlap: exact for sorted, packed ids and conservative,
    still correct, for any others, since the kernels mask elements);
    ``[full_lo, full_hi)`` are blocks whose ids all equal the block's own single id
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
    any_same, full_lo, full_hi = first_last(same)
    contiguous = any_same & (same.sum(-1) == full_hi - full_lo)
    full_lo = jnp.where(contiguous, full_lo, lo)
    full_hi = jnp.where(contiguous, full_hi, lo)
    return lo, hi, full_lo, full_hi
