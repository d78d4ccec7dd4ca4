"""The dK/dV kernel of the Mosaic GPU backward at head dims 64 and 128, and its launcher.

``backward.py`` describes the design (three warpgroups per 128-key tile, dQ fused
by TMA reductions or left to ``backward_dq.py``) and pads the arrays this
launcher takes.
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
    MEMORY_WG,
    ROW,
    WGMMA,
    CtaOrder,
    backward_grid,
    bcast,
    copy_block,
    i32,
    launch_params,
    mma,
    pop_tails,
    segment_block_ranges,
    stream_query_blocks,
    tiled_smem,
)
from pallas_flash.backends.mosaic_gpu.config import BLOCK_KV, TILE, spare_ds_fits
from pallas_flash.spec import LOG2E

__all__ = ["launch_dkdv"]

def _dkdv_kernel(
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
    kv_ready,
    q_ready,
    do_ready,
    q_consumed,
    do_consumed,
    ds_smem=None,
    dq_smem=None,
    ds_ready=None,
    ds_consumed=None,
    stage_smem=None,
    qseg_smem=None,
    kseg_smem=None,
    seq_q: int,
    seq_k: int,
    group: int,
    block_q: int,
    num_stages: int,
    causal: bool,
    scale: float,
    scale_log2: float,
    fuse_dq: bool,
    spare_ds: bool,
    left: int | None,
    right: int | None,
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
    dq_ref = refs.pop(0) if fuse_dq else None
    dk_ref, dv_ref = refs
    batch, kv_head, tile = order.coords()
    wg = lax.axis_index("wg")
    cta_k0 = tile * TILE
    num_q_blocks = pl.cdiv(seq_q, block_q)  # static
    ragged_k = seq_k % TILE != 0
    if right == 0:  # causal: blocks with a row >= the CTA's first key; from j_full on every row sees every key
        j_lo = jnp.minimum(lax.div(cta_k0, jnp.int32(block_q)), jnp.int32(num_q_blocks))
        j_full = jnp.minimum(pl.cdiv(cta_k0 + TILE, jnp.int32(block_q)), jnp.int32(num_q_blocks))
    elif right is not None:  # the same for keys j <= i + right
        j_lo = jnp.minimum(lax.div(jnp.maximum(cta_k0 - right, 0), jnp.int32(block_q)), jnp.int32(num_q_blocks))
        j_full = jnp.minimum(pl.cdiv(jnp.maximum(cta_k0 + TILE - 1 - right, 0), jnp.int32(block_q)),
                             jnp.int32(num_q_blocks))
    else:
        j_lo = j_full = jnp.int32(0)
    if ragged_k:  # the last key tile holds keys >= Tk: all its blocks masked
        j_full = jnp.where(cta_k0 + TILE > seq_k, jnp.int32(num_q_blocks), j_full)
    kv_len = None
    if has_kv_lengths:  # keys >= the batch row's length: masked; a tile of such keys only gets dK = dV = 0
        kv_len = kv_len_ref[batch]
        j_full = jnp.where(cta_k0 + TILE > kv_len, jnp.int32(num_q_blocks), j_full)
        j_lo = jnp.where(cta_k0 >= kv_len, jnp.int32(num_q_blocks), j_lo)
    q_blocks = jnp.int32(num_q_blocks)
    if left is not None:  # rows <= the CTA's last key + left
        q_blocks = jnp.minimum(pl.cdiv(jnp.maximum(cta_k0 + TILE + left, 0), jnp.int32(block_q)), q_blocks)
    if has_q_lengths:  # blocks past the batch row's query length hold no live row: never streamed
        q_blocks = jnp.minimum(pl.cdiv(q_len_ref[batch], jnp.int32(block_q)), q_blocks)
    if has_segments:  # the query blocks holding an id of the CTA's keys; masked by id but the run of their one id
        q_blocks = jnp.minimum(seg_range_ref[batch, tile, 1], q_blocks)
        j_lo = jnp.maximum(jnp.minimum(seg_range_ref[batch, tile, 0], q_blocks), j_lo)
        j_full = jnp.maximum(jnp.maximum(seg_range_ref[batch, tile, 2], j_full), j_lo)
    if has_q_lengths or left is not None or has_segments:
        j_lo, j_full = jnp.minimum(j_lo, q_blocks), jnp.minimum(j_full, q_blocks)
    j_unmasked_end = None  # from it on, some row's window ends before some of the CTA's keys (or has another id)
    if left is not None:
        j_unmasked_end = jnp.clip(lax.div(jnp.maximum(cta_k0 + left + 1, 0), jnp.int32(block_q)), j_full, q_blocks)
    if has_segments:
        j_unmasked_end = jnp.clip(jnp.minimum(seg_range_ref[batch, tile, 3], q_blocks if j_unmasked_end is None
                                              else j_unmasked_end), j_full, q_blocks)
    key_limit = seq_k if kv_len is None else kv_len  # keys at or past it are masked
    any_masked = right is not None or left is not None or ragged_k or has_kv_lengths or has_segments  # static
    n_q = jnp.maximum(q_blocks - j_lo, 0)  # query blocks per head
    n_masked = j_full - j_lo
    n_unmasked_end = n_q if j_unmasked_end is None else j_unmasked_end - j_lo

    dtype = q_smem.dtype
    head_dim = q_smem.shape[-1]
    half = head_dim // 2

    @pl.when(wg < COMPUTE_WGS)
    def _compute_warpgroup():
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        k0 = cta_k0 + wg * BLOCK_KV
        rows = pl.ds(wg * BLOCK_KV, BLOCK_KV)
        k_tile, v_tile = k_smem.at[rows], v_smem.at[rows]
        copy_block(k_ref, k_tail, batch=batch, start=k0, block_rows=BLOCK_KV, head=kv_head, dst=k_tile,
                   barrier=kv_ready.at[wg])
        copy_block(v_ref, v_tail, batch=batch, start=k0, block_rows=BLOCK_KV, head=kv_head, dst=v_tile,
                   barrier=kv_ready.at[wg])
        if has_segments:
            plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, pl.ds(k0, BLOCK_KV)], kseg_smem.at[wg], kv_ready.at[wg])
        stage = None if stage_smem is None else stage_smem.at[wg]
        plgpu.barrier_wait(kv_ready.at[wg])
        k_seg = plgpu.load(kseg_smem.at[wg], layout=ROW) if has_segments else None

        def mask(s, q0, slot):
            keys = k0 + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=WGMMA)
            rows = q0 + plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=WGMMA)
            conditions = []
            if right == 0:  # causal
                conditions.append(rows >= keys)
            elif right is not None:
                conditions.append(rows >= keys - right)
            if left is not None:
                conditions.append(keys >= rows - left)
            if ragged_k or kv_len is not None:
                conditions.append(keys < key_limit)
            if has_segments:  # the same segment
                q_seg = plgpu.load(qseg_smem.at[slot], layout=COL)
                conditions.append(bcast(k_seg, s.shape, 0) == bcast(q_seg, s.shape, 1))
            visible = functools.reduce(lambda a, b: a & b, conditions)
            return jnp.where(visible, s, -jnp.inf)

        def add_dq_to_global(dq, u):
            """Block ``u``'s ``dQ`` half, loaded, added into global memory (TMA reduction; in interpret mode into the
            CTA's own slice) through this warpgroup's float32 buffer."""
            g, jj = lax.div(u, n_q), lax.rem(u, n_q)
            rows_u, head_u, cols = pl.ds((j_lo + jj) * block_q, block_q), kv_head * group + g, pl.ds(wg * half, half)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last reduction has read dq_smem
            dq_smem.at[wg][...] = dq
            plgpu.commit_smem()
            if interpret:
                plgpu.copy_smem_to_gmem(dq_smem.at[wg], dq_ref.at[batch, tile, rows_u, head_u, cols])
            else:
                plgpu.copy_smem_to_gmem(dq_smem.at[wg], dq_ref.at[batch, rows_u, head_u, cols], reduction_op="add")

        def add_dq_of_block(u):
            """Block ``u``'s ``dQ`` half, ``dS_u K`` over the CTA's 128 keys (``dS`` read transposed from shared
            memory, once the partner's ``dS^T`` of it is in), added into global memory. Waits for this warpgroup's
            products in flight (dK's). ``u < 0`` (before the first block): with ``spare_ds`` a product from the
            never-written third buffer, dropped; else only the wait."""
            def product(dq_acc, buffer):
                plgpu.wgmma(dq_acc, ds_smem.at[buffer].T, k_smem.at[:, pl.ds(wg * half, half)])
                return plgpu.wgmma_accumulator_load(dq_acc, wait_n=0)

            acc = plgpu.ACC((block_q, half), jnp.float32)
            if spare_ds:  # ops in e90c157's order (``u >= 0`` twice): the IR measured and tested then
                has_u = u >= 0
                pl.when(has_u)(lambda: plgpu.barrier_wait(ds_ready.at[lax.rem(u, jnp.int32(2))]))
                dq = pl.run_scoped(lambda dq_acc: product(dq_acc, jnp.where(u >= 0, lax.rem(u, jnp.int32(2)), 2)), acc)
                pl.when(has_u)(lambda: plgpu.barrier_arrive(ds_consumed.at[lax.rem(u, jnp.int32(2))]))
                pl.when(has_u)(lambda: add_dq_to_global(dq, u))
                return

            @pl.when(u < 0)
            def _no_block():
                plgpu.wgmma_wait(0)

            @pl.when(u >= 0)
            def _add():
                parity = lax.rem(u, jnp.int32(2))
                plgpu.barrier_wait(ds_ready.at[parity])
                dq = pl.run_scoped(functools.partial(product, buffer=parity), acc)
                plgpu.barrier_arrive(ds_consumed.at[parity])
                add_dq_to_global(dq, u)

        def accumulate(dk_acc, dv_acc):
            def q_step(t, jj, *, masked: bool):
                slot = lax.rem(t, jnp.int32(num_stages))
                q0 = (j_lo + jj) * block_q
                q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
                plgpu.barrier_wait(q_ready.at[slot])

                def scores(s_acc, dp_acc):
                    plgpu.wgmma(s_acc, k_tile, q_tile.T)
                    plgpu.barrier_wait(do_ready.at[slot])
                    plgpu.wgmma(dp_acc, v_tile, do_tile.T)
                    s = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)  # dP^T still in flight
                    if masked:
                        s = mask(s, q0, slot)
                    lse = plgpu.load(lse_smem.at[slot], layout=COL)
                    p = jnp.exp2(s * scale_log2 - bcast(lse, s.shape, 1))
                    mma(dv_acc, p.astype(dtype), do_tile, stage, interpret)
                    dp = plgpu.wgmma_accumulator_load(dp_acc, wait_n=1)  # dV still in flight
                    delta = plgpu.load(delta_smem.at[slot], layout=COL)
                    return (p * (dp - bcast(delta, dp.shape, 1))).astype(dtype)

                acc = plgpu.ACC((BLOCK_KV, block_q), jnp.float32)
                ds = pl.run_scoped(scores, acc, acc)
                mma(dk_acc, ds, q_tile, stage, interpret)
                plgpu.wgmma_wait(1)  # dV done: the dO slot is free
                plgpu.barrier_arrive(do_consumed.at[slot])
                if fuse_dq:
                    # dS^T of block t into its buffer, once both warpgroups' dQ of block t - 2 has read it; then
                    # the dQ of block t - 1.
                    parity = lax.rem(t, jnp.int32(2))
                    pl.when(t >= 2)(lambda: plgpu.barrier_wait(ds_consumed.at[parity]))
                    ds_smem.at[parity, rows][...] = ds
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(ds_ready.at[parity])
                    add_dq_of_block(t - 1)  # also waits for dK
                else:
                    plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(q_consumed.at[slot])

            @pl.loop(i32(0), i32(group))
            def _head(g):
                t0 = g * n_q  # steps before this query head's
                if any_masked:
                    pl.loop(i32(0), n_masked)(lambda jj: q_step(t0 + jj, jj, masked=True))
                pl.loop(n_masked, n_unmasked_end)(lambda jj: q_step(t0 + jj, jj, masked=False))
                if left is not None or has_segments:  # the windows' left edge, the rows of other ids
                    pl.loop(n_unmasked_end, n_q)(lambda jj: q_step(t0 + jj, jj, masked=True))

            if fuse_dq:
                total = group * n_q
                add_dq_of_block(total - 1)

                # Observe both warpgroups' last two dQ products (ds_consumed phases not yet waited for): the
                # partner's read our K rows, which hold dK next.
                @pl.loop(jnp.maximum(total - 2, 0), total)
                def _drain(u):
                    plgpu.barrier_wait(ds_consumed.at[lax.rem(u, jnp.int32(2))])

            return dk_acc[...], dv_acc[...]

        acc = plgpu.ACC((BLOCK_KV, head_dim), jnp.float32)
        dk, dv = pl.run_scoped(accumulate, acc, acc)
        k_tile[...] = (dk * scale).astype(dtype)
        v_tile[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[batch, pl.ds(k0, BLOCK_KV), kv_head])
        plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[batch, pl.ds(k0, BLOCK_KV), kv_head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == MEMORY_WG)
    def _memory_warpgroup():
        stream_query_blocks(
            q_ref, do_ref, lse_ref, delta_ref, q_smem=q_smem, do_smem=do_smem, lse_smem=lse_smem,
            delta_smem=delta_smem, q_ready=q_ready, do_ready=do_ready, q_consumed=q_consumed,
            do_consumed=do_consumed, batch=batch, kv_head=kv_head, group=group, j_lo=j_lo, n_q=n_q,
            block_q=block_q, num_stages=num_stages,
            qseg=None if q_seg_ref is None else (q_seg_ref.at[batch], qseg_smem), q_tail=q_tail, do_tail=do_tail)


def launch_dkdv(q, k, v, do, lse2, delta, kv_lengths, q_lengths, segments, *, spec, config, interpret, seq_q, seq_k,
                tails=()):
    """``(dq or None, dk, dv)`` on padded arrays; ``dq`` only when it is fused (non-deterministic). ``tails``:
    ``common.straddling_operands`` of the lengths given."""
    batch, tq_pad, num_heads, head_dim = q.shape
    _, tk_pad, num_kv_heads, _ = k.shape
    dtype = q.dtype
    block_q, stages = config.block_q, config.num_stages
    fuse_dq = not config.deterministic
    num_tiles = tk_pad // TILE
    swizzle = min(128, head_dim * jnp.dtype(dtype).itemsize // 2) if fuse_dq else 128
    tiled = functools.partial(tiled_smem, swizzle=swizzle)
    scratch = dict(
        q_smem=tiled((stages, block_q, head_dim), dtype),
        do_smem=tiled((stages, block_q, head_dim), dtype),
        k_smem=tiled((TILE, head_dim), dtype),
        v_smem=tiled((TILE, head_dim), dtype),
        lse_smem=plgpu.SMEM((stages, block_q), jnp.float32),
        delta_smem=plgpu.SMEM((stages, block_q), jnp.float32),
        kv_ready=plgpu.Barrier(num_arrivals=3 if segments else 2, num_barriers=COMPUTE_WGS),
        q_ready=plgpu.Barrier(num_arrivals=3 if segments else 2, num_barriers=stages),
        do_ready=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        q_consumed=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        do_consumed=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
    )
    operands = [q, k, v, do, lse2, delta]
    operands += [x for x in (kv_lengths, q_lengths) if x is not None]
    operands += list(tails)
    if segments is not None:  # (q ids [B, Tq pad], kv ids [B, Tk pad])
        q_seg, kv_seg = segments
        scratch["qseg_smem"] = plgpu.SMEM((stages, block_q), jnp.int32)
        scratch["kseg_smem"] = plgpu.SMEM((COMPUTE_WGS, BLOCK_KV), jnp.int32)
        # per 128-key tile, the query blocks whose ids overlap its own
        operands += [q_seg, kv_seg, segment_block_ranges(kv_seg[:, :seq_k], q_seg[:, :seq_q], TILE, block_q,
                                                           num_tiles)]
    dq_ref = None
    # The first step's dropped dQ product from a never-written third dS^T buffer where it fits (the schedule
    # measured and tested on the H200 since 2026-12-01), else under a condition. NOTES 58.
    spare_ds = fuse_dq and spare_ds_fits(config, head_dim, dtype)
    if fuse_dq:
        scratch.update(
            ds_smem=tiled((3 if spare_ds else 2, TILE, block_q), dtype),
            dq_smem=tiled_smem((COMPUTE_WGS, block_q, head_dim // 2), jnp.float32),
            ds_ready=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2),
            ds_consumed=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2),
        )
        parts = (batch, num_tiles) if interpret else (batch,)
        dq_ref = jax.new_ref(jnp.zeros((*parts, tq_pad, num_heads, head_dim), jnp.float32))
        operands.append(dq_ref)
    if interpret:
        scratch["stage_smem"] = tiled((COMPUTE_WGS, BLOCK_KV, block_q), dtype)
    order = backward_grid(batch, num_kv_heads, num_tiles, causal=spec.causal, head_name="kv_head", tile_name="kv_tile")
    kernel = functools.partial(
        _dkdv_kernel,
        order=order,
        seq_q=seq_q,
        seq_k=seq_k,
        group=num_heads // num_kv_heads,
        block_q=block_q,
        num_stages=stages,
        causal=spec.causal,
        scale=float(spec.scale),
        scale_log2=float(spec.scale) * LOG2E,
        fuse_dq=fuse_dq,
        spare_ds=spare_ds,
        left=spec.within(seq_q, seq_k).left,
        right=spec.within(seq_q, seq_k).right,
        has_kv_lengths=kv_lengths is not None,
        has_q_lengths=q_lengths is not None,
        has_segments=segments is not None,
        interpret=bool(interpret),
    )
    kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
    dk, dv = plgpu.kernel(
        kernel,
        out_type=(kv_type, kv_type),
        scratch_types=scratch,
        grid=order.grid,
        grid_names=order.grid_names,
        **launch_params(interpret, "pallas_flash_mosaic_bwd_dkdv"),
    )(*operands)
    dq = None
    if fuse_dq:
        dq = jax.freeze(dq_ref)
        if interpret:
            dq = dq.sum(axis=1)
        dq = (dq * spec.scale).astype(dtype)
    return dq, dk, dv
