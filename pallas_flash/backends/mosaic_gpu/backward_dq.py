"""The deterministic mode's dQ kernel (``MosaicBackwardConfig(deterministic=True)``, see ``backward.py``).

One CTA per (batch, query head, 128 query rows), laid out like the forward:
the memory warpgroup streams the K/V blocks of the head's KV head into a ring
of ``dq_num_stages`` slots; each compute warpgroup holds its 64 rows of ``Q``
and ``dO`` (and their ``lse2``/``delta``) in shared memory, issues
``S = Q K^T`` and ``dP = dO V^T`` together, forms ``P`` as soon as ``S``
lands and ``dS = P * (dP - delta)``, and accumulates ``dQ += dS K`` (``dS``
from registers) in registers. Causal: a loop split (unmasked blocks, then the
diagonal; blocks only the partner warpgroup sees are released unread). Every
``dQ`` element is summed in one fixed order inside one warpgroup, so reruns
are bit-identical.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_flash.backends.mosaic_gpu.common import (
    COL,
    COMPUTE_REGISTERS,
    COMPUTE_WGS,
    MEMORY_REGISTERS,
    MEMORY_WG,
    ROW,
    WGMMA,
    CtaOrder,
    backward_grid,
    bcast,
    copy_block,
    launch_params,
    mma,
    pop_tails,
    segment_block_ranges,
    stream_kv_blocks,
    tiled_smem,
)
from pallas_flash.backends.mosaic_gpu.config import BLOCK_Q, TILE
from pallas_flash.spec import LOG2E

__all__ = ["launch_dq"]


def _dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    q_smem,
    do_smem,
    k_smem,
    v_smem,
    lse_smem,
    delta_smem,
    rows_ready,
    k_ready,
    v_ready,
    k_consumed,
    v_consumed,
    stage_smem=None,
    qseg_smem=None,
    kvseg_smem=None,
    seq_k: int,
    group: int,
    num_q_tiles: int,
    block_kv: int,
    num_stages: int,
    causal: bool,
    left: int | None,
    right: int | None,
    scale: float,
    scale_log2: float,
    has_kv_lengths: bool,
    has_q_lengths: bool,
    has_segments: bool,
    order: CtaOrder,
    interpret: bool,
):
    refs = list(refs)
    kv_len_ref = refs.pop(0) if has_kv_lengths else None
    q_len_ref = refs.pop(0) if has_q_lengths else None
    # The blocks straddling the lengths, zeroed past them (rows there may hold anything: 0 * NaN in the products)
    k_tail, v_tail, q_tail, do_tail = pop_tails(refs, kv_len_ref, q_len_ref)
    q_seg_ref, kv_seg_ref, seg_range_ref = (refs.pop(0) for _ in range(3)) if has_segments else (None,) * 3
    (dq_ref,) = refs
    batch, head, tile = order.coords()
    if causal:  # the longest rows first
        tile = num_q_tiles - 1 - tile
    wg = lax.axis_index("wg")
    cta_q0 = tile * TILE
    num_kv_blocks = pl.cdiv(seq_k, block_kv)  # static
    num_whole_kv_blocks = seq_k // block_kv  # static: blocks with no key past Tk
    dtype = q_smem.dtype

    kv_len = None if kv_len_ref is None else kv_len_ref[batch]  # keys at or past it are masked
    key_limit = seq_k if kv_len is None else kv_len

    def kv_block_range(q_start, q_end):
        """``(first, end)``: the key blocks rows ``q_start .. q_end - 1`` see (none when they are all past the query
        length, or their windows hold no key)."""
        end = jnp.int32(num_kv_blocks)
        if right == 0:  # causal: the last row's last key is q_end - 1
            end = jnp.minimum(pl.cdiv(q_end, jnp.int32(block_kv)), end)
        elif right is not None:  # the last row's last key is q_end - 1 + right
            end = jnp.minimum(pl.cdiv(jnp.maximum(q_end + right, 0), jnp.int32(block_kv)), end)
        if kv_len is not None:
            end = jnp.minimum(pl.cdiv(kv_len, jnp.int32(block_kv)), end)
        if q_len_ref is not None:  # rows past it get dQ = 0 with no key block streamed
            end = jnp.where(q_start >= q_len_ref[batch], jnp.int32(0), end)
        first = jnp.int32(0)
        if left is not None:  # the first row's first key is q_start - left
            first = jnp.minimum(lax.div(jnp.maximum(q_start - left, 0), jnp.int32(block_kv)), end)
        if has_segments:  # the blocks holding an id of these rows (those of 1 or 2 64-row tiles)
            t0, t1 = lax.div(q_start, jnp.int32(BLOCK_Q)), lax.div(q_end - 1, jnp.int32(BLOCK_Q))
            end = jnp.minimum(jnp.maximum(seg_range_ref[batch, t0, 1], seg_range_ref[batch, t1, 1]), end)
            first = jnp.maximum(jnp.minimum(seg_range_ref[batch, t0, 0], seg_range_ref[batch, t1, 0]), first)
            first = jnp.minimum(first, end)
        return first, jnp.maximum(end, first)

    cta_kv_first, cta_kv_end = kv_block_range(cta_q0, cta_q0 + TILE)

    @pl.when(wg < COMPUTE_WGS)
    def _compute_warpgroup():
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        q0 = cta_q0 + wg * BLOCK_Q
        rows = pl.ds(q0, BLOCK_Q)
        q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]
        copy_block(q_ref, q_tail, batch=batch, start=q0, block_rows=BLOCK_Q, head=head, dst=q_tile,
                   barrier=rows_ready.at[wg])
        copy_block(do_ref, do_tail, batch=batch, start=q0, block_rows=BLOCK_Q, head=head, dst=do_tile,
                   barrier=rows_ready.at[wg])
        plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[wg], rows_ready.at[wg])
        plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[wg], rows_ready.at[wg])
        if has_segments:
            plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, rows], qseg_smem.at[wg], rows_ready.at[wg])
        stage = None if stage_smem is None else stage_smem.at[wg]
        kv_first, kv_end = kv_block_range(q0, q0 + BLOCK_Q)
        if left is not None or has_segments:  # inside the CTA's blocks
            kv_first = jnp.clip(kv_first, cta_kv_first, cta_kv_end)
            kv_end = jnp.clip(kv_end, kv_first, cta_kv_end)
        # Blocks kv_lo .. kv_unmasked - 1 need no mask (those before: the window's left edge, other ids).
        kv_unmasked = jnp.int32(num_whole_kv_blocks)
        if right is not None:  # every key <= every row + right
            if right == 0:
                kv_unmasked = jnp.minimum(lax.div(q0, jnp.int32(block_kv)), kv_unmasked)
            else:
                kv_unmasked = jnp.minimum(lax.div(jnp.maximum(q0 + right + 1, 0), jnp.int32(block_kv)), kv_unmasked)
        if kv_len is not None:
            kv_unmasked = jnp.minimum(lax.div(kv_len, jnp.int32(block_kv)), kv_unmasked)
        kv_lo = kv_first
        if left is not None:  # every key >= every row - left
            kv_lo = jnp.clip(pl.cdiv(jnp.maximum(q0 + BLOCK_Q - 1 - left, 0), jnp.int32(block_kv)), kv_first, kv_end)
            kv_unmasked = jnp.maximum(kv_unmasked, kv_lo)
        if q_len_ref is not None or left is not None:
            kv_unmasked = jnp.minimum(kv_unmasked, kv_end)
        if has_segments:  # blocks outside the run whose keys all have the tile's one id are masked by id
            tile = lax.div(q0, jnp.int32(BLOCK_Q))
            kv_lo = jnp.clip(jnp.maximum(kv_lo, seg_range_ref[batch, tile, 2]), kv_first, kv_end)
            kv_unmasked = jnp.clip(jnp.minimum(kv_unmasked, seg_range_ref[batch, tile, 3]), kv_lo, kv_end)
        plgpu.barrier_wait(rows_ready.at[wg])
        lse = plgpu.load(lse_smem.at[wg], layout=ROW)
        delta = plgpu.load(delta_smem.at[wg], layout=ROW)
        q_seg = plgpu.load(qseg_smem.at[wg], layout=ROW) if has_segments else None

        def accumulate(dq_acc):
            def kv_step(kb, *, masked: bool):
                slot = lax.rem(kb - cta_kv_first, jnp.int32(num_stages))
                plgpu.barrier_wait(k_ready.at[slot])

                def scores(s_acc, dp_acc):
                    plgpu.wgmma(s_acc, q_tile, k_smem.at[slot].T)
                    plgpu.barrier_wait(v_ready.at[slot])
                    plgpu.wgmma(dp_acc, do_tile, v_smem.at[slot].T)
                    s = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)
                    if masked:
                        cols = kb * block_kv + plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=WGMMA)
                        visible = None
                        if seq_k % block_kv or kv_len is not None:
                            visible = cols < key_limit
                        rows = q0 + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=WGMMA)
                        if right is not None:
                            inside = cols <= rows + right
                            visible = inside if visible is None else visible & inside
                        if left is not None:
                            inside = cols >= rows - left
                            visible = inside if visible is None else visible & inside
                        if has_segments:  # the same segment
                            kv_seg = plgpu.load(kvseg_smem.at[slot], layout=COL)
                            same = bcast(q_seg, s.shape, 0) == bcast(kv_seg, s.shape, 1)
                            visible = same if visible is None else visible & same
                        s = jnp.where(visible, s, -jnp.inf)
                    p = jnp.exp2(s * scale_log2 - bcast(lse, s.shape, 0))
                    dp = plgpu.wgmma_accumulator_load(dp_acc, wait_n=0)
                    return (p * (dp - bcast(delta, dp.shape, 0))).astype(dtype)

                acc = plgpu.ACC((BLOCK_Q, block_kv), jnp.float32)
                ds = pl.run_scoped(scores, acc, acc)
                plgpu.barrier_arrive(v_consumed.at[slot])
                mma(dq_acc, ds, k_smem.at[slot], stage, interpret)
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(k_consumed.at[slot])

            if left is not None or has_segments:  # the window's left edge, the blocks of other ids
                pl.loop(kv_first, kv_lo)(functools.partial(kv_step, masked=True))
            pl.loop(kv_lo, kv_unmasked)(functools.partial(kv_step, masked=False))
            if right is not None or left is not None or has_segments or seq_k % block_kv or kv_len is not None:
                pl.loop(kv_unmasked, kv_end)(functools.partial(kv_step, masked=True))
            return dq_acc[...]

        def release(kb):  # a block only the partner warpgroup sees
            slot = lax.rem(kb - cta_kv_first, jnp.int32(num_stages))
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(k_consumed.at[slot])
            plgpu.barrier_arrive(v_consumed.at[slot])

        if left is not None or has_segments:  # before its window (its ids) starts
            pl.loop(cta_kv_first, kv_first)(release)
        dq = pl.run_scoped(accumulate, plgpu.ACC((BLOCK_Q, q_smem.shape[-1]), jnp.float32))
        pl.loop(kv_end, cta_kv_end)(release)

        q_tile[...] = (dq * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[batch, rows, head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == MEMORY_WG)
    def _memory_warpgroup():
        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
        stream_kv_blocks(
            k_ref, v_ref, k_smem=k_smem, v_smem=v_smem, k_ready=k_ready, v_ready=v_ready, k_consumed=k_consumed,
            v_consumed=v_consumed, batch=batch, kv_head=lax.div(head, jnp.int32(group)),
            num_blocks=cta_kv_end - cta_kv_first, block_kv=block_kv, num_stages=num_stages, first_block=cta_kv_first,
            kseg=None if kv_seg_ref is None else (kv_seg_ref.at[batch], kvseg_smem), k_tail=k_tail, v_tail=v_tail)


def launch_dq(q, k, v, do, lse2, delta, kv_lengths=None, q_lengths=None, segments=None, *, spec, config, interpret,
              seq_k, tails=()):
    """``dQ`` (``q``'s padded shape and dtype) from padded ``q, k, v, dO`` and padded ``lse2``/``delta`` rows;
    ``tails``: ``common.straddling_operands`` of the lengths given."""
    batch, tq_pad, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    dtype = q.dtype
    block_kv, stages = config.dq_block_kv, config.dq_num_stages
    num_q_tiles = tq_pad // TILE
    scratch = dict(
        q_smem=tiled_smem((COMPUTE_WGS, BLOCK_Q, head_dim), dtype),
        do_smem=tiled_smem((COMPUTE_WGS, BLOCK_Q, head_dim), dtype),
        k_smem=tiled_smem((stages, block_kv, head_dim), dtype),
        v_smem=tiled_smem((stages, block_kv, head_dim), dtype),
        lse_smem=plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.float32),
        delta_smem=plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.float32),
        rows_ready=plgpu.Barrier(num_arrivals=5 if segments else 4, num_barriers=COMPUTE_WGS),
        k_ready=plgpu.Barrier(num_arrivals=2 if segments else 1, num_barriers=stages),
        v_ready=plgpu.Barrier(num_barriers=stages),
        k_consumed=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        v_consumed=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
    )
    if interpret:
        scratch["stage_smem"] = tiled_smem((COMPUTE_WGS, BLOCK_Q, block_kv), dtype)
    order = backward_grid(batch, num_heads, num_q_tiles, causal=spec.causal, head_name="head", tile_name="q_tile")
    kernel = functools.partial(
        _dq_kernel,
        order=order,
        seq_k=seq_k,
        group=num_heads // num_kv_heads,
        num_q_tiles=num_q_tiles,
        block_kv=block_kv,
        num_stages=stages,
        causal=spec.causal,
        left=spec.within(tq_pad, seq_k).left,
        right=spec.within(tq_pad, seq_k).right,
        scale=float(spec.scale),
        scale_log2=float(spec.scale) * LOG2E,
        has_kv_lengths=kv_lengths is not None,
        has_q_lengths=q_lengths is not None,
        has_segments=segments is not None,
        interpret=bool(interpret),
    )
    operands = [x for x in (kv_lengths, q_lengths) if x is not None] + list(tails)
    if segments is not None:  # (q ids [B, Tq pad], kv ids [B, Tk pad]), padded
        q_seg, kv_seg = segments
        scratch["qseg_smem"] = plgpu.SMEM((COMPUTE_WGS, BLOCK_Q), jnp.int32)
        scratch["kvseg_smem"] = plgpu.SMEM((stages, block_kv), jnp.int32)
        operands += [q_seg, kv_seg, segment_block_ranges(q_seg[:, : q.shape[1]], kv_seg[:, :seq_k], BLOCK_Q, block_kv,
                                                           tq_pad // BLOCK_Q)]
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=scratch,
        grid=order.grid,
        grid_names=order.grid_names,
        **launch_params(interpret, "pallas_flash_mosaic_bwd_dq"),
    )(q, k, v, do, lse2, delta, *operands)
