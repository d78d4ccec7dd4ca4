"""FlashAttention forward for Hopper (sm_90): a Pallas kernel on the Mosaic GPU backend.

One CTA computes ``2 * block_q`` query rows of one (batch, head) with three
warpgroups (FlashAttention-3's layout):

- the memory warpgroup streams the K and V blocks of the CTA's KV head with
  TMA into a ring of ``num_stages`` swizzled shared-memory slots. ``k_ready`` /
  ``v_ready`` say a slot has landed; ``k_consumed`` / ``v_consumed`` (one
  arrival per compute warpgroup) say both compute warpgroups are done with it;
- two compute warpgroups each own ``block_q`` rows (a TMA-loaded Q tile in
  shared memory) and loop over the key blocks: ``S = Q K^T`` by wgmma into
  registers, the online softmax in the log2 domain (``exp2`` with the scale and
  log2(e) folded into one multiply-add), then ``O += P V`` by wgmma with P
  from registers. The two warpgroups take turns on the tensor cores, so that
  one warpgroup's softmax overlaps the other's matrix products, in one of two
  schedules (``MosaicForwardConfig.overlap``):

  - turn-taking (``overlap=False``): per key block, ``S = Q K^T``, hand the
    turn over, softmax, take it back, ``O += P V``; ``wg_turn`` is the
    rendezvous both warpgroups arrive at to hand the turn over;
  - intra-warpgroup overlap (``overlap=True``, FlashAttention-3's): block
    ``j + 1``'s ``S`` is issued together with block ``j``'s ``P V``, and the
    softmax of ``S`` runs while ``P V`` is still on the tensor cores (``O`` is
    rescaled after it lands). ``wg_token[w]`` is warpgroup ``w``'s token to
    issue, passed to the partner right after it has issued. Masked blocks wait
    for ``P V`` before they are masked: masking while it is in flight makes
    ptxas serialize every wgmma of the kernel (its warning C7513). Faster from
    head dim 128 on, slower at 64, where the softmax bounds a block
    (``config._default_forward`` has the measurements).

Causal attention is a loop split: key blocks every row of the warpgroup sees
entirely run with no mask; the blocks on the diagonal are masked; blocks no row
sees are never loaded. A warpgroup that needs fewer key blocks than its
partner (the first of the two, under causal) still takes its turns and
releases their slots, so the two stay in step. GQA: query head ``h`` reads KV
head ``h // (N / K)``; K/V are never repeated.

Lengths: the sequence lengths need not be block multiples. TMA reads past the
end of an array give zeros and its writes there are dropped; logits of keys
``>= Tk`` are masked in the last key block. (Lengths that are not multiples of
8, and arrays shorter than one block, are zero-padded by the launcher: the
tiled TMA copies need whole 8-row tiles.)

Outputs: ``out [B, Tq, N, H]`` and ``lse2 [B, N, Tq]`` float32, the log-sum-exp
in the log2 domain (``m + log2(l)`` with ``m`` the running max of the scaled
log2 logits), exactly what the backward kernels (Mosaic and Triton) read.

Interpret mode (``interpret=True``: Mosaic GPU's ``InterpretGPUParams`` on the
CPU) runs this kernel with its warpgroups as threads: TMA copies (out-of-bounds
rows read as zeros, writes dropped), mbarriers (arrive/wait, transaction
counts; the interpreter also checks that each waiting warpgroup observes every
phase), wgmma from shared-memory operands into ``plgpu.ACC`` scratch,
``commit_smem``, smem-to-gmem copies and ``set_max_registers`` (a no-op);
its race detector (``detect_races=True``) finds no race in this kernel. Two
things the GPU path uses fail there in jax 0.11.2: ``pl.run_state`` with
``plgpu.ACC.init`` (no interpreter rule; it reaches XLA lowering and fails with
"Cannot lower jaxpr with effects: {...WGMMAPipelineEffect...}") and a wgmma
whose left operand is a register array (the interpreter reads both operands as
shared-memory allocations: "ValueError: Expected shape (6,) but got (64, 64)").
In interpret mode alone, P is therefore staged through shared memory and ``P V``
goes into a fresh accumulator added in registers; every other line (pipeline,
barriers, masks, softmax, stores) is the GPU's.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_flash.backends.mosaic_gpu.common import (
    COMPUTE_REGISTERS,
    COMPUTE_WGS,
    MEMORY_WG,
    ROW,
    WGMMA,
    i32,
    launch_params,
    stream_kv_blocks,
    tiled_smem,
)
from pallas_flash.backends.mosaic_gpu.config import MosaicForwardConfig
from pallas_flash.spec import LOG2E, AttentionInputs, AttentionSpec

__all__ = ["mosaic_forward"]

_RCP_LN2 = 1.0 / math.log(2.0)


def _row_bcast(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


def _forward_kernel(
    q_ref,
    k_ref,
    v_ref,
    out_ref,
    lse_ref,
    *,
    qo_smem,
    k_smem,
    v_smem,
    lse_smem,
    q_ready,
    k_ready,
    v_ready,
    k_consumed,
    v_consumed,
    wg_turn=None,
    wg_token=None,
    p_smem=None,
    seq_k: int,
    group: int,
    num_q_tiles: int,
    block_q: int,
    block_kv: int,
    num_stages: int,
    causal: bool,
    scale_log2: float,
    overlap: bool,
    interpret: bool,
):
    batch = lax.axis_index("batch")
    head = lax.axis_index("head")
    tile = lax.axis_index("q_tile")
    if causal:  # the longest rows first, so the last wave is made of short ones
        tile = num_q_tiles - 1 - tile
    wg = lax.axis_index("wg")
    cta_q0 = tile * (COMPUTE_WGS * block_q)
    num_kv_blocks = pl.cdiv(seq_k, block_kv)  # static
    num_whole_kv_blocks = seq_k // block_kv  # static: blocks with no key past Tk
    dtype = qo_smem.dtype
    fold_scale = scale_log2 > 0  # max(s) * c == max(s * c) only for c > 0
    sum_before_pv = qo_smem.shape[-1] <= 128

    def kv_blocks_seen(q_end):
        """Key blocks that rows ``< q_end`` see (at least one: every row sees key 0)."""
        if not causal:
            return num_kv_blocks
        return jnp.minimum(pl.cdiv(q_end, jnp.int32(block_kv)), jnp.int32(num_kv_blocks))

    cta_kv_blocks = kv_blocks_seen(cta_q0 + COMPUTE_WGS * block_q)

    needs_mask = causal or seq_k % block_kv != 0  # static: some key block is masked

    def mask(s, kb, q_base):
        """Logits of keys past ``Tk`` and, under causal, of keys after the row set to -inf."""
        cols = kb * block_kv + plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=WGMMA)
        visible = None
        if seq_k % block_kv:
            visible = cols < seq_k
        if causal:
            rows = q_base + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=WGMMA)
            before = rows >= cols
            visible = before if visible is None else visible & before
        return jnp.where(visible, s, -jnp.inf)

    def softmax(s, m):
        """Online softmax in the log2 domain: ``(p, m_new, alpha)``, ``m`` the running max of s * scale * log2(e)."""
        if fold_scale:
            m_new = jnp.maximum(m, s.max(axis=1) * scale_log2)
            p = jnp.exp2(s * scale_log2 - _row_bcast(m_new, s.shape))
        else:
            s = s * scale_log2
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp2(s - _row_bcast(m_new, s.shape))
        return p, m_new, jnp.exp2(m - m_new)

    def release(kb):
        """A block only the partner warpgroup sees: observe its arrival and release its slots."""
        slot = lax.rem(kb, jnp.int32(num_stages))
        plgpu.barrier_wait(k_ready.at[slot])
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_arrive(k_consumed.at[slot])
        plgpu.barrier_arrive(v_consumed.at[slot])

    def take_turn():
        plgpu.barrier_arrive(wg_turn)
        plgpu.barrier_wait(wg_turn)

    def turn_taking_loop(q_smem, q_base, kv_end, kv_unmasked, carry):
        """Per key block: S = Q K^T, hand the turn over, softmax, take the turn back, O += P V."""
        plgpu.barrier_wait(k_ready.at[0])
        pl.when(wg == 1)(take_turn)  # one turn behind: warpgroup 0 goes first

        def kv_step(kb, carry, *, masked: bool):
            acc, m, l = carry
            slot = lax.rem(kb, jnp.int32(num_stages))

            def qk(s_ref):
                plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].T)
                take_turn()
                return s_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])
            if masked:
                s = mask(s, kb, q_base)
            p, m_new, alpha = softmax(s, m)
            acc = acc * _row_bcast(alpha, acc.shape)
            l = l * alpha
            p16 = p.astype(dtype)
            if sum_before_pv:  # (the order FA3-style Mosaic kernels found fastest: before the PV turn up to D=128)
                l = l + p.sum(axis=1)
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))

            plgpu.barrier_arrive(wg_turn)
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(wg_turn)

            def wait_next_k():
                @pl.when(kb + 1 < kv_end)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(kb + 1, jnp.int32(num_stages))])

            if interpret:
                p_tile = p_smem.at[wg]
                p_tile[...] = p16
                plgpu.commit_smem()

                def pv_fresh(o_ref):
                    plgpu.wgmma(o_ref, p_tile, v_smem.at[slot])
                    wait_next_k()
                    return o_ref[...]

                acc = acc + pl.run_scoped(pv_fresh, plgpu.ACC(acc.shape, jnp.float32))
                if not sum_before_pv:
                    l = l + p.sum(axis=1)
            else:

                def pv(refs):
                    o_ref, l_ref = refs
                    plgpu.wgmma(o_ref, p16, v_smem.at[slot])
                    if not sum_before_pv:  # while the wgmma runs
                        l_ref[...] += p.sum(axis=1)
                    wait_next_k()

                acc, l = pl.run_state(pv)((plgpu.ACC.init(acc), l))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l

        carry = lax.fori_loop(i32(0), i32(kv_unmasked), functools.partial(kv_step, masked=False), carry)
        if needs_mask:
            carry = lax.fori_loop(i32(kv_unmasked), i32(kv_end), functools.partial(kv_step, masked=True), carry)

        @pl.loop(i32(kv_end), i32(cta_kv_blocks))
        def _release_unseen(kb):
            release(kb)  # (and keep the turns in step)
            take_turn()
            take_turn()

        pl.when(wg == 0)(take_turn)
        return carry

    def overlapped_loop(q_smem, q_base, kv_end, kv_unmasked, carry):
        """FlashAttention-3's intra-warpgroup overlap: block ``kb``'s ``S = Q K^T`` is issued with block
        ``kb - 1``'s ``O += P V``, and the softmax of ``S`` runs while ``P V`` is still on the tensor cores.

        The two warpgroups take turns issuing: ``wg_token[w]`` is warpgroup ``w``'s token, passed to the
        partner right after each issue (warpgroup 1 hands warpgroup 0 the first one). Each warpgroup has
        ``cta_kv_blocks + 1`` turns, blocks it does not see included, so the turns stay in step.
        """
        acc, m, l = carry
        p_tile = p_smem.at[wg] if interpret else None

        def issue_turn(issue):
            plgpu.barrier_wait(wg_token.at[wg])
            issue()
            plgpu.barrier_arrive(wg_token.at[1 - wg])

        def scores_and_softmax(kb, m, l, *, masked, pv_ref=None, p16=None):
            """Issue S = Q K_kb^T (and O += P V_{kb-1} into ``pv_ref``); ``(p, m_new, alpha, l_new)`` of S."""
            k_slot = lax.rem(kb, jnp.int32(num_stages))
            v_slot = lax.rem(kb - 1, jnp.int32(num_stages))

            def scoped(s_ref):
                def issue():
                    plgpu.wgmma(s_ref, q_smem, k_smem.at[k_slot].T)
                    if pv_ref is not None:
                        plgpu.wgmma(pv_ref, p_tile if interpret else p16, v_smem.at[v_slot])

                issue_turn(issue)
                # Masked blocks wait for P V too: masking S while P V is in flight makes ptxas serialize
                # every wgmma of the kernel ("non wgmma instructions defining input registers of a wgmma").
                return plgpu.wgmma_accumulator_load(s_ref, wait_n=0 if pv_ref is None or masked else 1)

            s = pl.run_scoped(scoped, plgpu.ACC((block_q, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[k_slot])
            if masked:
                s = mask(s, kb, q_base)
            p, m_new, alpha = softmax(s, m)
            return p, m_new, alpha, l * alpha + p.sum(axis=1)

        def stage_p(p16):
            if interpret:  # the next P V reads P from shared memory
                p_tile[...] = p16
                plgpu.commit_smem()

        pl.when(wg == 1)(lambda: plgpu.barrier_arrive(wg_token.at[0]))  # warpgroup 0 goes first
        plgpu.barrier_wait(k_ready.at[0])
        p, m, _, l = scores_and_softmax(i32(0), m, l, masked=needs_mask)
        p16 = p.astype(dtype)
        stage_p(p16)

        def kv_step(j, carry, *, masked: bool):
            acc, m, l, p16 = carry
            v_slot = lax.rem(j, jnp.int32(num_stages))
            plgpu.barrier_wait(k_ready.at[lax.rem(j + 1, jnp.int32(num_stages))])
            plgpu.barrier_wait(v_ready.at[v_slot])
            if interpret:

                def pv_fresh(o_ref):
                    out = scores_and_softmax(j + 1, m, l, masked=masked, pv_ref=o_ref)
                    return (*out, o_ref[...])

                p, m, alpha, l, pv = pl.run_scoped(pv_fresh, plgpu.ACC(acc.shape, jnp.float32))
                acc = acc + pv
                p16 = p.astype(dtype)
                stage_p(p16)
            else:

                def pv(refs):
                    o_ref, m_ref, l_ref, alpha_ref, p_ref = refs
                    p, m_new, alpha, l_new = scores_and_softmax(j + 1, m, l, masked=masked, pv_ref=o_ref, p16=p16)
                    m_ref[...] = m_new
                    l_ref[...] = l_new
                    alpha_ref[...] = alpha
                    p_ref[...] = p.astype(dtype)

                acc, m, l, alpha, p16 = pl.run_state(pv)((plgpu.ACC.init(acc), m, l, m, p16))
            plgpu.barrier_arrive(v_consumed.at[v_slot])
            return acc * _row_bcast(alpha, acc.shape), m, l, p16

        # Step j finishes block j's P V and starts block j + 1's S; block j + 1 is masked from kv_unmasked on.
        carry = (acc, m, l, p16)
        last_unmasked_step = jnp.maximum(i32(kv_unmasked) - 1, 0)
        carry = lax.fori_loop(i32(0), last_unmasked_step, functools.partial(kv_step, masked=False), carry)
        if needs_mask:
            carry = lax.fori_loop(last_unmasked_step, i32(kv_end) - 1, functools.partial(kv_step, masked=True), carry)
        acc, m, l, p16 = carry

        slot = lax.rem(i32(kv_end) - 1, jnp.int32(num_stages))
        plgpu.barrier_wait(v_ready.at[slot])
        if interpret:

            def pv_fresh(o_ref):
                issue_turn(lambda: plgpu.wgmma(o_ref, p_tile, v_smem.at[slot]))
                return o_ref[...]

            acc = acc + pl.run_scoped(pv_fresh, plgpu.ACC(acc.shape, jnp.float32))
        else:
            acc = pl.run_state(lambda o_ref: issue_turn(lambda: plgpu.wgmma(o_ref, p16, v_smem.at[slot])))(
                plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_consumed.at[slot])

        @pl.loop(i32(kv_end), i32(cta_kv_blocks))
        def _release_unseen(kb):
            release(kb)
            issue_turn(lambda: None)

        pl.when(wg == 0)(lambda: plgpu.barrier_wait(wg_token.at[0]))  # warpgroup 1's last hand-over
        return acc, m, l

    @pl.when(wg < COMPUTE_WGS)
    def _compute_warpgroup():
        plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
        q_base = cta_q0 + wg * block_q
        q_smem = qo_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_base, block_q), head], q_smem, q_ready.at[wg])
        kv_end = kv_blocks_seen(q_base + block_q)
        if causal:  # blocks whose every key is <= every row of this warpgroup, and < Tk
            kv_unmasked = jnp.minimum(lax.div(q_base, jnp.int32(block_kv)), jnp.int32(num_whole_kv_blocks))
        else:
            kv_unmasked = num_whole_kv_blocks

        m = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), ROW)
        l = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), ROW)
        acc = plgpu.layout_cast(jnp.zeros((block_q, q_smem.shape[-1]), jnp.float32), WGMMA)
        plgpu.barrier_wait(q_ready.at[wg])
        loop = overlapped_loop if overlap else turn_taking_loop
        acc, m, l = loop(q_smem, q_base, kv_end, kv_unmasked, (acc, m, l))

        # Every row sees at least key 0, so l >= 1.
        q_smem[...] = (acc * _row_bcast(1.0 / l, acc.shape)).astype(dtype)
        lse_smem[wg] = m + jnp.log(l) * _RCP_LN2
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, pl.ds(q_base, block_q), head])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(q_base, block_q)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == MEMORY_WG)
    def _memory_warpgroup():
        stream_kv_blocks(
            k_ref, v_ref, k_smem=k_smem, v_smem=v_smem, k_ready=k_ready, v_ready=v_ready, k_consumed=k_consumed,
            v_consumed=v_consumed, batch=batch, kv_head=lax.div(head, jnp.int32(group)), num_blocks=cta_kv_blocks,
            block_kv=block_kv, num_stages=num_stages)


def _pad_seq(x: jax.Array, length: int) -> jax.Array:
    if x.shape[1] == length:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _padded_length(n: int, block: int) -> int:
    """``n`` rounded up to whole 8-row tiles, and to at least one block."""
    return max(-(-n // 8) * 8, block)


def mosaic_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    inputs: AttentionInputs,
    *,
    spec: AttentionSpec,
    config: MosaicForwardConfig,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``(out [B, Tq, N, H], lse2 [B, N, Tq] float32)`` of plain or causal attention, GQA allowed.

    The caller (``MosaicBackend.supports``) has checked the call: no masks,
    bias, lengths, segments, ALiBi, soft-cap, dropout, window or offsets;
    bf16/fp16; head dim 64, 128 or 256.
    """
    del inputs  # nothing beside q, k, v in the calls this kernel takes
    batch, seq_q, num_heads, head_dim = q.shape
    _, seq_k, num_kv_heads, _ = k.shape
    config.check_fits(head_dim, q.dtype)
    block_q, block_kv = config.block_q, config.block_kv
    rows_per_cta = COMPUTE_WGS * block_q

    q_pad = _pad_seq(q, _padded_length(seq_q, rows_per_cta))
    k_pad = _pad_seq(k, _padded_length(seq_k, block_kv))
    v_pad = _pad_seq(v, _padded_length(seq_k, block_kv))
    num_q_tiles = pl.cdiv(seq_q, rows_per_cta)
    lse_len = num_q_tiles * rows_per_cta  # whole tiles: the lse rows are written by 1-D TMA copies

    kernel = functools.partial(
        _forward_kernel,
        seq_k=seq_k,
        group=num_heads // num_kv_heads,
        num_q_tiles=num_q_tiles,
        block_q=block_q,
        block_kv=block_kv,
        num_stages=config.num_stages,
        causal=spec.causal,
        scale_log2=float(spec.scale) * LOG2E,
        overlap=config.overlap,
        interpret=interpret,
    )
    dtype = q.dtype
    scratch = dict(
        qo_smem=tiled_smem((COMPUTE_WGS, block_q, head_dim), dtype),
        k_smem=tiled_smem((config.num_stages, block_kv, head_dim), dtype),
        v_smem=tiled_smem((config.num_stages, block_kv, head_dim), dtype),
        lse_smem=plgpu.SMEM((COMPUTE_WGS, block_q), jnp.float32),
        q_ready=plgpu.Barrier(num_barriers=COMPUTE_WGS),
        k_ready=plgpu.Barrier(num_barriers=config.num_stages),
        v_ready=plgpu.Barrier(num_barriers=config.num_stages),
        k_consumed=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=config.num_stages),
        v_consumed=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=config.num_stages),
    )
    if config.overlap:  # each warpgroup's token for issuing wgmmas
        scratch["wg_token"] = plgpu.Barrier(num_arrivals=1, num_barriers=COMPUTE_WGS)
    else:  # the rendezvous both warpgroups arrive at to hand the turn over
        scratch["wg_turn"] = plgpu.Barrier(num_arrivals=COMPUTE_WGS)
    if interpret:  # P staged through shared memory (see the module docstring)
        scratch["p_smem"] = tiled_smem((COMPUTE_WGS, block_q, block_kv), dtype)
    out_shape = (
        jax.ShapeDtypeStruct(q_pad.shape, dtype),
        jax.ShapeDtypeStruct((batch, num_heads, lse_len), jnp.float32),
    )
    out, lse2 = plgpu.kernel(
        kernel,
        out_type=out_shape,
        scratch_types=scratch,
        grid=(batch, num_heads, num_q_tiles),
        grid_names=("batch", "head", "q_tile"),
        **launch_params(interpret),
    )(q_pad, k_pad, v_pad)
    return out[:, :seq_q], lse2[:, :, :seq_q]
