"""FlashAttention backward: Pallas kernels lowered through Triton.

Three steps, none of which materialises an N x N tensor:

1. ``delta = rowsum(dO * O) - dlse`` per query row (a small XLA fusion: it
   reads O and dO once, which is all a Pallas preprocess kernel would do), and
   the forward's log2-domain log-sum-exp with ``+inf`` for rows that see no key.
   (The forward stores it in the log2 domain, so the backward recomputes
   exactly the forward's ``exp2`` arguments: a round trip through the natural
   log would cost ``|lse| * 2^-24`` in the exponent, 40% at logits of 1e6.)
2. dK/dV: one program per (key block, batch, KV head). It keeps its K and V
   blocks and the float32 dK, dV accumulators on chip and streams the query
   blocks of every query head in its GQA group, so dK/dV are summed over the
   group in registers and K/V are never repeated in memory. It works on the
   transposed scores ``S^T = K Q^T`` so that neither P nor dS is transposed.
3. dQ: one program per (query block, batch, query head), streaming key blocks.

Both kernels recompute ``P = exp2(S - lse2)`` blockwise and visit blocks in
the same three loops as the forward: masked blocks before the fully visible
ones, the fully visible ones with no mask at all, masked blocks after.

With the optional features: the logits are rebuilt exactly as in the forward
(bias tiles, ALiBi, soft-cap); dropout regenerates the forward's keep bits, so
dV uses the dropped ``P * keep / (1 - rate)`` and ``dP`` flows only through
kept weights (``delta = rowsum(dO * O)`` is unchanged); the soft-cap scales dS
by ``1 - tanh^2``. The bias gradient is dS itself: the dQ kernel, which holds
``[block_q, block_k]`` dS tiles, writes them into a zero-initialised
``[B, N, Tq, Tk]`` buffer (only when the bias is being differentiated) and XLA
sums it over the bias's broadcast dims; the ALiBi slopes' gradient is the dQ
kernel's per-row sum of ``dS * (j - i)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_flash.backends.base import Gradients, softmax_delta
from pallas_flash.backends.triton import blocks, tiles
from pallas_flash.backends.triton.config import BackwardConfig, padded_head_dim
from pallas_flash.backends.triton.program import (
    Program,
    QueryBlock,
    dropout_keep,
    dropout_key,
    key_minus_query,
    log2_logits,
    visible,
)
from pallas_flash.backends.triton.side_inputs import SideInputs, alibi_slope, side_inputs
from pallas_flash.spec import LOG2E, AttentionInputs, AttentionSpec


def _dkdv_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse2_ref,
    delta_ref,
    side: SideInputs,
    dk_ref,
    dv_ref,
    *,
    spec: AttentionSpec,
    block_q: int,
    block_k: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    num_heads: int,
    group: int,
):
    prog = Program.enter(
        k_ref, side, spec=spec, block_rows=block_k, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k,
        head_dim=head_dim, rows="k",
    )
    b, kv_head, k0, dim_mask = prog.b, prog.head, prog.start, prog.dim_mask
    q_tail, k_tail, kv_len, k_seg = prog.q_tail, prog.k_tail, prog.kv_len, prog.own_seg
    qk_scale_log2 = spec.scale * LOG2E
    inv_keep = 1.0 / (1.0 - spec.dropout_rate)

    # Keys past the key length read as zero: 0 * garbage (NaN) would otherwise reach dV and dK's products.
    kv_load_limit = prog.kv_load_limit
    k = tiles.load_tile(k_ref, k0, block_k, limit=kv_load_limit, dim_mask=dim_mask)
    v = tiles.load_tile(v_ref, k0, block_k, limit=kv_load_limit, dim_mask=dim_mask)
    k_pos = k0 + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
    kv_limit = kv_len  # keys past seq_k are never stored, so only kv_len masks
    # Query rows past the query length read as zero (lse2 as +inf: P = 0) in the masked blocks, where the block
    # straddling the length is (``q_block_range``): garbage (NaN) there would otherwise reach dK and dV.
    q_load_limit = prog.q_load_limit

    lo, full_lo, full_hi, hi = blocks.q_block_range(
        k0,
        spec=spec,
        block_q=block_q,
        block_k=block_k,
        seq_q=seq_q,
        q_len=prog.q_len,
        kv_len=kv_len,
        seg_range=prog.seg_range,
        seq_k=seq_k,
    )
    if kv_len is not None:  # the block straddling kv_len needs the element mask everywhere
        straddles = (k0 + block_k) > kv_len
        full_lo = blocks.where_index(straddles, lo, full_lo)
        full_hi = blocks.where_index(straddles, lo, full_hi)

    def dense_tile(ref, q0, q_limit, other, g):
        # [block_q, block_k] tile of the (b, query head) plane, transposed to [bk, bq].
        head = g if ref.ndim == 3 else None
        tile = tiles.load_qk_tile(ref, q0, k0, block_q, block_k, q_limit=q_limit, k_limit=k_tail, other=other, head=head)
        return tile.T

    def body(qb, carry, *, g, slope, drop_key, masked: bool):
        dk, dv = carry
        q0 = qb * block_q
        limit = q_load_limit if masked else None
        q = tiles.load_tile(q_ref, q0, block_q, limit=limit, dim_mask=dim_mask, head=g)
        do = tiles.load_tile(do_ref, q0, block_q, limit=limit, dim_mask=dim_mask, head=g)
        lse2 = tiles.load_row_stat(lse2_ref, q0, block_q, limit=limit, other=jnp.inf, head=g)
        delta = tiles.load_row_stat(delta_ref, q0, block_q, limit=limit, other=0.0, head=g)
        q_pos = None  # query positions only where something reads them
        if masked or not spec.plain_logits or spec.has_dropout:
            q_pos = q0 + lax.broadcasted_iota(jnp.int32, (1, block_q), 1)
        s_t = tiles.dot(k, q, trans_b=True)  # [bk, bq]
        tanh_t = None
        if spec.plain_logits:
            s_t = s_t * qk_scale_log2
        else:
            bias = dense_tile(side.bias, q0, limit, 0.0, g) if side.bias is not None else None
            s_t, tanh_t = log2_logits(s_t, spec=spec, q_pos=q_pos, k_pos=k_pos, bias=bias, slope=slope)
        p_t = jnp.exp2(s_t - lse2[None, :])
        vis = None
        if masked:
            q_seg = None
            if k_seg is not None:
                q_seg = tiles.load_ids(side.segments.q_ids, q0, block_q, limit=q_tail)[None, :]
            vis = visible(q_pos, k_pos, spec=spec, kv_limit=kv_limit, q_seg=q_seg, k_seg=k_seg)
        if side.mask is not None:
            tile = dense_tile(side.mask, q0, limit, False, g)
            vis = tile if vis is None else (vis & tile)
        if vis is not None:
            p_t = jnp.where(vis, p_t, 0.0)
        # dV before dP: the order of the products the H100 measurements were taken with.
        if drop_key is not None:  # dV sees the dropped P; dP flows only through kept weights
            keep_t = dropout_keep(drop_key, q_pos, k_pos, spec=spec)
            dv = dv + tiles.dot((jnp.where(keep_t, p_t, 0.0) * inv_keep).astype(do.dtype), do)
            dp_t = jnp.where(keep_t, tiles.dot(v, do, trans_b=True), 0.0) * inv_keep
        else:
            dv = dv + tiles.dot(p_t.astype(do.dtype), do)  # [bk, head_dim_padded]
            dp_t = tiles.dot(v, do, trans_b=True)  # dP^T [bk, bq]
        ds_t = p_t * (dp_t - delta[None, :])
        if tanh_t is not None:  # through the soft-cap: d(cap*tanh(x/cap))/dx = 1 - tanh^2
            ds_t = ds_t * (1.0 - tanh_t * tanh_t)
        dk = dk + tiles.dot(ds_t.astype(q.dtype), q)  # [bk, head_dim_padded]
        return dk, dv

    def head_loops(g, carry):
        hq = kv_head * group + (0 if g is None else g)
        fn = functools.partial(
            body,
            g=g,
            slope=alibi_slope(side, b, hq),
            drop_key=dropout_key(side, b, hq, num_heads),
        )
        return blocks.split_loops((lo, full_lo, full_hi, hi), fn, carry, any_full=seq_q >= block_q)

    carry = (jnp.zeros((block_k, prog.head_dim_padded), jnp.float32), jnp.zeros((block_k, prog.head_dim_padded), jnp.float32))
    if group == 1:
        carry = head_loops(None, carry)
    else:
        carry = lax.fori_loop(0, group, lambda g, c_: head_loops(lax.convert_element_type(g, jnp.int32), c_), carry)
    dk, dv = carry
    dk = dk * spec.scale
    tiles.store_tile(dk_ref, dk.astype(dk_ref.dtype), k0, block_k, limit=k_tail, dim_mask=dim_mask)
    tiles.store_tile(dv_ref, dv.astype(dv_ref.dtype), k0, block_k, limit=k_tail, dim_mask=dim_mask)


def _dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse2_ref,
    delta_ref,
    side: SideInputs,
    *outs,
    spec: AttentionSpec,
    block_q: int,
    block_k: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    num_heads: int,
    num_q_blocks: int,
    want_dbias: bool,
    want_dslopes: bool,
):
    outs = list(outs)
    ds_ref = dslope_ref = None
    if want_dbias:
        outs.pop(0)  # the zeros that ds_ref aliases
    dq_ref = outs.pop(0)
    if want_dslopes:
        dslope_ref = outs.pop(0)
    if want_dbias:
        ds_ref = outs.pop(0)
    qb = QueryBlock.enter(
        q_ref, side, spec=spec, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k, head_dim=head_dim,
        num_heads=num_heads, num_q_blocks=num_q_blocks,
    )
    prog = qb.program
    q0, dim_mask, q_tail, k_tail = prog.start, prog.dim_mask, prog.q_tail, prog.k_tail
    qk_scale_log2 = spec.scale * LOG2E
    inv_keep = 1.0 / (1.0 - spec.dropout_rate)

    # Rows past the query length read as zero (lse2 as +inf, so P = 0 there): a query block straddling the length
    # is computed whole, and garbage (NaN) in those rows would otherwise reach their dQ rows, dS and the slopes.
    q_load_limit = prog.q_load_limit
    q = tiles.load_tile(q_ref, q0, block_q, limit=q_load_limit, dim_mask=dim_mask)
    do = tiles.load_tile(do_ref, q0, block_q, limit=q_load_limit, dim_mask=dim_mask)
    lse2 = tiles.load_row_stat(lse2_ref, q0, block_q, limit=q_load_limit, other=jnp.inf)
    delta = tiles.load_row_stat(delta_ref, q0, block_q, limit=q_load_limit, other=0.0)
    q_pos = q0 + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    qb = qb.with_positions(q_pos)
    # Keys past the key length read as zero (a block straddling it is a masked one): 0 * garbage (NaN) would
    # otherwise reach dP = dO V^T and dQ = dS K.
    kv_load_limit = prog.kv_load_limit

    def body(kb, carry, *, masked: bool):
        dq, dslope = carry
        k0 = kb * block_k
        limit = k_tail if masked else None
        k = tiles.load_tile(k_ref, k0, block_k, limit=kv_load_limit if masked else None, dim_mask=dim_mask)
        v = tiles.load_tile(v_ref, k0, block_k, limit=kv_load_limit if masked else None, dim_mask=dim_mask)
        k_pos = None  # key positions only where something reads them
        if masked or not spec.plain_logits or spec.has_dropout:
            k_pos = k0 + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        s = tiles.dot(q, k, trans_b=True)  # [bq, bk]
        tanh = None
        if spec.plain_logits:
            s = s * qk_scale_log2
        else:
            s, tanh = qb.logits(s, k0, k_pos, limit)
        p = jnp.exp2(s - lse2[:, None])
        vis = qb.visible(k0, k_pos, masked=masked, k_limit=limit)
        if vis is not None:
            p = jnp.where(vis, p, 0.0)
        dp = tiles.dot(do, v, trans_b=True)  # dP [bq, bk]
        if qb.drop_key is not None:
            keep = dropout_keep(qb.drop_key, q_pos, k_pos, spec=spec)
            dp = jnp.where(keep, dp, 0.0) * inv_keep
        ds = p * (dp - delta[:, None])  # d loss / d logits (natural units)
        if ds_ref is not None:  # the bias gradient is dS itself
            tiles.store_qk_tile(ds_ref, ds.astype(ds_ref.dtype), q0, k0, q_limit=q_tail, k_limit=limit)
        if dslope_ref is not None:  # d/d slope of slope * (j - i)
            dslope = dslope + jnp.sum(ds * key_minus_query(q_pos, k_pos, spec).astype(jnp.float32), axis=1)
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        return dq + tiles.dot(ds.astype(k.dtype), k), dslope  # [bq, head_dim_padded]

    kv_blocks = qb.kv_range()
    dslope0 = jnp.zeros((block_q,), jnp.float32) if dslope_ref is not None else None
    carry = (jnp.zeros((block_q, prog.head_dim_padded), jnp.float32), dslope0)
    dq, dslope = blocks.split_loops(kv_blocks, body, carry, any_full=seq_k >= block_k)
    if dslope_ref is not None:
        tiles.store_row_stat(dslope_ref, dslope, q0, block_q, limit=q_tail)
    dq = dq * spec.scale
    tiles.store_tile(dq_ref, dq.astype(dq_ref.dtype), q0, block_q, limit=q_tail, dim_mask=dim_mask)


def flash_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse2: jax.Array,
    do: jax.Array,
    dlse: jax.Array | None,
    inputs: AttentionInputs,
    *,
    spec: AttentionSpec,
    config: BackwardConfig,
    interpret: bool,
    want_dbias: bool = False,
    want_dslopes: bool = False,
) -> Gradients:
    """Gradients from the forward's residuals and the cotangents of the output and (optionally) the log-sum-exp.

    ``dbias`` (``None`` unless ``want_dbias``) has the bias's own shape and
    dtype: the dQ kernel writes dS ``[B, N, Tq, Tk]`` (float32; fully skipped
    blocks stay zero) and XLA sums it over the bias's broadcast dims.
    ``dslopes`` (``None`` unless ``want_dslopes``) has the ALiBi slopes' shape:
    the dQ kernel writes per-row sums of ``dS * (j - i)``, XLA sums the rows.
    """
    batch, seq_q, num_heads, head_dim = q.shape
    _, seq_k, num_kv_heads, _ = k.shape
    spec = spec.within(seq_q, seq_k)  # window/offset bounds clamped: no int32 overflow in block arithmetic
    group = num_heads // num_kv_heads
    head_dim_padded = padded_head_dim(head_dim)

    # Step 1: the preprocess, in XLA.
    delta = softmax_delta(out, do, dlse)
    # +inf for rows that see no key: exp2(s - lse2) is then exactly 0 there.
    lse2 = jnp.where(jnp.isneginf(lse2), jnp.inf, lse2)

    # Step 2: dK, dV over key blocks, one program per KV head (summing its group).
    bq = min(config.block_q_dkv, max(16, pl.next_power_of_2(seq_q)))
    bk = min(config.block_k_dkv, max(16, pl.next_power_of_2(seq_k)))
    nk = pl.cdiv(seq_k, bk)
    # Whole-sequence blocks everywhere: kernels slice rows at absolute offsets.
    kv_block = pl.BlockSpec((None, seq_k, None, head_dim_padded), lambda i, b, h: (b, 0, h, 0))
    # A KV head's whole query group: [Tq, G, Dp] (G squeezed away when 1).
    g_dim = None if group == 1 else group
    q_group = pl.BlockSpec((None, seq_q, g_dim, head_dim_padded), lambda i, b, h: (b, 0, h, 0))
    stat_group = pl.BlockSpec((None, g_dim, seq_q), lambda i, b, h: (b, h, 0))
    side_specs, side_arrays = side_inputs(inputs, spec, bq, bk, over="q", group=group)
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkdv_kernel,
            spec=spec,
            block_q=bq,
            block_k=bk,
            seq_q=seq_q,
            seq_k=seq_k,
            head_dim=head_dim,
            num_heads=num_heads,
            group=group,
        ),
        grid=(nk, batch, num_kv_heads),
        in_specs=[q_group, kv_block, kv_block, q_group, stat_group, stat_group, side_specs],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps_dkv, num_stages=config.num_stages_dkv),
        interpret=interpret,
        name="pallas_flash_bwd_dkdv",
    )(q, k, v, do, lse2, delta, side_arrays)

    # Step 3: dQ over query blocks.
    bq = min(config.block_q_dq, max(16, pl.next_power_of_2(seq_q)))
    bk = min(config.block_k_dq, max(16, pl.next_power_of_2(seq_k)))
    nq = pl.cdiv(seq_q, bq)

    q_block = pl.BlockSpec((None, seq_q, None, head_dim_padded), lambda i, b, h: (b, 0, h, 0))
    kv_whole = pl.BlockSpec((None, seq_k, None, head_dim_padded), lambda i, b, h: (b, 0, h // group, 0))
    stat_block = pl.BlockSpec((None, None, seq_q), lambda i, b, h: (b, h, 0))
    side_specs, side_arrays = side_inputs(inputs, spec, bq, bk, over="kv")
    in_specs = [q_block, kv_whole, kv_whole, q_block, stat_block, stat_block, side_specs]
    args = [q, k, v, do, lse2, delta, side_arrays]
    out_specs = [q_block]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    aliases = {}
    if want_dslopes:
        out_specs.append(stat_block)
        out_shape.append(jax.ShapeDtypeStruct((batch, num_heads, seq_q), jnp.float32))
    if want_dbias:
        ds_block = pl.BlockSpec((None, None, seq_q, seq_k), lambda i, b, h: (b, h, 0, 0))
        # The kernel writes dS into these zeros (input index counted over the flattened arguments).
        aliases = {len(jax.tree.leaves(args)): len(out_specs)}
        in_specs.append(ds_block)
        args.append(jnp.zeros((batch, num_heads, seq_q, seq_k), jnp.float32))
        out_specs.append(ds_block)
        out_shape.append(jax.ShapeDtypeStruct((batch, num_heads, seq_q, seq_k), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(
            _dq_kernel,
            spec=spec,
            block_q=bq,
            block_k=bk,
            seq_q=seq_q,
            seq_k=seq_k,
            head_dim=head_dim,
            num_heads=num_heads,
            num_q_blocks=nq,
            want_dbias=want_dbias,
            want_dslopes=want_dslopes,
        ),
        grid=(nq, batch, num_heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps_dq, num_stages=config.num_stages_dq),
        interpret=interpret,
        name="pallas_flash_bwd_dq",
    )(*args)
    outs = list(outs)
    dq = outs.pop(0)
    dslopes = None
    if want_dslopes:
        rows = outs.pop(0).sum(axis=-1)  # [B, N]
        if inputs.alibi_slopes.shape[0] == 1:
            rows = rows.sum(axis=0, keepdims=True)
        dslopes = rows.astype(inputs.alibi_slopes.dtype)
    dbias = None
    if want_dbias:
        ds = outs.pop(0)
        axes = tuple(i for i, n in enumerate(spec.bias_shape) if n == 1 and ds.shape[i] != 1)
        if axes:
            ds = ds.sum(axis=axes, keepdims=True)
        dbias = ds.astype(inputs.bias.dtype)
    return Gradients(dq, dk, dv, dbias, dslopes)
