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

from pallas_flash.config import ForwardConfig, padded_head_dim
from pallas_flash.spec import LOG2E, AttentionInputs, AttentionSpec
from pallas_flash.triton import common


def _fwd_kernel(
    q_ref,
    k_ref,
    v_ref,
    *refs,
    spec: AttentionSpec,
    block_q: int,
    block_k: int,
    seq_q: int,
    seq_k: int,
    head_dim: int,
    num_heads: int,
    num_q_blocks: int,
):
    ex, (o_ref, lse_ref) = common.unpack_extras(refs, spec)
    if ex.segments is not None:
        q_seg_ref, _, *seg_refs = ex.segments

    qi = pl.program_id(0)
    if spec.causal:  # heaviest query blocks first: better tail balance
        qi = num_q_blocks - 1 - qi
    b = pl.program_id(1)
    h = pl.program_id(2)
    q0 = qi * block_q
    dp = q_ref.shape[-1]
    dmask = common.col_mask(head_dim, dp)
    q_tail = seq_q if seq_q % block_q else None
    k_tail = seq_k if seq_k % block_k else None

    q_len = ex.q_len[b] if ex.q_len is not None else None
    kv_len = ex.kv_len[b] if ex.kv_len is not None else None
    seg_range = None
    q_seg = None
    if ex.segments is not None:
        seg_range = tuple(r[qi] for r in seg_refs)
        q_seg = common.load_ids(q_seg_ref, q0, block_q, limit=q_tail)[:, None]
    slope = common.alibi_slope(ex, b, h)
    drop_key = common.dropout_key(ex, b, h, num_heads)

    q = common.load_tile(q_ref, q0, block_q, limit=q_tail, dmask=dmask)
    c = spec.scale * LOG2E
    q_pos = q0 + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    tiles = common.QueryBlockTiles(
        ex, spec, q0, q_pos, block_q, block_k, q_tail, k_tail,
        kv_limit=common.kv_visible_limit(kv_len, k_tail, seq_k),
        q_seg=q_seg,
        slope=slope,
    )

    def body(kb, carry, *, masked: bool):
        acc, m, l = carry
        k0 = kb * block_k
        limit = k_tail if masked else None
        k = common.load_tile(k_ref, k0, block_k, limit=limit, dmask=dmask)
        v = common.load_tile(v_ref, k0, block_k, limit=limit, dmask=dmask)
        s = common.dot(q, k, trans_b=True)  # raw logits
        # Key positions only where something reads them: the plain unmasked loop stays index-free.
        k_pos = None
        if masked or not spec.plain_logits or spec.has_dropout:
            k_pos = k0 + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        if spec.plain_logits:
            s_scale = c  # the scale folds into the exp2's FMA
        else:
            s, _ = tiles.logits(s, k0, k_pos, limit)
            s_scale = None
        vis = tiles.visible(k0, k_pos, masked=masked, k_limit=limit)
        if vis is not None:
            s = jnp.where(vis, s, -jnp.inf)
        # m is the running max in the log2 domain (c > 0 commutes with max).
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
        if drop_key is not None:  # l keeps the undropped weights; only P.V is dropped
            p = jnp.where(common.dropout_keep(drop_key, q_pos, k_pos, spec=spec), p, 0.0)
        acc = acc * alpha[:, None] + common.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    lo, flo, fhi, hi = common.kv_block_range(
        q0,
        spec=spec,
        block_q=block_q,
        block_k=block_k,
        seq_k=seq_k,
        kv_len=kv_len,
        q_len=q_len,
        seg_range=seg_range,
        seq_q=seq_q,
    )
    carry = (
        jnp.zeros((block_q, dp), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    carry = common.split_loops((lo, flo, fhi, hi), body, carry, any_full=seq_k >= block_k)
    acc, m, l = carry

    seen = l > 0.0
    if q_len is not None:
        seen = seen & (q_pos[:, 0] < q_len)
    l_safe = jnp.where(seen, l, 1.0)
    inv = 1.0 / l_safe
    if spec.has_dropout:
        inv = inv * (1.0 / (1.0 - spec.dropout_rate))
    out = acc * inv[:, None]
    out = jnp.where(seen[:, None], out, 0.0)
    lse = jnp.where(seen, (m + jnp.log2(l_safe)) * (1.0 / LOG2E), -jnp.inf)
    common.store_tile(o_ref, out.astype(o_ref.dtype), q0, block_q, limit=q_tail, dmask=dmask)
    common.store_row_stat(lse_ref, lse, q0, block_q, limit=q_tail)


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
    """Output ``[B, Tq, N, H]`` and natural log-sum-exp ``[B, N, Tq]`` (float32)."""
    batch, seq_q, num_heads, head_dim = q.shape
    _, seq_k, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    dp = padded_head_dim(head_dim)
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

    q_spec = pl.BlockSpec((None, seq_q, None, dp), seq_index)
    in_specs = [
        q_spec,
        pl.BlockSpec((None, seq_k, None, dp), kv_index),
        pl.BlockSpec((None, seq_k, None, dp), kv_index),
    ]
    args = [q, k, v]
    extra_specs, extra_args = common.extra_inputs(inputs, spec, block_q, block_k, over="kv")
    in_specs += extra_specs
    args += extra_args

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
    out, lse = pl.pallas_call(
        kernel,
        grid=(nq, batch, num_heads),
        in_specs=in_specs,
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
    )(*args)
    return out, lse

