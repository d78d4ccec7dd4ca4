"""Tile loads and stores for the Triton kernels, and the one matrix product.

Every kernel takes whole-sequence blocks (``[T, head_dim_padded]`` refs, or
``[T, G, head_dim_padded]`` for a GQA group) and slices its own rows at
absolute offsets: rows past a static ``limit`` (a ragged tail) and padded
head-dim columns read as zero and are never written. Dense masks and biases
are read as ``[block_q, block_k]`` tiles of the caller's array, broadcast dims
kept at size 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


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


def _below(start, shape, limit, axis: int = 0):
    """``start + index < limit`` along ``axis`` of an int32 iota of ``shape``."""
    return (start + lax.broadcasted_iota(jnp.int32, shape, axis)) < limit


def _rows_and_cols(start, size: int, limit, dim_mask):
    """The ``[size, Dp]`` mask of rows below ``limit`` and real head-dim columns (None when nothing is masked)."""
    if limit is None:
        return dim_mask
    in_rows = _below(start, (size, 1), limit)
    return in_rows if dim_mask is None else (in_rows & dim_mask)


def _tile_mask(q0, k0, nr: int, nc: int, q_limit, k_limit):
    """The mask of a ``[nr, nc]`` tile's rows below ``q_limit`` and columns below ``k_limit`` (None for neither)."""
    mask = None
    if q_limit is not None:
        mask = _below(q0, (nr, 1), q_limit)
    if k_limit is not None:
        in_cols = _below(k0, (1, nc), k_limit, axis=1)
        mask = in_cols if mask is None else (mask & in_cols)
    return mask


def _store_index(start):
    # Interpret mode's store wants one index dtype, and a bare ``:`` takes the
    # default int (int64 under jax_enable_x64; a no-op otherwise).
    if isinstance(start, int):
        return start
    return lax.convert_element_type(start, jax.dtypes.canonicalize_dtype(jnp.int64))


def _store(view, value, mask):
    if mask is None:
        view[...] = value
    else:
        plgpu.store(view, value, mask=mask)


def load_tile(ref, start, size: int, *, limit: int | None, dim_mask, head=None):
    """Rows ``[start, start + size)`` of a ``[T, Dp]`` (or ``[T, G, Dp]``) ref.

    Rows at or past the static ``limit`` and padded columns read as zero.
    """
    rows = pl.ds(start, size)
    view = ref.at[rows, :] if head is None else ref.at[rows, head, :]
    mask = _rows_and_cols(start, size, limit, dim_mask)
    if mask is None:
        return view[...]
    return plgpu.load(view, mask=mask, other=0.0)


def load_row_stat(ref, start, size: int, *, limit: int | None, other: float, head=None):
    """A ``[size]`` slice of a per-row statistic (lse, delta); rows past ``limit`` read ``other``."""
    rows = pl.ds(start, size)
    view = ref.at[rows] if head is None else ref.at[head, rows]
    if limit is None:
        return view[...]
    return plgpu.load(view, mask=_below(start, (size,), limit), other=other)


def load_ids(ref, start, size: int, *, limit: int | None):
    """A ``[size]`` slice of segment ids; rows past ``limit`` read -1."""
    rows = pl.ds(start, size)
    if limit is None:
        return ref[rows]
    return plgpu.load(ref.at[rows], mask=_below(start, (size,), limit), other=-1)


def store_tile(ref, value, start, size: int, *, limit: int | None, dim_mask):
    """Write ``value`` to rows ``[start, start + size)`` of a ``[T, Dp]`` ref, skipping rows past ``limit`` and padded columns."""
    start = _store_index(start)
    view = ref.at[pl.ds(start, size), :]
    _store(view, value, _rows_and_cols(start, size, limit, dim_mask))


def store_row_stat(ref, value, start, size: int, *, limit: int | None):
    """Write a ``[size]`` per-row statistic at rows ``[start, start + size)``, skipping rows past ``limit``."""
    view = ref.at[pl.ds(start, size)]
    _store(view, value, None if limit is None else _below(start, (size,), limit))


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
    mask = _tile_mask(q0, k0, nr, nc, q_limit, k_limit)
    if mask is None:
        return view[...]
    return plgpu.load(view, mask=jnp.broadcast_to(mask, (nr, nc)), other=other)


def store_qk_tile(ref, value, q0, k0, *, q_limit, k_limit):
    """Write a ``[block_q, block_k]`` tile at ``(q0, k0)`` of a ``[Tq, Tk]`` ref, skipping rows/cols past the limits."""
    nr, nc = value.shape
    q0, k0 = _store_index(q0), _store_index(k0)
    view = ref.at[pl.ds(q0, nr), pl.ds(k0, nc)]
    mask = _tile_mask(q0, k0, nr, nc, q_limit, k_limit)
    _store(view, value, None if mask is None else jnp.broadcast_to(mask, (nr, nc)))
