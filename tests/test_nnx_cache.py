"""The KV cache of FlashMultiHeadAttention: init_cache, prefill, decode.

A prompt is prefilled (ragged lengths), then new tokens are decoded ``Tq`` at
a time under ``nnx.jit``; every output must equal full causal attention over
the whole sequence so far, computed in float64 from the layer's parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_flash.nnx import FlashMultiHeadAttention
from pallas_flash.reference import attention_reference
from tests.conftest import TOLERANCE, rel_err

B, F, N, K = 3, 80, 4, 2  # head_dim 20 (the flash kernel takes >= 16), GQA 2:1
S = 19  # cache length (odd)


def _layer(implementation="xla", decode_implementation="xla", seed=0, **kw):
    return FlashMultiHeadAttention(
        N, F, num_kv_heads=K, is_causal=True, implementation=implementation,
        decode_implementation=decode_implementation, rngs=nnx.Rngs(seed), **kw)


def _reference(layer, x, window=None):
    """Causal self-attention of ``layer`` over ``x [1, T, F]``, all in float64."""
    with jax.enable_x64(True):
        p = {name: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), nnx.state(getattr(layer, name), nnx.Param))
             for name in ("query", "key", "value", "out")}
        x = jnp.asarray(x, jnp.float64)
        q, k, v = (jnp.einsum("btf,fnh->btnh", x, p[n]["kernel"][...]) + p[n]["bias"][...] for n in ("query", "key", "value"))
        o = attention_reference(q, k, v, is_causal=True, local_window_size=window)
        return np.asarray(jnp.einsum("btnh,nho->bto", o, p["out"]["kernel"][...]) + p["out"]["bias"][...])


@nnx.jit
def _decode_step(layer, x):
    return layer(x, decode=True)


@pytest.mark.parametrize(
    "tq, impl, window, cache_dtype",
    [(1, "xla", None, "float32"), (2, "xla", 4, "float32"), (2, "xla", None, "bfloat16"),
     (1, "pallas", None, "float32"), (2, "pallas", (4, 0), "float32")],
)
def test_prefill_then_decode_matches_float64(seed, tq, impl, window, cache_dtype):
    """Ragged prompts (7, 4, 1 tokens), then three decode steps of ``tq`` tokens, against float64."""
    layer = _layer(impl, impl, seed=seed, local_window_size=window)
    kx, kn = jax.random.split(jax.random.key(seed))
    prompt = jax.random.normal(kx, (B, 7, F), jnp.float32)
    new = jax.random.normal(kn, (B, 3 * tq, F), jnp.float32)
    lengths = np.array([7, 4, 1])
    layer.init_cache((B, S, F), jnp.dtype(cache_dtype))
    assert layer.cached_key.shape == (B, S, K, F // N) and layer.cached_key.dtype == jnp.dtype(cache_dtype)

    first = layer(prompt, prefill=True, key_value_seq_lengths=jnp.asarray(lengths))  # [B, 7, F]
    np.testing.assert_array_equal(layer.cache_index[...], lengths)
    steps = [_decode_step(layer, new[:, i : i + tq]) for i in range(0, 3 * tq, tq)]
    np.testing.assert_array_equal(layer.cache_index[...], lengths + 3 * tq)
    decoded = np.concatenate(steps, axis=1)  # [B, 3 tq, F]

    got, want = [], []
    for b, n in enumerate(lengths):
        ref = _reference(layer, np.concatenate([prompt[b : b + 1, :n], new[b : b + 1]], axis=1), window)[0]
        got += [np.asarray(first[b, :n]), decoded[b]]  # padded prompt rows are not outputs
        want += [ref[:n], ref[n:]]
    tol = TOLERANCE[jnp.dtype(cache_dtype)]
    assert rel_err(np.concatenate(got), np.concatenate(want)) < tol


def test_decode_equals_the_layer_without_cache(seed):
    """Equal prompts: prefill + decode give the plain causal call's outputs over the whole sequence."""
    layer = _layer(seed=seed)
    x = jax.random.normal(jax.random.key(seed), (B, 12, F), jnp.float32)
    whole = layer(x)  # no cache
    assert not jax.tree.leaves(nnx.state(layer, nnx.Cache))  # a plain call makes none
    layer.init_cache((B, 12, F))
    parts = [layer(x[:, :5], prefill=True), layer(x[:, 5:6], decode=True), layer(x[:, 6:8], decode=True),
             _decode_step(layer, x[:, 8:12])]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, rtol=2e-5, atol=2e-5)
    # With a cache in place, a call without decode/prefill is the plain path and leaves the cache alone.
    cache = jax.tree.map(np.asarray, nnx.state(layer, nnx.Cache))
    np.testing.assert_array_equal(layer(x), whole)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(layer, nnx.Cache), cache)
    # decode=True at construction makes every call a decode call.
    always = _layer(seed=seed, decode=True)
    always.init_cache((B, 12, F))
    always(x[:, :5], prefill=True)
    np.testing.assert_allclose(always(x[:, 5:7]), whole[:, 5:7], rtol=2e-5, atol=2e-5)


def test_overflow_under_jit_gives_nan_rows_and_writes_nothing_out_of_bounds(seed):
    layer = _layer(seed=seed)
    x = jax.random.normal(jax.random.key(seed), (2, 7, F), jnp.float32)
    layer.init_cache((2, 6, F))
    layer(x[:, :5], prefill=True, key_value_seq_lengths=jnp.array([5, 2]))
    before = np.asarray(layer.cached_key[...])
    out = np.asarray(_decode_step(layer, x[:, 5:7]))  # sequence 0 needs 7 > 6 slots
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
    after = np.asarray(layer.cached_key[...])
    np.testing.assert_array_equal(after[0, :5], before[0, :5])  # nothing clamped onto old entries
    assert not np.array_equal(after[0, 5], before[0, 5])  # the one token that fits is written
    np.testing.assert_array_equal(after[1, 4:], before[1, 4:])  # sequence 1 wrote positions 2, 3 only
    np.testing.assert_array_equal(layer.cache_index[...], [7, 4])
    assert np.isnan(np.asarray(_decode_step(layer, x[:, :2]))[0]).all()  # it stays overflowed


def test_cache_errors():
    layer = _layer()
    x = jnp.ones((B, 4, F))
    with pytest.raises(ValueError, match="init_cache"):
        layer(x, decode=True)
    with pytest.raises(ValueError, match="init_cache"):
        layer(x, prefill=True)
    with pytest.raises(ValueError, match="input_shape"):
        layer.init_cache((B, S))
    with pytest.raises(ValueError, match="input_shape"):
        layer.init_cache((B, 0, F))
    with pytest.raises(TypeError, match="dtype"):
        layer.init_cache((B, S, F), jnp.int32)
    with pytest.raises(ValueError, match="input_shape"):
        layer.init_cache((B, True, F))
    layer.init_cache((np.int64(B), np.int64(6), np.int64(F)))  # NumPy integers, as flax's MultiHeadAttention takes
    assert layer.cached_key[...].shape[:2] == (B, 6)
    layer.init_cache((B, 6, F))
    with pytest.raises(ValueError, match=r"\[batch, max_length\] = \(3, 6\)"):
        layer(jnp.ones((B, 7, F)), prefill=True)
    with pytest.raises(ValueError, match=r"\[batch, max_length\] = \(3, 6\)"):
        layer(jnp.ones((2, 1, F)), decode=True)
    for bad in ([4, 6, 4], [-1, 3, 4]):  # outside [0, the prompt's length]: not clipped silently
        with pytest.raises(ValueError, match=r"key_value_seq_lengths must be in \[0, 4\]"):
            layer(x, prefill=True, key_value_seq_lengths=jnp.asarray(bad))
    layer(x, prefill=True)
    with pytest.raises(ValueError, match=r"overflows: 3 new token\(s\) after \[4, 4, 4\] cached, max_length 6"):
        layer(jnp.ones((B, 3, F)), decode=True)
    np.testing.assert_array_equal(layer.cache_index[...], [4, 4, 4])  # the failed call changed nothing
    with pytest.raises(NotImplementedError, match="mask"):
        layer(x[:, :1], decode=True, mask=jnp.ones((B, 1, 1, 1), bool))
    with pytest.raises(NotImplementedError, match="q_segment_ids, kv_segment_ids"):
        seg = jnp.ones((B, 1), jnp.int32)
        layer(x[:, :1], decode=True, q_segment_ids=seg, kv_segment_ids=seg)
    with pytest.raises(NotImplementedError, match="key_value_seq_lengths with the KV cache \\(decode\\)"):
        layer(x[:, :1], decode=True, key_value_seq_lengths=jnp.ones((B,), jnp.int32))
    with pytest.raises(ValueError, match="inputs_k/inputs_v must be the new tokens"):
        layer(x[:, :1], x, decode=True)
    with pytest.raises(ValueError, match="decode_implementation"):
        layer(x[:, :1], decode=True, decode_implementation="cudnn")
    with pytest.raises(ValueError, match="decode_implementation"):
        _layer(decode_implementation="triton")
    with pytest.raises(TypeError, match="decode"):
        _layer(decode="yes")
