"""FlashAttention backward: Pallas kernels lowered through Triton.

Three steps, none of which materialises an N x N tensor:

1. ``delta = rowsum(dO * O)`` per query row (a small XLA fusion: it reads O
   and dO once, which is all a Pallas preprocess kernel would do), and the
   log-sum-exp moved to the log2 domain with ``+inf`` for rows that see no key.
2. dK/dV: one program per (key block, batch, KV head). It keeps its K and V
   blocks and the float32 dK, dV accumulators on chip and streams the query
   blocks of every query head in its GQA group, so dK/dV are summed over the
   group in registers and K/V are never repeated in memory. It works on the
   transposed scores ``S^T = K Q^T`` so that neither P nor dS is transposed.
3. dQ: one program per (query block, batch, query head), streaming key blocks.

Both kernels recompute ``P = exp2(S - lse2)`` blockwise and visit blocks in
the same three loops as the forward: masked blocks before the fully visible
ones, the fully visible ones with no mask at all, masked blocks after.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_flash.config import BackwardConfig
from pallas_flash.spec import LOG2E, AttentionInputs, AttentionSpec
from pallas_flash.triton import common


def _dkdv_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse2_ref,
    delta_ref,
    *refs,
    spec: AttentionSpec,
    block_q: int,
    block_k: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    group: int,
):
    q_len_ref, kv_len_ref, seg, (dk_ref, dv_ref) = common.unpack_extras(refs, spec)
    kb = pl.program_id(0)
    b = pl.program_id(1)
    k0 = kb * block_k
    dp = k_ref.shape[-1]
    dmask = common.col_mask(head_dim, dp)
    q_tail = seq_q if seq_q % block_q else None
    k_tail = seq_k if seq_k % block_k else None
    c = spec.scale * LOG2E

    q_len = q_len_ref[b] if q_len_ref is not None else None
    kv_len = kv_len_ref[b] if kv_len_ref is not None else None
    seg_range = None
    k_seg = None
    if seg is not None:
        q_seg_ref, kv_seg_ref, seg_lo_ref, seg_hi_ref = seg
        seg_range = (seg_lo_ref[kb], seg_hi_ref[kb])
        k_seg = common.load_ids(kv_seg_ref, k0, block_k, limit=k_tail)[:, None]

    k = common.load_tile(k_ref, k0, block_k, limit=k_tail, dmask=dmask)
    v = common.load_tile(v_ref, k0, block_k, limit=k_tail, dmask=dmask)
    k_pos = k0 + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
    kv_limit = kv_len  # keys past seq_k are never stored, so only kv_len masks

    lo, flo, fhi, hi = common.q_block_range(
        k0,
        spec=spec,
        block_q=block_q,
        block_k=block_k,
        seq_q=seq_q,
        q_len=q_len,
        kv_len=kv_len,
        seg_range=seg_range,
    )
    if kv_len is not None:  # the block straddling kv_len needs the element mask everywhere
        straddles = (k0 + block_k) > kv_len
        flo = jnp.where(straddles, lo, flo)
        fhi = jnp.where(straddles, lo, fhi)

    def body(qb, carry, *, head, masked: bool):
        dk, dv = carry
        q0 = qb * block_q
        limit = q_tail if masked else None
        q = common.load_tile(q_ref, q0, block_q, limit=limit, dmask=dmask, head=head)
        do = common.load_tile(do_ref, q0, block_q, limit=limit, dmask=dmask, head=head)
        lse2 = common.load_row_stat(lse2_ref, q0, block_q, limit=limit, other=jnp.inf, head=head)
        delta = common.load_row_stat(delta_ref, q0, block_q, limit=limit, other=0.0, head=head)
        s_t = common.dot(k, q, trans_b=True) * c  # [bk, bq]
        p_t = jnp.exp2(s_t - lse2[None, :])
        if masked:
            q_pos = q0 + lax.broadcasted_iota(jnp.int32, (1, block_q), 1)
            q_seg = None
            if k_seg is not None:
                q_seg = common.load_ids(q_seg_ref, q0, block_q, limit=q_tail)[None, :]
            vis = common.visible(q_pos, k_pos, spec=spec, kv_limit=kv_limit, q_seg=q_seg, k_seg=k_seg)
            if vis is not None:
                p_t = jnp.where(vis, p_t, 0.0)
        dv = dv + common.dot(p_t.astype(do.dtype), do)  # [bk, dp]
        dp_t = common.dot(v, do, trans_b=True)  # [bk, bq]
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dk + common.dot(ds_t.astype(q.dtype), q)  # [bk, dp]
        return dk, dv

    carry = (jnp.zeros((block_k, dp), jnp.float32), jnp.zeros((block_k, dp), jnp.float32))
    if group == 1:
        carry = common.split_loops((lo, flo, fhi, hi), functools.partial(body, head=None), carry, any_full=seq_q >= block_q)
    else:

        def per_head(g, carry):
            g = lax.convert_element_type(g, jnp.int32)
            return common.split_loops((lo, flo, fhi, hi), functools.partial(body, head=g), carry, any_full=seq_q >= block_q)

        carry = lax.fori_loop(0, group, per_head, carry)
    dk, dv = carry
    dk = dk * spec.scale
    common.store_tile(dk_ref, dk.astype(dk_ref.dtype), k0, block_k, limit=k_tail, dmask=dmask)
    common.store_tile(dv_ref, dv.astype(dv_ref.dtype), k0, block_k, limit=k_tail, dmask=dmask)


def _dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse2_ref,
    delta_ref,
    *refs,
    spec: AttentionSpec,
    block_q: int,
    block_k: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    num_q_blocks: int,
):
    q_len_ref, kv_len_ref, seg, (dq_ref,) = common.unpack_extras(refs, spec)
    qi = pl.program_id(0)
    if spec.causal:  # heaviest query blocks first, as in the forward
        qi = num_q_blocks - 1 - qi
    b = pl.program_id(1)
    q0 = qi * block_q
    dp = q_ref.shape[-1]
    dmask = common.col_mask(head_dim, dp)
    q_tail = seq_q if seq_q % block_q else None
    k_tail = seq_k if seq_k % block_k else None
    c = spec.scale * LOG2E

    q_len = q_len_ref[b] if q_len_ref is not None else None
    kv_len = kv_len_ref[b] if kv_len_ref is not None else None
    seg_range = None
    q_seg = None
    if seg is not None:
        q_seg_ref, kv_seg_ref, seg_lo_ref, seg_hi_ref = seg
        seg_range = (seg_lo_ref[qi], seg_hi_ref[qi])
        q_seg = common.load_ids(q_seg_ref, q0, block_q, limit=q_tail)[:, None]

    q = common.load_tile(q_ref, q0, block_q, limit=q_tail, dmask=dmask)
    do = common.load_tile(do_ref, q0, block_q, limit=q_tail, dmask=dmask)
    lse2 = common.load_row_stat(lse2_ref, q0, block_q, limit=q_tail, other=jnp.inf)
    delta = common.load_row_stat(delta_ref, q0, block_q, limit=q_tail, other=0.0)
    q_pos = q0 + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    kv_limit = k_tail
    if kv_len is not None:
        kv_limit = kv_len if k_tail is None else jnp.minimum(kv_len, seq_k)

    def body(kb, dq, *, masked: bool):
        k0 = kb * block_k
        limit = k_tail if masked else None
        k = common.load_tile(k_ref, k0, block_k, limit=limit, dmask=dmask)
        v = common.load_tile(v_ref, k0, block_k, limit=limit, dmask=dmask)
        s = common.dot(q, k, trans_b=True) * c  # [bq, bk]
        p = jnp.exp2(s - lse2[:, None])
        if masked:
            k_pos = k0 + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            k_seg = None
            if q_seg is not None:
                k_seg = common.load_ids(kv_seg_ref, k0, block_k, limit=k_tail)[None, :]
            vis = common.visible(q_pos, k_pos, spec=spec, kv_limit=kv_limit, q_seg=q_seg, k_seg=k_seg)
            if vis is not None:
                p = jnp.where(vis, p, 0.0)
        dp_ = common.dot(do, v, trans_b=True)  # [bq, bk]
        ds = p * (dp_ - delta[:, None])
        return dq + common.dot(ds.astype(k.dtype), k)  # [bq, dp]

    lo, flo, fhi, hi = common.kv_block_range(
        q0,
        spec=spec,
        block_q=block_q,
        block_k=block_k,
        seq_k=seq_k,
        kv_len=kv_len,
        q_len=q_len,
        seg_range=seg_range,
    )
    dq = common.split_loops((lo, flo, fhi, hi), body, jnp.zeros((block_q, dp), jnp.float32), any_full=seq_k >= block_k)
    dq = dq * spec.scale
    common.store_tile(dq_ref, dq.astype(dq_ref.dtype), q0, block_q, limit=q_tail, dmask=dmask)


def flash_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    o: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    inputs: AttentionInputs,
    *,
    spec: AttentionSpec,
    config: BackwardConfig,
    interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients ``(dq, dk, dv)`` from the forward's residuals and the output cotangent."""
    batch, seq_q, num_heads, head_dim = q.shape
    _, seq_k, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    dp = common.pad_pow2(head_dim)
    causal = spec.causal

    # Step 1: the preprocess, in XLA.
    delta = jnp.einsum("bqnh,bqnh->bnq", o.astype(jnp.float32), do.astype(jnp.float32))
    lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E)

    # Step 2: dK, dV over key blocks, one program per KV head (summing its group).
    bq = min(config.block_q_dkv, max(16, pl.next_power_of_2(seq_q)))
    bk = min(config.block_k_dkv, max(16, pl.next_power_of_2(seq_k)))
    nk = pl.cdiv(seq_k, bk)
    # Whole-sequence blocks everywhere: kernels slice rows at absolute offsets.
    kv_block = pl.BlockSpec((None, seq_k, None, dp), lambda i, b, h: (b, 0, h, 0))
    # A KV head's whole query group: [Tq, G, Dp] (G squeezed away when 1).
    g_dim = None if group == 1 else group
    q_group = pl.BlockSpec((None, seq_q, g_dim, dp), lambda i, b, h: (b, 0, h, 0))
    stat_group = pl.BlockSpec((None, g_dim, seq_q), lambda i, b, h: (b, h, 0))
    extra_specs, extra_args = common.extra_inputs(inputs, spec, bq, bk, over="q")
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkdv_kernel,
            spec=spec,
            block_q=bq,
            block_k=bk,
            seq_q=seq_q,
            seq_k=seq_k,
            head_dim=head_dim,
            group=group,
        ),
        grid=(nk, batch, num_kv_heads),
        in_specs=[q_group, kv_block, kv_block, q_group, stat_group, stat_group, *extra_specs],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps_dkv, num_stages=config.num_stages_dkv),
        interpret=interpret,
        name="pallas_flash_bwd_dkdv",
    )(q, k, v, do, lse2, delta, *extra_args)

    # Step 3: dQ over query blocks.
    bq = min(config.block_q_dq, max(16, pl.next_power_of_2(seq_q)))
    bk = min(config.block_k_dq, max(16, pl.next_power_of_2(seq_k)))
    nq = pl.cdiv(seq_q, bq)

    q_block = pl.BlockSpec((None, seq_q, None, dp), lambda i, b, h: (b, 0, h, 0))
    kv_whole = pl.BlockSpec((None, seq_k, None, dp), lambda i, b, h: (b, 0, h // group, 0))
    stat_block = pl.BlockSpec((None, None, seq_q), lambda i, b, h: (b, h, 0))
    extra_specs, extra_args = common.extra_inputs(inputs, spec, bq, bk, over="kv")
    dq = pl.pallas_call(
        functools.partial(
            _dq_kernel,
            spec=spec,
            block_q=bq,
            block_k=bk,
            seq_q=seq_q,
            seq_k=seq_k,
            head_dim=head_dim,
            num_q_blocks=nq,
        ),
        grid=(nq, batch, num_heads),
        in_specs=[q_block, kv_whole, kv_whole, q_block, stat_block, stat_block, *extra_specs],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps_dq, num_stages=config.num_stages_dq),
        interpret=interpret,
        name="pallas_flash_bwd_dq",
    )(q, k, v, do, lse2, delta, *extra_args)
    return dq, dk, dv
