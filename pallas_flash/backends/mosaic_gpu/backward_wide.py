"""The Mosaic GPU backward at head dim 256 (``backward.py`` runs these kernels for ``head_dim == 256``).

At D=256 the row split of ``backward.py`` does not fit: a warpgroup's ``dK``
and ``dV`` accumulators for 64 keys (2 x 64 x 256 float32) would take 256
registers per thread. Here the two compute warpgroups split the work by role
over the same 64 rows instead, and pass the probabilities between them through
a double-buffered shared-memory tile (``p_smem``; ``p_ready`` says a tile is
written, ``p_consumed`` that the other warpgroup has read it):

- the *P warpgroup* (0) recomputes the logits and ``P = exp2(s * scale *
  log2(e) - lse2)`` (masked on the causal diagonal and, for ``dQ``, past
  ``Tk``) and writes ``P`` to ``p_smem``;
- the *dS warpgroup* (1) computes ``dP`` with its own wgmma meanwhile, reads
  ``P`` and forms ``dS = P * (dP - delta)`` (``P`` as rounded to the input
  dtype; zero wherever ``P`` is).

dK/dV kernel: one CTA per (batch, KV head, 64 keys); the memory warpgroup
streams each query head of the GQA group's ``Q``/``dO`` blocks (64 rows) with
their ``lse2``/``delta`` rows into a ring of ``num_stages`` slots. The P
warpgroup holds ``K`` and ``dV``: ``S^T = K Q^T``, ``dV += P^T dO`` (``P^T``
read by the wgmma straight from ``p_smem``). The dS warpgroup holds ``V`` and
``dK``: ``dP^T = V dO^T``, ``dK += dS^T Q``. Two matrix products each per
block pair, as many as the row split; GQA summed on chip. The P warpgroup
never waits for the dS warpgroup except for a free ``p_smem`` tile, so it runs
up to two blocks ahead.

dQ kernel: one CTA per (batch, query head, 64 rows); the memory warpgroup
streams K/V blocks of ``dq_block_kv`` keys. The P warpgroup holds ``Q``: ``S =
Q K^T``. The dS warpgroup holds ``dO`` and ``dQ``: ``dP = dO V^T``, ``dQ += dS
K``. (One product against two: the dS warpgroup sets the pace, while the P
warpgroup's exponentials overlap its matrix products.)

Every sum has one fixed order inside one warpgroup: both kernels are
deterministic, whatever ``MosaicBackwardConfig.deterministic`` says. Causal is
a loop split as elsewhere: blocks no row sees are never loaded, only diagonal
blocks are masked. The launcher (``backward.mosaic_backward``) pads both
sequences to whole 128-row tiles (``lse2 = +inf`` on padded query rows, so
their ``P`` is 0). In interpret mode the one wgmma whose left operand is in
registers (``dS``) takes a shared-memory copy of it (``common.mma``).
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
    bcast,
    copy_block,
    drain_p,
    hand_over_p,
    i32,
    launch_params,
    masked_logits,
    mma,
    p_handover_scratch,
    pop_tails,
    segment_block_ranges,
    stream_kv_blocks,
    stream_query_blocks,
    take_p,
    tiled_smem,
    zero_straddling_rows,
)
from pallas_flash.backends.mosaic_gpu.config import BLOCK_Q
from pallas_flash.spec import LOG2E

__all__ = ["launch_wide", "launch_dkdv", "launch_dq", "ROWS"]

P_WG, DS_WG = 0, 1
# Rows of one CTA: keys in the dK/dV kernel, query rows in the dQ kernel (one wgmma M, as config's
# shared-memory accounting assumes).
ROWS = BLOCK_Q


def _dkdv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
    q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, p_smem,
    kv_ready, q_ready, do_ready, q_consumed, do_consumed, p_ready, p_consumed,
    stage_smem=None, qseg_smem=None, kseg_smem=None, kseg_ready=None, seq_q: int, group: int, num_stages: int,
    causal: bool, left, right, scale: float, scale_log2: float, has_kv_lengths: bool, has_q_lengths: bool,
    has_segments: bool, interpret: bool,
):  # fmt: skip
    refs = list(refs)
    kv_len_ref = refs.pop(0) if has_kv_lengths else None
    q_len_ref = refs.pop(0) if has_q_lengths else None
    k_tail, v_tail, q_tail, do_tail = pop_tails(refs, kv_len_ref, q_len_ref)  # zeroed past the lengths
    q_seg_ref, kv_seg_ref, seg_range_ref = (refs.pop(0) for _ in range(3)) if has_segments else (None,) * 3
    dk_ref, dv_ref = refs
    batch = lax.axis_index("batch")
    kv_head = lax.axis_index("kv_head")
    tile = lax.axis_index("kv_tile")
    wg = lax.axis_index("wg")
    k0 = tile * ROWS
    keys = pl.ds(k0, ROWS)
    num_q_blocks = pl.cdiv(seq_q, ROWS)  # static
    if right == 0:  # causal: query block ``tile`` holds the diagonal; earlier blocks see none of these keys
        j_lo = jnp.minimum(tile, jnp.int32(num_q_blocks))
    elif right is not None:  # rows >= the first key - right
        j_lo = jnp.minimum(lax.div(jnp.maximum(k0 - right, 0), jnp.int32(ROWS)), jnp.int32(num_q_blocks))
    else:
        j_lo = jnp.int32(0)
    q_blocks = jnp.int32(num_q_blocks)
    if left is not None:  # rows <= the last key + left
        q_blocks = jnp.minimum(pl.cdiv(jnp.maximum(k0 + ROWS + left, 0), jnp.int32(ROWS)), q_blocks)
    if has_q_lengths:  # blocks past the batch row's query length hold no live row: never streamed
        q_blocks = jnp.minimum(pl.cdiv(q_len_ref[batch], jnp.int32(ROWS)), q_blocks)
    if has_kv_lengths:  # a tile of keys all past the batch row's key length: dK = dV = 0, nothing streamed
        q_blocks = jnp.where(k0 >= kv_len_ref[batch], jnp.int32(0), q_blocks)
    if has_segments:  # the query blocks holding an id of these keys
        q_blocks = jnp.minimum(seg_range_ref[batch, tile, 1], q_blocks)
        j_lo = jnp.maximum(seg_range_ref[batch, tile, 0], j_lo)
    j_lo = jnp.minimum(j_lo, q_blocks)
    n_q = q_blocks - j_lo  # query blocks per head
    if right == 0:  # the diagonal block
        n_masked = jnp.minimum(n_q, 1)
    elif right is not None:  # blocks before j_full have a row that sees only some of the keys
        n_masked = jnp.clip(pl.cdiv(jnp.maximum(k0 + ROWS - 1 - right, 0), jnp.int32(ROWS)) - j_lo, 0, n_q)
    else:
        n_masked = jnp.int32(0)
    n_unmasked_end = n_q  # from it on, some row's window ends before some of the keys
    if left is not None:
        n_unmasked_end = jnp.clip(lax.div(jnp.maximum(k0 + left + 1, 0), jnp.int32(ROWS)) - j_lo, n_masked, n_q)
    if has_segments:  # outside the run of blocks whose rows all have the keys' one id: masked by id
        n_masked = jnp.clip(seg_range_ref[batch, tile, 2] - j_lo, n_masked, n_q)
        n_unmasked_end = jnp.clip(jnp.minimum(n_unmasked_end, seg_range_ref[batch, tile, 3] - j_lo), n_masked, n_q)
    total = group * n_q
    dtype = q_smem.dtype

    def for_each_block(step):
        """``step(t, q0, masked)`` over the group's query heads and the query blocks that see the keys."""

        @pl.loop(i32(0), i32(group))
        def _head(g):
            t0 = g * n_q
            if right is not None or has_segments:
                pl.loop(i32(0), n_masked)(lambda jj: step(t0 + jj, (j_lo + jj) * ROWS, True))
            pl.loop(n_masked, n_unmasked_end)(lambda jj: step(t0 + jj, (j_lo + jj) * ROWS, False))
            if left is not None or has_segments:  # the windows' left edge, the rows of other ids
                pl.loop(n_unmasked_end, n_q)(lambda jj: step(t0 + jj, (j_lo + jj) * ROWS, True))

    @pl.when(wg == P_WG)
    def _p_warpgroup():  # S^T = K Q^T, P^T, dV += P^T dO
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        copy_block(k_ref, k_tail, batch=batch, start=k0, block_rows=ROWS, head=kv_head, dst=k_smem,
                   barrier=kv_ready.at[P_WG])
        if has_segments:
            plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, keys], kseg_smem, kseg_ready)
            plgpu.barrier_wait(kseg_ready)
        plgpu.barrier_wait(kv_ready.at[P_WG])
        k_seg = plgpu.load(kseg_smem, layout=ROW) if has_segments else None

        def accumulate(dv_acc):
            def step(t, q0, masked):
                slot = lax.rem(t, jnp.int32(num_stages))
                plgpu.barrier_wait(q_ready.at[slot])

                def logits(s_acc):
                    plgpu.wgmma(s_acc, k_smem, q_smem.at[slot].T)
                    return plgpu.wgmma_accumulator_load(s_acc, wait_n=0)

                s = pl.run_scoped(logits, plgpu.ACC((ROWS, ROWS), jnp.float32))
                if masked:
                    s = masked_logits(s, k0, q0, left=left, right=right, seq_k=None, transposed=True)
                    if has_segments:  # the same segment
                        q_seg = plgpu.load(qseg_smem.at[slot], layout=COL)
                        s = jnp.where(bcast(k_seg, s.shape, 0) == bcast(q_seg, s.shape, 1), s, -jnp.inf)
                lse = plgpu.load(lse_smem.at[slot], layout=COL)
                plgpu.barrier_arrive(q_consumed.at[slot])
                p = jnp.exp2(s * scale_log2 - bcast(lse, s.shape, 1))
                pslot = hand_over_p(p, t, p_smem, p_ready, p_consumed)
                plgpu.barrier_wait(do_ready.at[slot])
                plgpu.wgmma(dv_acc, p_smem.at[pslot], do_smem.at[slot])
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(do_consumed.at[slot])

            for_each_block(step)
            return dv_acc[...]

        dv = pl.run_scoped(accumulate, plgpu.ACC((ROWS, k_smem.shape[-1]), jnp.float32))
        drain_p(total, p_consumed)
        k_smem[...] = dv.astype(dtype)  # K is read by this warpgroup alone
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dv_ref.at[batch, keys, kv_head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == DS_WG)
    def _ds_warpgroup():  # dP^T = V dO^T, dS^T, dK += dS^T Q
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        copy_block(v_ref, v_tail, batch=batch, start=k0, block_rows=ROWS, head=kv_head, dst=v_smem,
                   barrier=kv_ready.at[DS_WG])
        plgpu.barrier_wait(kv_ready.at[DS_WG])

        def accumulate(dk_acc):
            def step(t, q0, masked):
                del q0, masked  # dS is 0 wherever the P warpgroup masked P
                slot = lax.rem(t, jnp.int32(num_stages))
                plgpu.barrier_wait(do_ready.at[slot])

                def dprobs(dp_acc):
                    plgpu.wgmma(dp_acc, v_smem, do_smem.at[slot].T)
                    return plgpu.wgmma_accumulator_load(dp_acc, wait_n=0)

                dp = pl.run_scoped(dprobs, plgpu.ACC((ROWS, ROWS), jnp.float32))
                delta = plgpu.load(delta_smem.at[slot], layout=COL)
                plgpu.barrier_arrive(do_consumed.at[slot])
                p = take_p(t, p_smem, p_ready, p_consumed)
                ds = (p * (dp - bcast(delta, dp.shape, 1))).astype(dtype)
                plgpu.barrier_wait(q_ready.at[slot])
                mma(dk_acc, ds, q_smem.at[slot], stage_smem, interpret)
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(q_consumed.at[slot])

            for_each_block(step)
            return dk_acc[...]

        dk = pl.run_scoped(accumulate, plgpu.ACC((ROWS, v_smem.shape[-1]), jnp.float32))
        v_smem[...] = (dk * scale).astype(dtype)  # V is read by this warpgroup alone
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(v_smem, dk_ref.at[batch, keys, kv_head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == MEMORY_WG)
    def _memory_warpgroup():
        stream_query_blocks(
            q_ref, do_ref, lse_ref, delta_ref, q_smem=q_smem, do_smem=do_smem, lse_smem=lse_smem,
            delta_smem=delta_smem, q_ready=q_ready, do_ready=do_ready, q_consumed=q_consumed,
            do_consumed=do_consumed, batch=batch, kv_head=kv_head, group=group, j_lo=j_lo, n_q=n_q,
            block_q=ROWS, num_stages=num_stages, qseg=None if q_seg_ref is None else (q_seg_ref.at[batch], qseg_smem),
            q_tail=q_tail, do_tail=do_tail)


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
    q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, p_smem,
    rows_ready, k_ready, v_ready, k_consumed, v_consumed, p_ready, p_consumed,
    stage_smem=None, qseg_smem=None, kvseg_smem=None, qseg_ready=None, seq_k: int, group: int, num_q_tiles: int,
    block_kv: int, num_stages: int, causal: bool, left, right, scale: float, scale_log2: float,
    has_kv_lengths: bool, has_q_lengths: bool, has_segments: bool, interpret: bool,
):  # fmt: skip
    refs = list(refs)
    kv_len_ref = refs.pop(0) if has_kv_lengths else None
    q_len_ref = refs.pop(0) if has_q_lengths else None
    k_tail, v_tail, q_tail, do_tail = pop_tails(refs, kv_len_ref, q_len_ref)  # zeroed past the lengths
    q_seg_ref, kv_seg_ref, seg_range_ref = (refs.pop(0) for _ in range(3)) if has_segments else (None,) * 3
    (dq_ref,) = refs
    batch = lax.axis_index("batch")
    head = lax.axis_index("head")
    tile = lax.axis_index("q_tile")
    if causal:  # the longest rows first
        tile = num_q_tiles - 1 - tile
    wg = lax.axis_index("wg")
    q0 = tile * ROWS
    rows = pl.ds(q0, ROWS)
    num_kv_blocks = pl.cdiv(seq_k, block_kv)  # static
    num_whole_kv_blocks = seq_k // block_kv  # static: blocks with no key past Tk
    kv_end, kv_unmasked = jnp.int32(num_kv_blocks), jnp.int32(num_whole_kv_blocks)
    if right == 0:
        kv_end = jnp.minimum(pl.cdiv(q0 + ROWS, jnp.int32(block_kv)), kv_end)
        kv_unmasked = jnp.minimum(lax.div(q0, jnp.int32(block_kv)), kv_unmasked)
    elif right is not None:  # keys <= row + right
        kv_end = jnp.minimum(pl.cdiv(jnp.maximum(q0 + ROWS + right, 0), jnp.int32(block_kv)), kv_end)
        kv_unmasked = jnp.minimum(lax.div(jnp.maximum(q0 + right + 1, 0), jnp.int32(block_kv)), kv_unmasked)
    key_limit = seq_k if seq_k % block_kv else None  # keys at or past it are masked
    if has_kv_lengths:  # the batch row's key length (<= Tk)
        key_limit = kv_len_ref[batch]
        kv_end = jnp.minimum(pl.cdiv(key_limit, jnp.int32(block_kv)), kv_end)
        kv_unmasked = jnp.minimum(lax.div(key_limit, jnp.int32(block_kv)), kv_unmasked)
    if has_q_lengths:  # rows all past the batch row's query length: dQ = 0, no key block streamed
        kv_end = jnp.where(q0 >= q_len_ref[batch], jnp.int32(0), kv_end)
        kv_unmasked = jnp.minimum(kv_unmasked, kv_end)
    kv_first = kv_lo = jnp.int32(0)  # blocks kv_lo .. kv_unmasked - 1 need no mask
    if left is not None:  # keys >= row - left
        kv_first = jnp.minimum(lax.div(jnp.maximum(q0 - left, 0), jnp.int32(block_kv)), kv_end)
        kv_lo = jnp.clip(pl.cdiv(jnp.maximum(q0 + ROWS - 1 - left, 0), jnp.int32(block_kv)), kv_first, kv_end)
        kv_unmasked = jnp.clip(kv_unmasked, kv_lo, kv_end)
    if has_segments:  # the key blocks holding an id of these rows; masked by id outside the run of the one id
        kv_end = jnp.minimum(seg_range_ref[batch, tile, 1], kv_end)
        kv_first = jnp.minimum(jnp.maximum(seg_range_ref[batch, tile, 0], kv_first), kv_end)
        kv_lo = jnp.clip(jnp.maximum(seg_range_ref[batch, tile, 2], kv_lo), kv_first, kv_end)
        kv_unmasked = jnp.clip(jnp.minimum(seg_range_ref[batch, tile, 3], kv_unmasked), kv_lo, kv_end)
    dtype = q_smem.dtype

    @pl.when(wg == P_WG)
    def _p_warpgroup():  # S = Q K^T, P
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        copy_block(q_ref, q_tail, batch=batch, start=q0, block_rows=ROWS, head=head, dst=q_smem,
                   barrier=rows_ready.at[P_WG])
        plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem, rows_ready.at[P_WG])
        if has_segments:
            plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, rows], qseg_smem, qseg_ready)
            plgpu.barrier_wait(qseg_ready)
        plgpu.barrier_wait(rows_ready.at[P_WG])
        lse = plgpu.load(lse_smem, layout=ROW)
        q_seg = plgpu.load(qseg_smem, layout=ROW) if has_segments else None

        def step(kb, *, masked: bool):
            t = kb - kv_first  # the ring's and the P tiles' step
            slot = lax.rem(t, jnp.int32(num_stages))
            plgpu.barrier_wait(k_ready.at[slot])

            def logits(s_acc):
                plgpu.wgmma(s_acc, q_smem, k_smem.at[slot].T)
                return plgpu.wgmma_accumulator_load(s_acc, wait_n=0)

            s = pl.run_scoped(logits, plgpu.ACC((ROWS, block_kv), jnp.float32))
            kv_seg = plgpu.load(kvseg_smem.at[slot], layout=COL) if masked and has_segments else None
            plgpu.barrier_arrive(k_consumed.at[slot])
            if masked:
                s = masked_logits(s, q0, kb * block_kv, left=left, right=right, seq_k=key_limit, transposed=False)
                if has_segments:  # the same segment
                    s = jnp.where(bcast(q_seg, s.shape, 0) == bcast(kv_seg, s.shape, 1), s, -jnp.inf)
            hand_over_p(jnp.exp2(s * scale_log2 - bcast(lse, s.shape, 0)), t, p_smem, p_ready, p_consumed)

        if left is not None or has_segments:  # the window's left edge, the keys of other ids
            pl.loop(kv_first, kv_lo)(functools.partial(step, masked=True))
        pl.loop(kv_lo, kv_unmasked)(functools.partial(step, masked=False))
        if right is not None or left is not None or key_limit is not None or has_segments:
            pl.loop(kv_unmasked, kv_end)(functools.partial(step, masked=True))
        drain_p(kv_end - kv_first, p_consumed)

    @pl.when(wg == DS_WG)
    def _ds_warpgroup():  # dP = dO V^T, dS, dQ += dS K
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        copy_block(do_ref, do_tail, batch=batch, start=q0, block_rows=ROWS, head=head, dst=do_smem,
                   barrier=rows_ready.at[DS_WG])
        plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem, rows_ready.at[DS_WG])
        plgpu.barrier_wait(rows_ready.at[DS_WG])
        delta = plgpu.load(delta_smem, layout=ROW)

        def accumulate(dq_acc):
            @pl.loop(i32(0), kv_end - kv_first)
            def _step(t):
                slot = lax.rem(t, jnp.int32(num_stages))
                plgpu.barrier_wait(v_ready.at[slot])

                def dprobs(dp_acc):
                    plgpu.wgmma(dp_acc, do_smem, v_smem.at[slot].T)
                    return plgpu.wgmma_accumulator_load(dp_acc, wait_n=0)

                dp = pl.run_scoped(dprobs, plgpu.ACC((ROWS, block_kv), jnp.float32))
                plgpu.barrier_arrive(v_consumed.at[slot])
                p = take_p(t, p_smem, p_ready, p_consumed)
                ds = (p * (dp - bcast(delta, dp.shape, 0))).astype(dtype)
                plgpu.barrier_wait(k_ready.at[slot])
                mma(dq_acc, ds, k_smem.at[slot], stage_smem, interpret)
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(k_consumed.at[slot])

            return dq_acc[...]

        dq = pl.run_scoped(accumulate, plgpu.ACC((ROWS, do_smem.shape[-1]), jnp.float32))
        do_smem[...] = (dq * scale).astype(dtype)  # dO is read by this warpgroup alone
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(do_smem, dq_ref.at[batch, rows, head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == MEMORY_WG)
    def _memory_warpgroup():
        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
        stream_kv_blocks(
            k_ref, v_ref, k_smem=k_smem, v_smem=v_smem, k_ready=k_ready, v_ready=v_ready, k_consumed=k_consumed,
            v_consumed=v_consumed, batch=batch, kv_head=lax.div(head, jnp.int32(group)), num_blocks=kv_end - kv_first,
            block_kv=block_kv, num_stages=num_stages, first_block=kv_first,
            kseg=None if kv_seg_ref is None else (kv_seg_ref.at[batch], kvseg_smem), k_tail=k_tail, v_tail=v_tail)


def _constants(spec, interpret, group, seq_q: int, seq_k: int):
    within = spec.within(seq_q, seq_k)  # the window's bounds clamped for these (padded) lengths
    return dict(causal=spec.causal, left=within.left, right=within.right, scale=float(spec.scale),
                scale_log2=float(spec.scale) * LOG2E, interpret=bool(interpret), group=group)


def launch_dkdv(q, k, v, do, lse2, delta, kv_lengths=None, q_lengths=None, segments=None, *, spec, config, interpret,
                seq_q, seq_k, tails=()):
    """``(dk, dv)`` of the role-split dK/dV kernel, on arrays padded to whole 64-row tiles."""
    batch, _, num_heads, head_dim = q.shape
    _, tk_pad, num_kv_heads, _ = k.shape
    dtype, stages = q.dtype, config.num_stages
    scratch = dict(
        q_smem=tiled_smem((stages, ROWS, head_dim), dtype),
        do_smem=tiled_smem((stages, ROWS, head_dim), dtype),
        k_smem=tiled_smem((ROWS, head_dim), dtype),
        v_smem=tiled_smem((ROWS, head_dim), dtype),
        lse_smem=plgpu.SMEM((stages, ROWS), jnp.float32),
        delta_smem=plgpu.SMEM((stages, ROWS), jnp.float32),
        kv_ready=plgpu.Barrier(num_barriers=COMPUTE_WGS),
        q_ready=plgpu.Barrier(num_arrivals=3 if segments else 2, num_barriers=stages),
        do_ready=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        q_consumed=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        do_consumed=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        **p_handover_scratch(dtype, ROWS, ROWS),
    )
    if interpret:
        scratch["stage_smem"] = tiled_smem((ROWS, ROWS), dtype)
    operands = [q, k, v, do, lse2, delta, *[x for x in (kv_lengths, q_lengths) if x is not None], *tails]
    if segments is not None:  # (q ids [B, Tq pad], kv ids [B, Tk pad]); per key tile, its query blocks
        q_seg, kv_seg = segments
        scratch.update(qseg_smem=plgpu.SMEM((stages, ROWS), jnp.int32), kseg_smem=plgpu.SMEM((ROWS,), jnp.int32),
                       kseg_ready=plgpu.Barrier(num_barriers=1))
        operands += [q_seg, kv_seg, segment_block_ranges(kv_seg[:, :seq_k], q_seg[:, :seq_q], ROWS, ROWS,
                                                           tk_pad // ROWS)]
    kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
    consts = _constants(spec, interpret, num_heads // num_kv_heads, q.shape[1], k.shape[1])
    return plgpu.kernel(
        functools.partial(_dkdv_kernel, seq_q=seq_q, num_stages=stages, has_kv_lengths=kv_lengths is not None,
                          has_q_lengths=q_lengths is not None, has_segments=segments is not None, **consts),
        out_type=(kv_type, kv_type),
        scratch_types=scratch,
        grid=(batch, num_kv_heads, tk_pad // ROWS),
        grid_names=("batch", "kv_head", "kv_tile"),
        **launch_params(interpret, "pallas_flash_mosaic_bwd_wide_dkdv"),
    )(*operands)


def launch_dq(q, k, v, do, lse2, delta, kv_lengths=None, q_lengths=None, segments=None, *, spec, config, interpret,
              seq_q, seq_k, tails=()):
    """``dq`` of the role-split dQ kernel, on arrays padded to whole 64-row tiles."""
    batch, tq_pad, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    dtype = q.dtype
    stages, block_kv = config.dq_num_stages, config.dq_block_kv
    scratch = dict(
        q_smem=tiled_smem((ROWS, head_dim), dtype),
        do_smem=tiled_smem((ROWS, head_dim), dtype),
        k_smem=tiled_smem((stages, block_kv, head_dim), dtype),
        v_smem=tiled_smem((stages, block_kv, head_dim), dtype),
        lse_smem=plgpu.SMEM((ROWS,), jnp.float32),
        delta_smem=plgpu.SMEM((ROWS,), jnp.float32),
        rows_ready=plgpu.Barrier(num_arrivals=2, num_barriers=COMPUTE_WGS),
        k_ready=plgpu.Barrier(num_arrivals=2 if segments else 1, num_barriers=stages),
        v_ready=plgpu.Barrier(num_barriers=stages),
        k_consumed=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        v_consumed=plgpu.Barrier(num_barriers=stages),
        **p_handover_scratch(dtype, ROWS, block_kv),
    )
    if interpret:
        scratch["stage_smem"] = tiled_smem((ROWS, block_kv), dtype)
    num_q_tiles = tq_pad // ROWS
    operands = [q, k, v, do, lse2, delta, *[x for x in (kv_lengths, q_lengths) if x is not None], *tails]
    if segments is not None:  # (q ids [B, Tq pad], kv ids [B, Tk pad]); per query tile, its key blocks
        q_seg, kv_seg = segments
        scratch.update(qseg_smem=plgpu.SMEM((ROWS,), jnp.int32), kvseg_smem=plgpu.SMEM((stages, block_kv), jnp.int32),
                       qseg_ready=plgpu.Barrier(num_barriers=1))
        operands += [q_seg, kv_seg, segment_block_ranges(q_seg[:, :seq_q], kv_seg[:, :seq_k], ROWS, block_kv,
                                                           num_q_tiles)]
    consts = _constants(spec, interpret, num_heads // num_kv_heads, q.shape[1], k.shape[1])
    return plgpu.kernel(
        functools.partial(_dq_kernel, seq_k=seq_k, num_q_tiles=num_q_tiles, block_kv=block_kv, num_stages=stages,
                          has_kv_lengths=kv_lengths is not None, has_q_lengths=q_lengths is not None,
                          has_segments=segments is not None, **consts),
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=scratch,
        grid=(batch, num_heads, num_q_tiles),
        grid_names=("batch", "head", "q_tile"),
        **launch_params(interpret, "pallas_flash_mosaic_bwd_wide_dq"),
    )(*operands)


def launch_wide(q, k, v, do, lse2, delta, kv_lengths=None, q_lengths=None, segments=None, *, spec, config, interpret,
                seq_q, seq_k, tails=()):
    """``(dq, dk, dv)`` on arrays padded to whole 64-row tiles (``backward.mosaic_backward`` pads them).

    ``kv_lengths`` (int32 ``[B]``, at most ``Tk``): the dQ kernel masks the keys past them; the dK/dV kernel
    skips the key tiles wholly past them and computes every other key's gradients from its own column of P
    alone, so those of the keys past them in the tile across the length are replaced by zeros here, in that
    tile only (no row sees them; the tiles wholly past the length come out zero). ``q_lengths`` (int32 ``[B]``, at most ``Tq``; the rows past them load as zeros, ``tails``): both
    kernels skip the query blocks wholly past them. ``segments``: ``(q ids [B, Tq pad], kv ids [B, Tk pad])``,
    padded: each kernel streams the blocks whose ids overlap its tile's and masks them by id, but the run of
    blocks whose ids are all the tile's one id (``common.segment_block_ranges``).
    """
    common = dict(spec=spec, config=config, interpret=interpret, seq_q=seq_q, seq_k=seq_k, tails=tails)
    dk, dv = launch_dkdv(q, k, v, do, lse2, delta, kv_lengths, q_lengths, segments, **common)
    dq = launch_dq(q, k, v, do, lse2, delta, kv_lengths, q_lengths, segments, **common)
    if kv_lengths is not None:  # only the tile across the length has rows past it that are not zero
        dk, dv = (zero_straddling_rows(x, kv_lengths, ROWS) for x in (dk, dv))
    return dq, dk, dv
