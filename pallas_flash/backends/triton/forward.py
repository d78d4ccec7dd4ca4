"""FlashAttention forward: Pallas kernel lowered through Triton.

One program per (query block, batch, query head). It keeps the query block,
the running max ``m``, the running sum ``l`` and the float32 accumulator on
chip, streams key/value blocks, and writes the output and the log-sum-exp.
Key blocks are visited in three loops: masked blocks before the fully visible
ones (window left edge), the fully visible ones without any mask, and masked
blocks after (diagonal, window right edge, ragged tail, padded keys).

Optional features are compiled in only when the spec has them: a dense mask
or bias is read as ``[block_q, block_k]`` tiles of the caller's array (in
every block: it carries no structure to skip on); ALiBi adds
``slope * (j - i)`` from positions; the soft-cap maps ``scale * q.k`` to
``cap * tanh(scale * q.k / cap)``; dropout zeroes the weights whose hashed
keep bit (``pallas_flash.dropout``) is off in the P.V product only (the
softmax denominator keeps every weight) and rescales by ``1 / (1 - rate)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_flash.backends.triton import blocks, tiles
from pallas_flash.backends.triton.config import ForwardConfig, padded_head_dim
from pallas_flash.backends.triton.program import QueryBlock, dropout_keep
from pallas_flash.backends.triton.side_inputs import SideInputs, side_inputs
from pallas_flash.spec import LOG2E, AttentionInputs, AttentionSpec


def _fwd_kernel(
    q_ref,
    k_ref,
    v_ref,
    side: SideInputs,
    o_ref,
    lse2_ref,
    *,
    spec: AttentionSpec,
    block_q: int,
    block_k: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    num_heads: int,
    num_q_blocks: int,
):
    qb = QueryBlock.enter(
        q_ref, side, spec=spec, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k, head_dim=head_dim,
        num_heads=num_heads, num_q_blocks=num_q_blocks,
    )
    prog = qb.program
    q0, dim_mask, q_tail, k_tail = prog.start, prog.dim_mask, prog.q_tail, prog.k_tail
    q = tiles.load_tile(q_ref, q0, block_q, limit=q_tail, dim_mask=dim_mask)
    qk_scale_log2 = spec.scale * LOG2E
    # Plain logits fold the scale into the exp2, taking the running max of the
    # raw q.k: only a positive scale commutes with the max.
    plain = spec.plain_logits and spec.scale > 0
    q_pos = q0 + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    qb = qb.with_positions(q_pos)
    # Keys past the key length read as zero: a block straddling it is a masked one, and its V rows there would
    # give P V = 0 * garbage (NaN) over every row.
    kv_load_limit = prog.kv_load_limit

    def body(kb, carry, *, masked: bool):
        acc, m, l = carry
        k0 = kb * block_k
        limit = k_tail if masked else None
        k = tiles.load_tile(k_ref, k0, block_k, limit=limit, dim_mask=dim_mask)
        v = tiles.load_tile(v_ref, k0, block_k, limit=kv_load_limit if masked else None, dim_mask=dim_mask)
        s = tiles.dot(q, k, trans_b=True)  # raw logits
        # Key positions only where something reads them: the plain unmasked loop stays index-free.
        k_pos = None
        if masked or not plain or spec.has_dropout:
            k_pos = k0 + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        if plain:
            s_scale = qk_scale_log2  # the scale folds into the exp2's FMA
        else:
            s, _ = qb.logits(s, k0, k_pos, limit)
            s_scale = None
        vis = qb.visible(k0, k_pos, masked=masked, k_limit=limit)
        if vis is not None:
            s = jnp.where(vis, s, -jnp.inf)
        # m is the running max in the log2 domain (the scale > 0 commutes with max).
        s_max = jnp.max(s, axis=1)
        m_new = jnp.maximum(m, s_max if s_scale is None else s_max * s_scale)
        # A row can be all -inf in a masked block, or anywhere under a dense mask or bias.
        if masked or spec.has_mask or spec.has_bias:
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        else:
            m_use = m_new
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2((s if s_scale is None else s * s_scale) - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        if qb.drop_key is not None:  # l keeps the undropped weights; only P.V is dropped
            p = jnp.where(dropout_keep(qb.drop_key, q_pos, k_pos, spec=spec), p, 0.0)
        acc = acc * alpha[:, None] + tiles.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    kv_blocks = qb.kv_range()
    carry = (
        jnp.zeros((block_q, prog.head_dim_padded), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    carry = blocks.split_loops(kv_blocks, body, carry, any_full=seq_k >= block_k)
    acc, m, l = carry

    # A row that sees no key has l == 0 exactly; a NaN or infinite logit or value
    # makes l (or acc) NaN, and the row keeps it, as jax.nn's does.
    seen = l != 0.0
    if prog.q_len is not None:
        seen = seen & (q_pos[:, 0] < prog.q_len)
    l_safe = jnp.where(seen, l, 1.0)
    inv = 1.0 / l_safe
    if spec.has_dropout:
        inv = inv * (1.0 / (1.0 - spec.dropout_rate))
    out = acc * inv[:, None]
    out = jnp.where(seen[:, None], out, 0.0)
    lse2 = jnp.where(seen, m + jnp.log2(l_safe), -jnp.inf)  # log2 domain: the backward reads it as it is
    tiles.store_tile(o_ref, out.astype(o_ref.dtype), q0, block_q, limit=q_tail, dim_mask=dim_mask)
    tiles.store_row_stat(lse2_ref, lse2, q0, block_q, limit=q_tail)


def flash_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    inputs: AttentionInputs,
    *,
    spec: AttentionSpec,
    config: ForwardConfig,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """Output ``[B, Tq, N, H]`` and the log-sum-exp in the log2 domain ``[B, N, Tq]`` (float32, -inf for unseen rows)."""
    batch, seq_q, num_heads, head_dim = q.shape
    _, seq_k, num_kv_heads, _ = k.shape
    spec = spec.within(seq_q, seq_k)  # window/offset bounds clamped: no int32 overflow in block arithmetic
    group = num_heads // num_kv_heads
    head_dim_padded = padded_head_dim(head_dim)
    block_q = min(config.block_q, max(16, pl.next_power_of_2(seq_q)))
    block_k = min(config.block_k, max(16, pl.next_power_of_2(seq_k)))
    nq = pl.cdiv(seq_q, block_q)
    causal = spec.causal

    # Whole-sequence blocks: the kernel slices its own rows at absolute offsets
    # (the heaviest causal blocks first), masking ragged tails itself.
    def seq_index(i, b, h):
        return (b, 0, h, 0)

    def kv_index(i, b, h):
        return (b, 0, h // group, 0)

    q_spec = pl.BlockSpec((None, seq_q, None, head_dim_padded), seq_index)
    kv_spec = pl.BlockSpec((None, seq_k, None, head_dim_padded), kv_index)
    side_specs, side_arrays = side_inputs(inputs, spec, block_q, block_k, over="kv")

    kernel = functools.partial(
        _fwd_kernel,
        spec=spec,
        block_q=block_q,
        block_k=block_k,
        seq_q=seq_q,
        seq_k=seq_k,
        head_dim=head_dim,
        num_heads=num_heads,
        num_q_blocks=nq,
    )
    out, lse2 = pl.pallas_call(
        kernel,
        grid=(nq, batch, num_heads),
        in_specs=[q_spec, kv_spec, kv_spec, side_specs],
        out_specs=[q_spec, pl.BlockSpec((None, None, seq_q), lambda i, b, h: (b, h, 0))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, seq_q), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="pallas_flash_fwd",
        cost_estimate=pl.CostEstimate(
            flops=4 * batch * num_heads * seq_q * seq_k * head_dim // (2 if causal else 1),
            transcendentals=batch * num_heads * seq_q * seq_k // (2 if causal else 1),
            bytes_accessed=(q.size + k.size * group + v.size * group + q.size) * q.dtype.itemsize,
        ),
    )(q, k, v, side_arrays)
    return out, lse2

