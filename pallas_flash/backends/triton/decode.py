"""Split-K decoding (FlashDecoding): Pallas kernels lowered through Triton.

``_split_kernel`` runs one program per (sequence, KV head, split). The program
holds every query row of its KV group, ``rows = Tq * (N // K)`` of them
(padded to ``block_rows >= 16`` for the matrix unit), so each cached K/V byte
is read once. A sequence's key blocks (those any of its rows sees: the
window's start up to its length) are cut into ``num_splits`` near-equal runs
at run time from its own length, so ragged batches stay balanced. Each program
walks its run in up to three loops (masked blocks, fully visible blocks with
no element mask, masked blocks: ``blocks.split_loops``) and writes its
partial output (normalised, float32) and log-sum-exp (log2 domain).
``_merge_kernel`` then merges the splits exactly: ``out = sum_s 2^(lse_s -
lse) out_s``, ``combine``'s math. With one split the first kernel writes the
output itself.

Query row ``r`` is token ``t = r // G`` and head ``g = r % G`` of the group,
at position ``length - Tq + t``. Paged caches: the program reads the physical
page of each key block from the block table (a scalar load) and loads the
block from that page (``block_k`` divides ``page_size``); keys on a page id
outside ``[0, pages)`` are masked out (the load itself uses a clamped id).
K/V rows past the length are loaded as zeros, so whatever the cache holds
there (NaN included) never reaches a row.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_flash.backends.triton import blocks, tiles
from pallas_flash.backends.triton.config import padded_head_dim
from pallas_flash.spec import LOG2E

__all__ = ["DecodeConfig", "choose_splits", "decode", "decode_partials", "merge_partials", "merge_xla"]

H200_SMS = 132


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel (the merge kernel uses ``merge_warps``)."""

    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 4  # at most: fewer where the K/V buffers would pass STAGE_BYTES (see stages_for)
    merge_warps: int = 4
    programs_per_sm: int = 8  # splits fill about this many programs per SM (several waves: a short tail)
    min_blocks_per_split: int = 4
    max_splits: int = 64  # the merge kernel holds [splits, head_dim] float32 per row

    def __post_init__(self):
        if self.block_k < 16 or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k={self.block_k} must be a power of two >= 16")


def _sm_count() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or H200_SMS
    except RuntimeError:
        return H200_SMS


def block_k_for(spec, config: DecodeConfig) -> int:
    """Keys per block: the config's, no larger than the cache needs, and dividing the page size."""
    block_k = config.block_k
    while block_k > 16 and block_k > spec.capacity:
        block_k //= 2
    if spec.head_dim > 128:
        block_k = min(block_k, 32)  # [block_k, 256] K and V tiles: keep them in registers and shared memory
    if spec.paged:
        if spec.page_size % 16:
            raise NotImplementedError(
                f"the pallas decode kernel needs page_size to be a multiple of 16, got {spec.page_size}; "
                "use implementation='xla'"
            )
        while spec.page_size % block_k:
            block_k //= 2
    return block_k


STAGE_BYTES = 192 * 1024  # shared memory for the pipelined K and V tiles, of the H100/H200's 227 KB per block


def stages_for(spec, block_k: int, itemsize: int, config: DecodeConfig) -> int:
    """The config's pipeline depth, cut so that its K and V buffers fit ``STAGE_BYTES``."""
    per_stage = 2 * block_k * padded_head_dim(spec.head_dim) * itemsize
    return max(1, min(config.num_stages, STAGE_BYTES // per_stage))


def choose_splits(spec, block_k: int, config: DecodeConfig, sm_count: int | None = None) -> int:
    """Splits per (sequence, KV head): enough programs to fill the GPU, each with a few key blocks at least."""
    programs = spec.batch * spec.num_kv_heads
    target = (sm_count or _sm_count()) * config.programs_per_sm
    want = -(-target // programs)
    keys = spec.capacity if spec.window_left is None else min(spec.capacity, spec.window_left + spec.seq_q)
    most = max(1, -(-keys // (block_k * config.min_blocks_per_split)))
    return max(1, min(want, most, config.max_splits))


def _split_kernel(lengths_ref, tables_ref, q_ref, k_ref, v_ref, *out_refs, spec, block_k: int, block_rows: int,
                  single: bool):
    # num_programs is int64 under jax_enable_x64 (program_id stays int32): the kernel indexes in int32 throughout.
    b, s = pl.program_id(0), pl.program_id(2)
    num_splits = lax.convert_element_type(pl.num_programs(2), jnp.int32)
    rows, G, Tq = spec.seq_q * spec.group, spec.group, spec.seq_q
    head_dim_padded = q_ref.shape[-1]
    dim_mask = tiles.col_mask(spec.head_dim, head_dim_padded)
    row_limit = rows if rows < block_rows else None
    length = jnp.clip(lengths_ref[b], 0, spec.capacity)  # see pallas_flash.decode: lengths are clipped

    q = tiles.load_tile(q_ref, 0, block_rows, limit=row_limit, dim_mask=dim_mask)
    r = lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)
    t = r if G == 1 else lax.div(r, jnp.int32(G))
    q_pos = jnp.where(r < rows, length - Tq + t, -1)  # padded rows see nothing in masked blocks

    # Key blocks any row sees: [first, end); this split's near-equal share of them.
    left = spec.window_left
    k_first = 0 if left is None else jnp.maximum(length - Tq - left, 0)
    first = blocks.fdiv(k_first, block_k)
    end = blocks.cdiv(length, block_k)
    count = jnp.maximum(end - first, 0)
    lo = first + lax.div(s * count, num_splits)
    hi = first + lax.div((s + 1) * count, num_splits)
    # Blocks every row sees whole: keys <= length - Tq (causal) and >= length - 1 - left (window).
    full_lo = lo if left is None else blocks.cdiv(jnp.maximum(length - 1 - left, 0), block_k)
    full_hi = blocks.fdiv(jnp.maximum(length - Tq + 1, 0), block_k)
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)

    scale_log2 = spec.scale * LOG2E

    def body(kb, carry, *, masked: bool):
        acc, m, l = carry
        k0 = kb * block_k
        k_pos = k0 + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        page_ok = None
        if spec.paged:
            page = tables_ref[lax.div(k0, jnp.int32(spec.page_size))]
            page_ok = (page >= 0) & (page < spec.num_pages)
            page = jnp.clip(page, 0, spec.num_pages - 1)
            rows_ = pl.ds(lax.rem(k0, jnp.int32(spec.page_size)), block_k)
            k_view, v_view = k_ref.at[page, rows_, :], v_ref.at[page, rows_, :]  # one indexer: Triton takes no more
        else:
            rows_ = pl.ds(k0, block_k)
            k_view, v_view = k_ref.at[rows_, :], v_ref.at[rows_, :]
        if masked:  # rows past the length load as zeros
            load_mask = (k0 + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)) < length
            if dim_mask is not None:
                load_mask = load_mask & dim_mask
        else:
            load_mask = dim_mask
        if load_mask is None:
            k, v = k_view[...], v_view[...]
        else:
            k = plgpu.load(k_view, mask=load_mask, other=0.0)
            v = plgpu.load(v_view, mask=load_mask, other=0.0)
        if page_ok is not None:  # an invalid page's keys get p = 0 below, but 0 * NaN in its V would reach P V
            v = jnp.where(page_ok, v, jnp.zeros_like(v))
        x = tiles.dot(q, k, trans_b=True)  # [block_rows, block_k] raw q.k
        if spec.soft_cap is not None:
            x = jnp.tanh(x * (spec.scale / spec.soft_cap)) * (spec.soft_cap * LOG2E)
        else:
            x = x * scale_log2
        vis = None
        if masked:
            vis = k_pos <= q_pos
            if left is not None:
                vis = vis & (k_pos >= q_pos - left)
        if page_ok is not None:
            vis = page_ok if vis is None else (vis & page_ok)
        if vis is not None:
            x = jnp.where(vis, x, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        m_use = m_new if vis is None else jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(x - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + tiles.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    carry = (
        jnp.zeros((block_rows, head_dim_padded), jnp.float32),
        jnp.full((block_rows,), -jnp.inf, jnp.float32),
        jnp.zeros((block_rows,), jnp.float32),
    )
    # A cache shorter than one block has no full block (and whole-block reads would overrun it).
    any_full = spec.paged or spec.capacity >= block_k
    acc, m, l = blocks.split_loops((lo, full_lo, full_hi, hi), body, carry, any_full=any_full)

    # l == 0 exactly: the row saw no key in this split (zeros, lse -inf); NaN stays NaN.
    seen = l != 0.0
    l_safe = jnp.where(seen, l, 1.0)
    out = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0)
    if single:
        (o_ref,) = out_refs
        tiles.store_tile(o_ref, out.astype(o_ref.dtype), 0, block_rows, limit=row_limit, dim_mask=dim_mask)
    else:
        o_ref, lse_ref = out_refs
        tiles.store_tile(o_ref, out, 0, block_rows, limit=row_limit, dim_mask=dim_mask)
        lse2 = jnp.where(seen, m + jnp.log2(l_safe), -jnp.inf)
        tiles.store_row_stat(lse_ref, lse2, 0, block_rows, limit=row_limit)


def _merge_kernel(o_ref, lse_ref, out_ref, *, block_splits: int, head_dim: int):
    """One program per (sequence, KV head, query row): all its splits' partials at once, ``[splits, Dp]``."""
    num_splits = lse_ref.shape[0]
    dim_mask = tiles.col_mask(head_dim, o_ref.shape[-1])
    split_limit = num_splits if num_splits < block_splits else None
    lse = tiles.load_row_stat(lse_ref, 0, block_splits, limit=split_limit, other=-jnp.inf)  # [S]
    o = tiles.load_tile(o_ref, 0, block_splits, limit=split_limit, dim_mask=dim_mask)  # [S, Dp]
    top = jnp.max(lse)
    top = jnp.where(top == -jnp.inf, 0.0, top)
    w = jnp.exp2(lse - top)  # 0 for splits that saw no key
    den = jnp.sum(w)
    out = jnp.sum(w[:, None] * o, axis=0) / jnp.where(den != 0.0, den, 1.0)  # [Dp]; zeros for a row that saw nothing
    cols = pl.ds(0, o_ref.shape[-1])
    if dim_mask is None:
        out_ref[cols] = out.astype(out_ref.dtype)
    else:
        plgpu.store(out_ref.at[cols], out.astype(out_ref.dtype), mask=dim_mask[0])


def _group_rows(spec, q):
    """``q [B, Tq, N, H]`` as ``[B, K, Tq * G, H]``, row ``t * G + g`` (a free reshape when ``Tq == 1``)."""
    B, Tq, K, G, H = spec.batch, spec.seq_q, spec.num_kv_heads, spec.group, spec.head_dim
    q = q.reshape(B, Tq, K, G, H)
    if Tq > 1:
        q = q.transpose(0, 2, 1, 3, 4)
    return q.reshape(B, K, Tq * G, H)


def _ungroup_rows(spec, out):
    """The inverse of ``_group_rows``."""
    B, Tq, K, G, H = spec.batch, spec.seq_q, spec.num_kv_heads, spec.group, spec.head_dim
    out = out.reshape(B, K, Tq, G, H)
    if Tq > 1:
        out = out.transpose(0, 2, 1, 3, 4)
    return out.reshape(B, Tq, K * G, H)


def decode_partials(spec, q, k_cache, v_cache, lengths, tables, *, num_splits: int, config: DecodeConfig,
                    interpret: bool):
    """The split kernel: ``[B, K, rows, H]`` output when ``num_splits == 1``, else float32 partial outputs
    ``[B, K, splits, rows, H]`` and log2-domain log-sum-exps ``[B, K, splits, rows]``."""
    B, K, H = spec.batch, spec.num_kv_heads, spec.head_dim
    rows = spec.seq_q * spec.group
    block_rows = max(16, pl.next_power_of_2(rows))
    head_dim_padded = padded_head_dim(H)
    block_k = block_k_for(spec, config)
    qg = _group_rows(spec, q)

    lengths_spec = pl.BlockSpec((B,), lambda b, h, s: (0,))
    q_spec = pl.BlockSpec((None, None, rows, head_dim_padded), lambda b, h, s: (b, h, 0, 0))
    if spec.paged:
        tables_spec = pl.BlockSpec((None, tables.shape[1]), lambda b, h, s: (b, 0))
        kv_spec = pl.BlockSpec((spec.num_pages, spec.page_size, None, head_dim_padded), lambda b, h, s: (0, 0, h, 0))
    else:
        tables = jnp.zeros((B, 1), jnp.int32)  # unread
        tables_spec = pl.BlockSpec((None, 1), lambda b, h, s: (b, 0))
        kv_spec = pl.BlockSpec((None, spec.capacity, None, head_dim_padded), lambda b, h, s: (b, 0, h, 0))
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((B, K, rows, H), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, rows, head_dim_padded), lambda b, h, s: (b, h, 0, 0))]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((B, K, num_splits, rows, H), jnp.float32),
            jax.ShapeDtypeStruct((B, K, num_splits, rows), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, None, None, rows, head_dim_padded), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ]
    kernel = functools.partial(_split_kernel, spec=spec, block_k=block_k, block_rows=block_rows,
                               single=num_splits == 1)
    kv_bytes = 2 * B * spec.capacity * K * H * k_cache.dtype.itemsize
    return pl.pallas_call(
        kernel,
        grid=(B, K, num_splits),
        in_specs=[lengths_spec, tables_spec, q_spec, kv_spec, kv_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=stages_for(spec, block_k, k_cache.dtype.itemsize, config)),
        interpret=interpret,
        name="pallas_flash_decode_split",
        cost_estimate=pl.CostEstimate(
            flops=4 * B * spec.num_heads * spec.seq_q * spec.capacity * H,
            transcendentals=B * spec.num_heads * spec.seq_q * spec.capacity,
            bytes_accessed=kv_bytes + 2 * q.size * q.dtype.itemsize,
        ),
    )(lengths, tables, qg, k_cache, v_cache)


def merge_partials(spec, o_parts, lse_parts, dtype, *, config: DecodeConfig, interpret: bool):
    """Merge ``[B, K, splits, rows, H]`` partials exactly into ``[B, K, rows, H]`` of ``dtype``."""
    B, K, num_splits, rows, H = o_parts.shape
    block_splits = max(16, pl.next_power_of_2(num_splits))
    head_dim_padded = padded_head_dim(H)
    kernel = functools.partial(_merge_kernel, block_splits=block_splits, head_dim=H)
    return pl.pallas_call(
        kernel,
        grid=(B, K, rows),
        in_specs=[
            pl.BlockSpec((None, None, num_splits, None, head_dim_padded), lambda b, h, r: (b, h, 0, r, 0)),
            pl.BlockSpec((None, None, num_splits, None), lambda b, h, r: (b, h, 0, r)),
        ],
        out_specs=pl.BlockSpec((None, None, None, head_dim_padded), lambda b, h, r: (b, h, r, 0)),
        out_shape=jax.ShapeDtypeStruct((B, K, rows, H), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.merge_warps, num_stages=1),
        interpret=interpret,
        name="pallas_flash_decode_merge",
    )(o_parts, lse_parts)


def merge_xla(o_parts, lse_parts, dtype):
    """The same exact merge in ``jax.numpy`` (``combine``'s math over the split axis, log2 domain): for comparison."""
    top = jnp.max(lse_parts, axis=2, keepdims=True)
    top = jnp.where(top == -jnp.inf, 0.0, top)
    w = jnp.exp2(lse_parts - top)  # [B, K, S, rows]
    den = jnp.sum(w, axis=2)
    out = jnp.einsum("bksr,bksrh->bkrh", w, o_parts) / jnp.where(den != 0.0, den, 1.0)[..., None]
    return out.astype(dtype)


def decode(spec, q, k_cache, v_cache, lengths, tables, *, num_splits: int | None, interpret: bool,
           config: DecodeConfig | None = None, merge: str = "pallas"):
    """``[B, Tq, N, H]``: the split kernel, then the merge kernel (``merge="xla"``: ``merge_xla``)."""
    config = config or DecodeConfig()
    if num_splits is None:
        num_splits = choose_splits(spec, block_k_for(spec, config), config)
    parts = decode_partials(spec, q, k_cache, v_cache, lengths, tables, num_splits=num_splits, config=config,
                            interpret=interpret)
    if num_splits == 1:
        return _ungroup_rows(spec, parts[0])
    if merge == "xla":
        return _ungroup_rows(spec, merge_xla(*parts, q.dtype))
    return _ungroup_rows(spec, merge_partials(spec, *parts, q.dtype, config=config, interpret=interpret))
