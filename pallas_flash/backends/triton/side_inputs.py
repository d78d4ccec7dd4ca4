"""The optional per-call arrays beside q, k, v, as the Triton kernels receive them.

``side_inputs`` turns the call's ``AttentionInputs`` into a ``SideInputs``
pytree of arrays and a matching pytree of ``BlockSpec``s; ``pallas_call``
hands the kernel the same pytree of refs, with ``None`` where the spec has no
such feature. Every grid here is ``(block, batch, head)``: per query head for
``over="kv"`` (forward, dQ), per KV head for ``over="q"`` (dK/dV, whose
program loops over the ``group`` query heads of its KV head).
"""

from __future__ import annotations

from typing import NamedTuple

from jax.experimental import pallas as pl

from pallas_flash.backends.triton.blocks import segment_block_ranges
from pallas_flash.spec import AttentionInputs, AttentionSpec


class Segments(NamedTuple):
    """Segment ids and, per block of the program's own sequence, the blocks of the other it visits."""

    q_ids: object  # [Tq] int32
    kv_ids: object  # [Tk] int32
    lo: object  # [n_blocks] int32: see blocks.segment_block_ranges
    hi: object
    full_lo: object
    full_hi: object

    def ranges(self, block):
        """``(lo, hi, full_lo, full_hi)`` of one block, as ``kv_block_range``/``q_block_range`` take them."""
        return (self.lo[block], self.hi[block], self.full_lo[block], self.full_hi[block])


class SideInputs(NamedTuple):
    """Refs (inside a kernel) or arrays/BlockSpecs (outside) of the optional inputs; None where off."""

    q_len: object = None  # [B] int32
    kv_len: object = None  # [B] int32
    segments: Segments | None = None
    mask: object = None  # the (batch, head) plane [Tq or 1, Tk or 1] of a bool mask
    bias: object = None  # likewise, of a float bias
    slopes: object = None  # [1 or B, N] float32 ALiBi slopes
    seed: object = None  # [2] uint32 dropout seed


def side_inputs(
    inputs: AttentionInputs,
    spec: AttentionSpec,
    block_rows: int,
    block_cols: int,
    *,
    over: str,
    group: int = 1,
) -> tuple[SideInputs, SideInputs]:
    """``(block_specs, arrays)`` for one ``pallas_call``, both ``SideInputs``.

    Lengths, ALiBi slopes and the dropout seed travel whole; segment ids and
    the per-block ranges of ``segment_block_ranges`` per batch; a dense mask or
    bias as the whole ``[Tq or 1, Tk or 1]`` plane of its (batch, head), with
    broadcast (size-1) batch and head dims mapped to index 0. The kernels load
    ``[block_q, block_k]`` tiles of it themselves.
    """
    def whole(a):
        nd = a.ndim
        return pl.BlockSpec(a.shape, lambda i, b, h: (0,) * nd)

    def per_batch(a):
        return pl.BlockSpec((None, a.shape[1]), lambda i, b, h: (b, 0))

    def dense(shape):
        nb, nh, tq, tk = shape
        head_block = None
        if over == "q" and nh > 1 and group > 1:
            head_block = group  # the KV head's whole query group; the kernel indexes it

        def index(i, b, h):
            return (b if nb > 1 else 0, h if nh > 1 else 0, 0, 0)

        return pl.BlockSpec((None, head_block, tq, tk), index)

    specs, arrays = {}, {}

    def add(name, on: bool, array, block_spec):
        if on:
            specs[name], arrays[name] = block_spec(array), array

    add("q_len", spec.has_q_lengths, inputs.q_lengths, whole)
    add("kv_len", spec.has_kv_lengths, inputs.kv_lengths, whole)
    if spec.has_segments:
        ranges = segment_block_ranges(inputs.q_segment_ids, inputs.kv_segment_ids, block_rows, block_cols, over=over)
        arrays["segments"] = Segments(inputs.q_segment_ids, inputs.kv_segment_ids, *ranges)
        specs["segments"] = Segments(*(per_batch(a) for a in arrays["segments"]))
    add("mask", spec.has_mask, inputs.mask, lambda _: dense(spec.mask_shape))
    add("bias", spec.has_bias, inputs.bias, lambda _: dense(spec.bias_shape))
    add("slopes", spec.has_alibi, inputs.alibi_slopes, whole)
    add("seed", spec.has_dropout, inputs.dropout_seed, whole)
    return SideInputs(**specs), SideInputs(**arrays)


def alibi_slope(side: SideInputs, b, head):
    """The float32 ALiBi slope of (batch ``b``, query head ``head``), or None."""
    if side.slopes is None:
        return None
    nb = side.slopes.shape[0]
    return side.slopes[b if nb > 1 else 0, head]


def row_lengths(side: SideInputs, b):
    """``(q_len, kv_len)`` of batch ``b`` (each None when not given)."""
    q_len = side.q_len[b] if side.q_len is not None else None
    kv_len = side.kv_len[b] if side.kv_len is not None else None
    return q_len, kv_len

