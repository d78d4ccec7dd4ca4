"""Attention of the newest tokens over a KV cache: ``decode_attention``.

``q [B, Tq, N, H]`` holds the newest ``Tq`` tokens of each sequence, at
positions ``kv_lengths[b] - Tq ... kv_lengths[b] - 1``; they are already
written into the cache and attend causally among themselves (``Tq = 1`` is
plain decoding; ``Tq > 1`` speculative decoding or chunked prefill). The cache
is contiguous ``[B, S, K, H]`` or paged: ``[pages, page_size, K, H]`` with
``block_tables [B, max_pages]`` naming the physical page of each logical page.

``implementation="pallas"`` runs the split-K (FlashDecoding) Triton kernel of
``pallas_flash.backends.triton.decode``: one program per (sequence, KV head,
split) holds all ``N // K`` query heads (times ``Tq``) of its KV group, so
every cached K/V byte is read once; the splits' partial ``(out, lse)`` are
merged exactly (``combine``'s math). ``implementation="xla"`` is plain
``jax.numpy`` (einsums over the cache, a gather for pages): the CPU fallback.

Values a traced call cannot check (under ``jit``) are made safe rather than
raised: lengths are clipped to ``[0, capacity]``; a row whose position is
negative (``Tq`` above its length) sees no key and outputs zeros; keys on a
page whose id is outside ``[0, pages)`` are not attended. Called eagerly
with concrete arrays, the same cases raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_flash import validate

__all__ = ["DecodeSpec", "decode_attention"]

_IMPLEMENTATIONS = ("pallas", "xla")
_KERNEL_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MAX_KERNEL_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """The static description of one decode call."""

    batch: int
    seq_q: int  # Tq
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int
    capacity: int  # keys a sequence can hold: S, or max_pages * page_size
    page_size: int | None  # None for a contiguous cache
    num_pages: int | None
    scale: float
    soft_cap: float | None
    window_left: int | None  # a query at position p sees keys p - left ... p

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def paged(self) -> bool:
        return self.page_size is not None


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def decode_spec(q, k_cache, v_cache, kv_lengths, block_tables, *, scale, logits_soft_cap, local_window_size) -> DecodeSpec:
    """Check a call's static properties (shapes, dtypes, ranks, options); the ``DecodeSpec``."""
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("kv_lengths", kv_lengths)):
        validate.check_array(name, x)
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4, got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache and v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    B, Tq, N, H = q.shape
    _, rows, K, Hk = k_cache.shape
    if Hk != H:
        raise ValueError(f"q and the cache must have the same head_dim, got q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}")
    if H < 1:
        raise ValueError(f"head_dim must be at least 1, got q {tuple(q.shape)}")
    if K == 0 or N % K != 0:
        raise ValueError(
            f"the query heads ({N}) must be a multiple of the cache's KV heads ({K}); "
            f"got q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}"
        )
    if Tq < 1:
        raise ValueError(f"q must hold at least one new token per sequence (Tq >= 1), got q {tuple(q.shape)}")
    if block_tables is None:
        if k_cache.shape[0] != B:
            raise ValueError(
                f"a contiguous cache [B, S, K, H] must have q's batch size; got q {tuple(q.shape)} and "
                f"k_cache {tuple(k_cache.shape)} (pass block_tables for a paged cache)"
            )
        capacity, page_size, num_pages = rows, None, None
    else:
        validate.check_array("block_tables", block_tables)
        if not jnp.issubdtype(block_tables.dtype, jnp.integer):
            raise TypeError(f"block_tables must be an integer array of page ids, got {block_tables.dtype}")
        if block_tables.ndim != 2 or block_tables.shape[0] != B:
            raise ValueError(f"block_tables must have shape [batch, max_pages] with batch {B}, got {tuple(block_tables.shape)}")
        if rows < 1:
            raise ValueError(f"a paged cache [pages, page_size, K, H] needs page_size >= 1, got k_cache {tuple(k_cache.shape)}")
        if k_cache.shape[0] < 1:
            raise ValueError(
                f"a paged cache [pages, page_size, K, H] needs at least one page, got k_cache {tuple(k_cache.shape)}"
            )
        page_size, num_pages = rows, k_cache.shape[0]
        capacity = block_tables.shape[1] * page_size
    if Tq > capacity:
        raise ValueError(f"q holds {Tq} new tokens per sequence, more than the cache holds ({capacity}); q {tuple(q.shape)}")
    if kv_lengths.shape != (B,):
        raise ValueError(f"kv_lengths must have shape [batch] = ({B},), got {tuple(kv_lengths.shape)}")
    if not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
        raise TypeError(f"kv_lengths must be an integer array, got {kv_lengths.dtype}")
    window = validate.window(local_window_size)
    return DecodeSpec(
        batch=B, seq_q=Tq, num_heads=N, num_kv_heads=K, head_dim=H, capacity=capacity, page_size=page_size,
        num_pages=num_pages, scale=validate.check_scale(scale, H), soft_cap=validate.check_soft_cap(logits_soft_cap),
        window_left=None if window is None else window[0],
    )


def check_values(spec: DecodeSpec, kv_lengths, block_tables) -> None:
    """Eager calls only (concrete arrays): lengths within the cache, ``Tq`` within each non-empty length, valid pages."""
    if _is_traced(kv_lengths) or (block_tables is not None and _is_traced(block_tables)):
        return
    lengths = np.asarray(kv_lengths).astype(np.int64)
    bad = np.nonzero((lengths < 0) | (lengths > spec.capacity))[0]
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"kv_lengths[{b}] = {lengths[b]} is outside the cache's [0, {spec.capacity}]")
    short = np.nonzero((lengths > 0) & (lengths < spec.seq_q))[0]
    if short.size:
        b = int(short[0])
        raise ValueError(
            f"kv_lengths[{b}] = {lengths[b]} is below the {spec.seq_q} new tokens q holds "
            f"(the new tokens are the last ones of the cache; 0 marks an empty sequence)"
        )
    if block_tables is not None:
        tables = np.asarray(block_tables).astype(np.int64)
        used = np.arange(tables.shape[1])[None, :] < -(-lengths[:, None] // spec.page_size)
        bad = np.argwhere(used & ((tables < 0) | (tables >= spec.num_pages)))
        if bad.size:
            b, i = (int(x) for x in bad[0])
            raise ValueError(
                f"block_tables[{b}, {i}] = {tables[b, i]} is not a page of the cache (it has {spec.num_pages} pages)"
            )


def visible_keys(spec: DecodeSpec, lengths, key_pos):
    """Boolean ``[B, Tq, keys]``: query ``t`` of sequence ``b`` sees key ``key_pos``.

    Query ``t`` sits at ``lengths[b] - Tq + t`` and sees the keys at or before
    it (and, with a window, no more than ``left`` before it).
    """
    q_pos = lengths[:, None, None] - spec.seq_q + jnp.arange(spec.seq_q, dtype=jnp.int32)[None, :, None]
    vis = key_pos[None, None, :] <= q_pos
    if spec.window_left is not None:
        vis = vis & (key_pos[None, None, :] >= q_pos - spec.window_left)
    return vis


def _gather_pages(spec: DecodeSpec, cache, block_tables):
    """A paged cache as contiguous ``[B, max_pages * page_size, K, H]`` and which of its keys lie on valid pages."""
    valid_page = (block_tables >= 0) & (block_tables < spec.num_pages)
    pages = jnp.clip(block_tables, 0, spec.num_pages - 1)
    rows = cache[pages]  # [B, max_pages, page_size, K, H]
    rows = rows.reshape(spec.batch, spec.capacity, spec.num_kv_heads, spec.head_dim)
    return rows, jnp.repeat(valid_page, spec.page_size, axis=1)  # [B, capacity]


def xla_decode(spec: DecodeSpec, q, k_cache, v_cache, lengths, block_tables):
    """The plain ``jax.numpy`` path: logits over the whole cache, masked, float32 softmax."""
    B, Tq, K, G, H = spec.batch, spec.seq_q, spec.num_kv_heads, spec.group, spec.head_dim
    key_ok = jnp.arange(spec.capacity, dtype=jnp.int32)[None, :] < lengths[:, None]  # [B, S]
    if spec.paged:
        k_cache, on_page = _gather_pages(spec, k_cache, block_tables)
        v_cache, _ = _gather_pages(spec, v_cache, block_tables)
        key_ok = key_ok & on_page
    # Keys past a length (or on an invalid page) hold anything, NaN included: zero them so 0 * NaN never reaches a row.
    v_cache = jnp.where(key_ok[:, :, None, None], v_cache, jnp.zeros((), v_cache.dtype))
    precision = jax.lax.Precision.HIGHEST if q.dtype in (jnp.float32, jnp.float64) else None
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.reshape(B, Tq, K, G, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k_cache, precision=precision, preferred_element_type=acc)
    logits = logits * spec.scale
    if spec.soft_cap is not None:
        logits = spec.soft_cap * jnp.tanh(logits / spec.soft_cap)
    vis = visible_keys(spec, lengths, jnp.arange(spec.capacity, dtype=jnp.int32)) & key_ok[:, None, :]
    vis = vis[:, None, None]  # [B, 1, 1, Tq, S]
    masked = jnp.where(vis, logits, -jnp.inf)
    row_max = jnp.max(masked, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # a row that sees nothing (a NaN max stays)
    e = jnp.where(vis, jnp.exp(masked - row_max), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(denom != 0, denom, 1.0)  # rows that see no key: zeros
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v_cache.dtype), v_cache, precision=precision,
                     preferred_element_type=acc)
    return out.reshape(q.shape).astype(q.dtype)


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lengths: jax.Array,
    *,
    block_tables: jax.Array | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str = "pallas",
    num_splits: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of each sequence's newest ``Tq`` tokens over its KV cache.

    Args:
      q: ``[B, Tq, N, H]``, the newest ``Tq >= 1`` tokens of each sequence, at
        positions ``kv_lengths[b] - Tq ... kv_lengths[b] - 1`` (their keys and
        values already in the cache); causal among themselves.
      k_cache, v_cache: contiguous ``[B, S, K, H]``, or paged
        ``[pages, page_size, K, H]`` with ``block_tables``; ``N % K == 0``
        (GQA/MQA); the dtype of ``q``.
      kv_lengths: ``int [B]``, the tokens each sequence holds, the new ones
        included. A sequence of length 0 outputs zeros. Under ``jit`` lengths
        are clipped to ``[0, capacity]`` and a row whose position is negative
        (``Tq`` above a non-zero length) sees no key and outputs zeros; eager
        calls raise ``ValueError`` for both.
      block_tables: ``int [B, max_pages]``: logical page ``i`` of sequence
        ``b`` (keys ``i * page_size ...``) is physical page
        ``block_tables[b, i]``. Entries past a sequence's length are never read.
        Under ``jit``, keys on a page id outside ``[0, pages)`` are not
        attended; eager calls raise ``ValueError``.
      scale: logit scale, ``None`` for ``1/sqrt(H)``.
      logits_soft_cap: ``cap``: logits become ``cap * tanh(scale * q.k / cap)``.
      local_window_size: ``w`` or ``(left, right)``: a query at position ``p``
        sees keys ``p - left ... p`` (``right`` has no effect: the new tokens
        are causal).
      implementation: ``"pallas"`` (the split-K Triton kernel; in interpret
        mode where there is no GPU) or ``"xla"`` (plain ``jax.numpy``).
      num_splits: ``"pallas"`` only: how many programs share each sequence's
        keys, an integer ``>= 1`` (``None`` picks one from B, K and the cache
        size to fill the GPU).
      interpret: ``"pallas"`` only: force Pallas interpret mode on or off.

    Returns:
      ``[B, Tq, N, H]`` in ``q``'s dtype.

    A NaN or infinity in the cache within a sequence's length reaches every
    row that sees its key. One at a key within the length that a row does not
    see (before the row's window, or a newer token after the row) may or may
    not reach that row, depending on the implementation and block boundaries.
    What lies past a length (or on an invalid page) never reaches any row.
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
    num_splits = validate.optional_positive_int("num_splits", num_splits)  # it shapes the grid
    spec = decode_spec(q, k_cache, v_cache, kv_lengths, block_tables, scale=scale, logits_soft_cap=logits_soft_cap,
                       local_window_size=local_window_size)
    check_values(spec, kv_lengths, block_tables)
    lengths = jnp.asarray(kv_lengths)
    if lengths.dtype != jnp.int32:  # int32 lengths go to the kernel as they are; it clips them itself
        # The bound in the lengths' own dtype: a capacity past it would wrap (300 as uint8 is 44).
        lengths = jnp.clip(lengths, 0, min(spec.capacity, jnp.iinfo(lengths.dtype).max)).astype(jnp.int32)
    tables = None if block_tables is None else jnp.asarray(block_tables).astype(jnp.int32)
    if spec.batch == 0 or spec.num_heads == 0:
        return jnp.zeros(q.shape, q.dtype)
    if implementation == "xla":
        return xla_decode(spec, q, k_cache, v_cache, jnp.clip(lengths, 0, spec.capacity), tables)
    if q.dtype not in _KERNEL_DTYPES:
        raise NotImplementedError(f"the pallas decode kernel takes bfloat16, float16 or float32, got {q.dtype}; "
                                  "use implementation='xla'")
    if spec.head_dim > MAX_KERNEL_HEAD_DIM:
        raise NotImplementedError(f"the pallas decode kernel takes head_dim <= {MAX_KERNEL_HEAD_DIM}, got {spec.head_dim}; "
                                  "use implementation='xla'")
    from pallas_flash.backends.triton import decode as triton_decode

    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return triton_decode.decode(spec, q, k_cache, v_cache, lengths, tables, num_splits=num_splits,
                                interpret=bool(interpret))
