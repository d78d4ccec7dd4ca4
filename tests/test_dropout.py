"""In-kernel attention dropout: deterministic per key, the right keep rate, gradients that match finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import pallas_flash as pf
from pallas_flash import dropout as pf_dropout
from pallas_flash.testing.shapes import Shape
from tests.cases import CONFIG, SELF, random_qkv
from tests.conftest import ON_GPU, rel_err


def _dropout_out(q, k, v, rate, key, **kw):
    return pf.dot_product_attention(
        q, k, v, implementation="pallas", config=CONFIG, dropout_rate=rate, dropout_rng=key, **kw
    )


def test_dropout_deterministic_per_key_and_differs_across_keys(seed):
    q, k, v, _ = random_qkv(SELF, jnp.float32, seed)
    a = _dropout_out(q, k, v, 0.3, jax.random.key(1), is_causal=True)
    b = _dropout_out(q, k, v, 0.3, jax.random.key(1), is_causal=True)
    c = _dropout_out(q, k, v, 0.3, jax.random.key(2), is_causal=True)
    none = pf.dot_product_attention(q, k, v, implementation="pallas", config=CONFIG, is_causal=True)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert rel_err(a, c) > 1e-2
    assert rel_err(a, none) > 1e-2
    # Rate 0 is exactly no dropout, whatever the key.
    zero = _dropout_out(q, k, v, 0.0, jax.random.key(1), is_causal=True)
    assert np.array_equal(np.asarray(zero), np.asarray(none))
    # Raw uint32[2] keys work as well as typed keys.
    raw = _dropout_out(q, k, v, 0.3, jax.random.PRNGKey(1), is_causal=True)
    assert np.array_equal(np.asarray(raw), np.asarray(_dropout_out(q, k, v, 0.3, jax.random.PRNGKey(1), is_causal=True)))


def test_dropout_keep_mask_statistics():
    """Keep fraction is 1 - rate; masks of different keys, heads and batches are independent."""
    rate = 0.3
    m1 = np.asarray(pf_dropout.full_keep_mask(pf_dropout.seed_from_key(jax.random.key(0)), 2, 3, 128, 96, rate=rate))
    m2 = np.asarray(pf_dropout.full_keep_mask(pf_dropout.seed_from_key(jax.random.key(1)), 2, 3, 128, 96, rate=rate))
    n = m1.size
    assert abs(m1.mean() - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / n)
    agree = (m1 == m2).mean()
    expect = (1 - rate) ** 2 + rate**2
    assert abs(agree - expect) < 0.01
    assert (m1[0, 0] == m1[0, 1]).mean() < 0.65 and (m1[0, 0] == m1[1, 0]).mean() < 0.65
    # Neighbouring rows / columns are not correlated.
    assert abs((m1[..., 1:, :] == m1[..., :-1, :]).mean() - expect) < 0.01
    assert abs((m1[..., 1:] == m1[..., :-1]).mean() - expect) < 0.01
    assert np.all(np.asarray(pf_dropout.full_keep_mask(jnp.zeros(2, jnp.uint32), 1, 1, 8, 8, rate=0.0)))


def test_dropout_gradients_match_finite_differences(seed):
    """For a fixed key the dropped attention is a smooth function: VJP == central differences."""
    shape = Shape("fd", 1, 24, 24, 2, 1, 16) if not ON_GPU else Shape("fd", 1, 200, 200, 2, 1, 32)
    q, k, v, ct = random_qkv(shape, jnp.float32, seed)
    bias = jnp.asarray(np.random.default_rng(seed).standard_normal((1, 2, shape.seq_q, shape.seq_k)), jnp.float32)
    key = jax.random.key(seed)

    def loss(q, k, v, b):
        out = pf.dot_product_attention(
            q, k, v, b, implementation="pallas", config=CONFIG, is_causal=True, dropout_rate=0.25, dropout_rng=key,
            logits_soft_cap=4.0,
        )
        return jnp.vdot(out, ct)

    primals = (q, k, v, bias)
    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*primals)
    loss = jax.jit(loss)
    rng = np.random.default_rng(seed + 7)
    eps = 1e-2
    for i in range(4):
        u = jnp.asarray(rng.standard_normal(primals[i].shape), jnp.float32)
        plus = list(primals)
        minus = list(primals)
        plus[i] = primals[i] + eps * u
        minus[i] = primals[i] - eps * u
        fd = (float(loss(*plus)) - float(loss(*minus))) / (2 * eps)
        an = float(jnp.vdot(grads[i], u))
        assert abs(fd - an) <= 2e-2 * max(1.0, abs(an)), f"argument {i}: finite difference {fd} vs VJP {an}"
