"""The benchmarks' chunked float32 reference (``pallas_flash.testing.chunked_reference``): its chunk plan, its
values and gradients against one direct call (causal, window, segment ids, soft-cap), and its fallback."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import harness
from pallas_flash.reference import attention_reference
from pallas_flash.testing import chunked_reference as cref
from pallas_flash.testing.shapes import Shape


def test_chunk_plan():
    gib = 2**30
    assert cref.chunk_plan(16, 16, 1, 1024, 1024, 6, 8 * gib) == (16, 16, 1024)
    b, h, rows = cref.chunk_plan(1, 16, 1, 32768, 32768, 6, 8 * gib)
    assert b == 1 and h == 1 and rows * 32768 * 4 * 6 <= 8 * gib and 32768 % rows == 0
    b, h, rows = cref.chunk_plan(4, 6, 2, 100, 100, 6, 100 * 100 * 4 * 6 * 2 * 3)
    assert rows == 100 and 6 % h == 0 and h == 3 and b == 1
    with pytest.raises(MemoryError):
        cref.chunk_plan(1, 1, 1, 64, 10**9, 6, 1)


def _small_chunks_budget(shape: Shape) -> int:
    """A budget that forces chunks of 16 query rows, one KV head and one batch element."""
    budget = 16 * shape.num_heads // shape.num_kv_heads * shape.seq_k * 4 * cref.FACTOR_GRADS
    assert cref.chunk_plan(shape.batch, shape.num_kv_heads, shape.num_heads // shape.num_kv_heads, shape.seq_q,
                           shape.seq_k, cref.FACTOR_GRADS, budget) == (1, 1, 16)
    return budget


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_reference_matches_direct(causal):
    shape = Shape("r", 2, 64, 48, 4, 2, 16, causal)
    q, k, v, g = harness.make_inputs(harness.Problem(shape, "fp32"), jax.random.key(1))

    def direct(q, k, v):
        mask = jnp.tril(jnp.ones((64, 48), bool))[None, None] if causal else None
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    out, pullback = jax.vjp(direct, q, k, v)
    budget = _small_chunks_budget(shape)
    r_out, r_grads = cref.reference_f32(q, k, v, g, causal, True, budget)
    np.testing.assert_allclose(r_out, out, rtol=1e-5, atol=1e-5)
    for a, b in zip(r_grads, pullback(g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    r_out2, none = cref.reference_f32(q, k, v, g, causal, False, budget)
    assert none is None
    np.testing.assert_allclose(r_out2, out, rtol=1e-5, atol=1e-5)


def test_chunked_reference_with_masks_matches_attention_reference():
    """Window, segment ids and soft-cap placed at each chunk's absolute rows: the same as one direct call."""
    shape = Shape("m", 2, 64, 64, 4, 2, 16, True)
    q, k, v, g = harness.make_inputs(harness.Problem(shape, "fp32"), jax.random.key(2))
    seg = jnp.asarray(np.repeat([0, 1, 2], [20, 30, 14])[None].repeat(2, 0), jnp.int32)
    masks = dict(local_window_size=(9, 0), q_segment_ids=seg, kv_segment_ids=seg, logits_soft_cap=5.0)

    def direct(q, k, v):
        with jax.default_matmul_precision("highest"):
            return attention_reference(q, k, v, is_causal=True, **masks)

    out, pullback = jax.vjp(direct, q, k, v)
    r_out, r_grads = cref.reference_f32(q, k, v, g, True, True, _small_chunks_budget(shape), **masks)
    for a, b in zip((r_out, *r_grads), (out, *pullback(g))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_compute_reference_falls_back_and_says_why():
    shape = Shape("f", 1, 32, 32, 2, 2, 16, False)
    q, k, v, g = harness.make_inputs(harness.Problem(shape, "bf16"), jax.random.key(3))
    f = lambda q, k, v, g, grads: (jax.nn.dot_product_attention(q, k, v), None)  # noqa: E731
    ref = cref.compute_reference(q, k, v, g, causal=False, grads=False, budget_bytes=1, fallback=f)
    assert ref.source == "cudnn" and ref.out.dtype == jnp.float32 and "f32 ref too large" in ref.note
    assert cref.compute_reference(q, k, v, g, causal=False, grads=False, budget_bytes=1).source is None
    assert cref.compute_reference(q, k, v, g, causal=False, grads=True, budget_bytes=2**30).source == "f32-xla"
    assert cref.compute_reference(q, k, v, g, causal=False, grads=True, budget_bytes=1, mode="none").out is None
