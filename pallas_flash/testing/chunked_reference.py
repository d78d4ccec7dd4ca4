"""A float32 reference for attention at sizes the plain reference cannot hold.

``pallas_flash.reference.attention_reference`` materialises the ``[B, N, Tq, Tk]``
logits; at N = 32k that is far more than a GPU holds. ``reference_f32`` runs it
in float32 (matmul precision "highest") on chunks of batch, KV-head groups and
query rows (each chunk's causal and window mask placed at its absolute query
rows), so that a chunk stays within a byte budget; key/value gradients are
summed over the query chunks. ``compute_reference`` adds what a benchmark
wants around it: a fallback (e.g. cuDNN) where even a chunk does not fit, and a
note saying which reference was used.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_flash.reference import attention_reference

__all__ = ["Reference", "chunk_plan", "compute_reference", "reference_f32"]

# Float32 [rows, Tk] arrays one chunk holds at once (logits, mask, exponentials,
# probabilities), and with gradients about twice that.
FACTOR_FWD, FACTOR_GRADS = 4, 8


def chunk_plan(batch: int, kv_heads: int, groups: int, seq_q: int, seq_k: int, factor: int, budget: int):
    """(batches, kv heads, query rows) per chunk, each dividing its axis.

    A chunk materialises about ``factor`` float32 arrays of
    ``batches * kv_heads * groups * rows * seq_k``; that must fit ``budget``
    bytes, else ``MemoryError``.
    """

    def largest_divisor_at_most(n, cap):
        cap = max(1, min(n, cap))
        return next(d for d in range(cap, 0, -1) if n % d == 0)

    per_row = groups * seq_k * 4 * factor
    rows = seq_q
    while rows * per_row > budget and rows % 2 == 0 and rows > 8:
        rows //= 2
    if rows * per_row > budget:
        raise MemoryError(f"reference chunk of {rows} query rows needs {rows * per_row / 2**30:.1f} GiB")
    heads = largest_divisor_at_most(kv_heads, budget // (rows * per_row)) if rows == seq_q else 1
    batches = largest_divisor_at_most(batch, budget // (heads * rows * per_row)) if heads == kv_heads else 1
    return batches, heads, rows


@functools.lru_cache(maxsize=64)
def _chunk_fn(causal: bool, window: tuple[int, int] | None, soft_cap: float | None, grads: bool):
    """Jitted float32 attention (and its VJP) on one chunk whose query rows start at ``offset``."""

    @jax.jit
    def run(q, k, v, g, q_seg, kv_seg, offset, q_len, kv_len):
        q, k, v, g = (x.astype(jnp.float32) for x in (q, k, v, g))
        rows = offset + jnp.arange(q.shape[1])[:, None]
        cols = jnp.arange(k.shape[1])[None, :]
        visible = jnp.ones((q.shape[1], k.shape[1]), bool)
        if causal:  # top-left aligned at the chunk's absolute query rows
            visible &= cols <= rows
        if window is not None:
            visible &= (cols >= rows - window[0]) & (cols <= rows + window[1])

        def f(q, k, v):
            with jax.default_matmul_precision("highest"):
                return attention_reference(
                    q, k, v, mask=visible[None, None], q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                    logits_soft_cap=soft_cap, query_seq_lengths=q_len, key_value_seq_lengths=kv_len,
                )

        if not grads:
            return f(q, k, v), None
        out, pullback = jax.vjp(f, q, k, v)
        return out, pullback(g)

    return run


def reference_f32(q, k, v, g, causal: bool, grads: bool, budget_bytes: int, *, local_window_size=None,
                  q_segment_ids=None, kv_segment_ids=None, logits_soft_cap=None, query_seq_lengths=None,
                  key_value_seq_lengths=None):
    """Float32 attention of ``[B, T, N, D]`` inputs, and its gradients under cotangent ``g``, in chunks.

    The mask arguments mean what they mean in ``pallas_flash.dot_product_attention``
    (``local_window_size`` as ``(left, right)``). Returns ``(out, (dq, dk, dv) or None)``.
    """
    B, Tq, N, _ = q.shape
    Tk, K = k.shape[1], k.shape[2]
    G = N // K
    nb, nk, tq = chunk_plan(B, K, G, Tq, Tk, FACTOR_GRADS if grads else FACTOR_FWD, budget_bytes)
    window = None if local_window_size is None else tuple(int(w) for w in local_window_size)
    run = _chunk_fn(causal, window, logits_soft_cap, grads)
    q_lens = None if query_seq_lengths is None else jnp.asarray(query_seq_lengths)
    kv_lens = None if key_value_seq_lengths is None else jnp.asarray(key_value_seq_lengths)
    parts = []  # per batch chunk, per head chunk: [out, dq, dk, dv]
    for b0 in range(0, B, nb):
        b = slice(b0, b0 + nb)
        parts.append([])
        for h0 in range(0, K, nk):
            qh, kh = slice(h0 * G, (h0 + nk) * G), slice(h0, h0 + nk)
            kv_seg = None if kv_segment_ids is None else kv_segment_ids[b]
            kv_len = None if kv_lens is None else kv_lens[b]
            res = [
                run(q[b, r : r + tq, qh], k[b, :, kh], v[b, :, kh], g[b, r : r + tq, qh],
                    None if q_segment_ids is None else q_segment_ids[b, r : r + tq], kv_seg, jnp.int32(r),
                    # a chunk's query length counts from its first row
                    None if q_lens is None else jnp.maximum(q_lens[b] - r, 0),
                    kv_len)
                for r in range(0, Tq, tq)
            ]
            joined = [jnp.concatenate([o for o, _ in res], axis=1)]
            if grads:
                joined.append(jnp.concatenate([gr[0] for _, gr in res], axis=1))
                joined += [sum(gr[i] for _, gr in res) for i in (1, 2)]
            parts[-1].append(joined)
    out = [jnp.concatenate([jnp.concatenate([h[i] for h in bp], axis=2) for bp in parts], axis=0) for i in range(len(parts[0][0]))]
    return out[0], (tuple(out[1:]) if grads else None)


@dataclasses.dataclass
class Reference:
    """Reference outputs in float32 (``None`` where there is none) and where they came from."""

    out: object = None
    grads: tuple | None = None
    source: str | None = None  # "f32-xla", the fallback's name, or None
    note: str = ""


def _why(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, MemoryError) or "resource_exhausted" in text.lower() or "out of memory" in text.lower():
        return "too large"
    return text.splitlines()[0][:120]


def compute_reference(q, k, v, g, *, causal: bool, grads: bool, budget_bytes: int, mode: str = "f32",
                      fallback: Callable | None = None, fallback_name: str = "cudnn", **masks) -> Reference:
    """The reference for one problem: ``reference_f32``, else ``fallback``, else none.

    ``mode``: ``"f32"`` (the chunked float32 reference, then the fallback),
    ``"fallback"`` (only the fallback) or ``"none"``. ``fallback(q, k, v, g, grads)``
    returns ``(out, (dq, dk, dv) or None)`` in any float dtype (e.g. cuDNN's).
    ``masks`` go to ``reference_f32``.
    """
    if mode == "none":
        return Reference(note="not checked (--ref none)")
    notes = []
    if mode == "f32":
        try:
            out, gr = reference_f32(q, k, v, g, causal, grads, budget_bytes, **masks)
            return Reference(*jax.block_until_ready((out, gr)), "f32-xla")
        except Exception as e:  # noqa: BLE001 - any failure means: try the fallback
            notes.append(f"f32 ref {_why(e)}")
    if fallback is not None:
        try:
            out, gr = fallback(q, k, v, g, grads)
            out, gr = jax.block_until_ready(jax.tree.map(lambda x: x.astype(jnp.float32), (out, gr)))
            return Reference(out, gr, fallback_name, "; ".join(notes + [f"checked against {fallback_name}"]))
        except Exception as e:  # noqa: BLE001
            notes.append(f"{fallback_name} ref {_why(e)}")
    return Reference(note="; ".join(notes) or "no reference")
