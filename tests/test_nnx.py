"""pallas_flash.nnx: the NNX attention layer and the attention_fn adapter.

Reference: flax.nnx.MultiHeadAttention with its default attention, same
parameters. The "xla" backend keeps these fast on a CPU; one small case runs
the Pallas kernels (interpret mode without a GPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_flash
from pallas_flash.nnx import FlashMultiHeadAttention, flash_attention_fn, make_attention_fn

B, T, F, N = 2, 24, 64, 4  # head_dim 16


def _x(shape=(B, T, F), seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _flax_mha(num_kv_heads=None, **kw):
    return nnx.MultiHeadAttention(
        N, F, num_kv_heads=num_kv_heads, decode=False, rngs=nnx.Rngs(0), **kw
    )


def _flash_like(ref, implementation="xla", **kw):
    """A FlashMultiHeadAttention holding ``ref``'s parameters."""
    layer = FlashMultiHeadAttention(
        N, F, num_kv_heads=ref.num_kv_heads, implementation=implementation,
        rngs=nnx.Rngs(123), **kw
    )
    nnx.update(layer, nnx.state(ref, nnx.Param))
    return layer


def _value_and_grads(layer, x, cotangent, **call_kw):
    """Output and the gradients of <output, cotangent> w.r.t. params and input."""

    def f(layer, x):
        return jnp.vdot(layer(x, **call_kw), cotangent)

    grads_layer, grads_x = nnx.grad(f, argnums=(0, 1))(layer, x)
    return layer(x, **call_kw), jax.tree.leaves(nnx.state(grads_layer, nnx.Param)), grads_x


def _assert_close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _check_matches(ref, ours, x, ref_kw, our_kw, tol=2e-5):
    cot = _x(x.shape[:-1] + (F,), seed=7)
    out_r, g_r, gx_r = _value_and_grads(ref, x, cot, **ref_kw)
    out_o, g_o, gx_o = _value_and_grads(ours, x, cot, **our_kw)
    _assert_close(out_o, out_r, tol)
    _assert_close(gx_o, gx_r, tol)
    assert len(g_o) == len(g_r) == 8
    for a, b in zip(g_o, g_r):
        _assert_close(a, b, tol)


# ---------------------------------------------------------------- the layer


def test_layer_shapes_and_parameter_layout():
    layer = FlashMultiHeadAttention(
        N, F, qkv_features=32, out_features=48, num_kv_heads=2, implementation="xla",
        rngs=nnx.Rngs(0),
    )
    assert layer(_x()).shape == (B, T, 48)
    assert layer.query.kernel.shape == (F, N, 8)
    assert layer.key.kernel.shape == (F, 2, 8)
    assert layer.value.kernel.shape == (F, 2, 8)
    assert layer.out.kernel.shape == (N, 8, 48)
    # cross attention: a different key/value length and width
    cross = FlashMultiHeadAttention(
        N, F, in_kv_features=40, implementation="xla", rngs=nnx.Rngs(0)
    )
    assert cross(_x(), _x((B, 17, 40))).shape == (B, T, F)


@pytest.mark.parametrize("num_kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_layer_matches_flax_causal(num_kv_heads):
    ref = _flax_mha(num_kv_heads)
    ours = _flash_like(ref, is_causal=True)
    _check_matches(ref, ours, _x(), {"is_causal": True}, {})


def test_layer_matches_flax_with_mask():
    ref = _flax_mha(2)
    ours = _flash_like(ref)
    lengths = jnp.array([T, 15])
    valid = jnp.arange(T)[None] < lengths[:, None]  # [B, T]
    mask = nnx.combine_masks(
        nnx.make_attention_mask(valid, valid), nnx.make_causal_mask(valid)
    )  # [B, 1, T, T]
    x = _x()
    cot_rows = valid[..., None]  # padded query rows differ by convention; ignore them
    cot = _x((B, T, F), seed=7) * cot_rows
    out_r, g_r, gx_r = _value_and_grads(ref, x, cot, mask=mask)
    out_o, g_o, gx_o = _value_and_grads(ours, x, cot, mask=mask)
    _assert_close(out_o * cot_rows, out_r * cot_rows)
    _assert_close(gx_o, gx_r)
    for a, b in zip(g_o, g_r):
        _assert_close(a, b)


def test_layer_segment_ids_match_flax_mask():
    ref = _flax_mha()
    ours = _flash_like(ref, is_causal=True)
    seg = jnp.array([[1] * 10 + [2] * 14, [1] * 24], jnp.int32)
    mask = nnx.combine_masks(
        nnx.make_attention_mask(seg, seg, jnp.equal), nnx.make_causal_mask(seg)
    )
    _check_matches(ref, ours, _x(), {"mask": mask}, {"q_segment_ids": seg, "kv_segment_ids": seg})


def test_layer_passes_everything_to_the_kernel(monkeypatch):
    calls = []

    def spy(q, k, v, bias=None, mask=None, **kw):
        calls.append(dict(q=q.shape, k=k.shape, mask=None if mask is None else mask.shape, **kw))
        return jnp.zeros(q.shape, q.dtype)

    monkeypatch.setattr(pallas_flash, "dot_product_attention", spy)
    layer = FlashMultiHeadAttention(
        N, F, num_kv_heads=2, is_causal=True, dropout_rate=0.1, implementation="pallas",
        local_window_size=(8, 0), rngs=nnx.Rngs(0, dropout=1),
    )
    seg = jnp.ones((B, T), jnp.int32)
    layer(_x(), mask=jnp.ones((B, 1, T, T), bool), q_segment_ids=seg, kv_segment_ids=seg,
          deterministic=False)
    (c,) = calls
    assert c["q"] == (B, T, N, 16) and c["k"] == (B, T, 2, 16) and c["mask"] == (B, 1, T, T)
    assert c["is_causal"] is True and c["implementation"] == "pallas"
    assert c["local_window_size"] == (8, 0)
    assert c["q_segment_ids"] is seg and c["kv_segment_ids"] is seg
    assert c["dropout_rate"] == 0.1 and c["dropout_rng"] is not None
    # deterministic: no dropout arguments at all
    layer(_x(), deterministic=True, is_causal=False)
    assert "dropout_rate" not in calls[-1] and calls[-1]["is_causal"] is False


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match="num_kv_heads"):
        FlashMultiHeadAttention(4, 64, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int, got True"):  # not MQA by accident
        FlashMultiHeadAttention(4, 64, num_kv_heads=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="qkv_features"):
        FlashMultiHeadAttention(4, 64, qkv_features=30, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dropout_rate"):
        FlashMultiHeadAttention(4, 64, dropout_rate=1.0, rngs=nnx.Rngs(0))
    layer = FlashMultiHeadAttention(4, 64, implementation="xla", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="inputs_q"):
        layer(_x((B, T, 32)))
    with pytest.raises(ValueError, match="kv_segment_ids"):
        layer(_x(), q_segment_ids=jnp.ones((B, T), jnp.int32))
    dropping = FlashMultiHeadAttention(4, 64, dropout_rate=0.1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="deterministic"):
        dropping(_x())


# ---------------------------------------------------------------- attention_fn


def test_attention_fn_matches_flax_default():
    ref = _flax_mha(2)
    ours = _flax_mha(2, attention_fn=make_attention_fn("xla"))
    mask = nnx.make_causal_mask(jnp.ones((B, T)))
    _check_matches(ref, ours, _x(), {"mask": mask}, {"mask": mask})
    _check_matches(ref, ours, _x(), {"is_causal": True}, {"is_causal": True})


def test_attention_fn_extra_batch_dims_and_default_causal():
    ref = _flax_mha()
    ours = _flax_mha(attention_fn=make_attention_fn("xla", is_causal=True))
    x = _x((2, 3, T, F))  # two batch axes
    _assert_close(ours(x), ref(x, is_causal=True))
    padded = jnp.arange(T) < 20  # [T] -> mask [1, T, T] broadcast over the batch axes
    mask = nnx.make_attention_mask(padded, padded)
    _assert_close(ours(x, mask=mask)[..., :20, :], ref(x, mask=mask, is_causal=True)[..., :20, :])


def test_attention_fn_default_causal_under_flax_decode():
    """In a decode step over its cache Flax passes ``is_causal=False`` and a mask of the slots written so far; the
    default causal mask (top-left aligned, one query row) would hide every key but the first."""
    x = _x()
    full = _flax_mha()(x, is_causal=True)
    for attention_fn in (make_attention_fn("xla", is_causal=True), make_attention_fn("xla")):
        layer = _flax_mha(attention_fn=attention_fn)
        layer.init_cache((B, T, F))
        steps = jnp.concatenate([layer(x[:, t:t + 1], decode=True) for t in range(T)], axis=1)
        _assert_close(steps, full, 1e-5)


def test_attention_fn_window_under_flax_decode_raises():
    """A window is measured from query row 0; in a decode step over Flax's cache (one query row, the whole cache as
    keys) that is not the query's position, so it refuses rather than attend to the wrong keys. Over the whole
    sequence the window still reaches the kernel: it matches Flax with the causal window as a mask."""
    x = _x()
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    window_mask = (j <= i) & (i - j <= 3)
    layer = _flax_mha(attention_fn=make_attention_fn("xla", is_causal=True, local_window_size=(3, 0)))
    _assert_close(layer(x), _flax_mha()(x, mask=window_mask), 1e-5)
    layer.init_cache((B, T, F))
    with pytest.raises(NotImplementedError, match=r"local_window_size=\(3, 0\) with query length 1 != key/value "
                                                  rf"length {T}"):
        layer(x[:, :1], decode=True)


def test_layer_follows_nnx_view():
    """``nnx.view(model, deterministic=True)`` turns the layer's dropout off (as for ``nnx.MultiHeadAttention``),
    alone or inside a model; ``decode=True`` makes the cache."""
    layer = FlashMultiHeadAttention(N, F, dropout_rate=0.5, deterministic=False, implementation="xla",
                                    rngs=nnx.Rngs(0))
    model = nnx.Sequential(layer, nnx.Dropout(0.1, rngs=nnx.Rngs(1)))
    for viewed in (nnx.view(layer, deterministic=True), nnx.view(model, deterministic=True).layers[0]):
        assert viewed.deterministic is True
        x = _x()
        _assert_close(viewed(x), viewed(x), 0)  # no dropout (the xla backend has none and would raise)
    assert layer.deterministic is False  # the view, not the layer, changed
    cached = nnx.view(layer, decode=True, batch_size=B, max_length=T)
    assert cached.decode is True and cached.cached_key.shape[:2] == (B, T)
    with pytest.raises(TypeError, match="batch_size and max_length"):
        nnx.view(layer, decode=True)


def test_attention_fn_rejects_sow_weights():
    layer = _flax_mha(attention_fn=flash_attention_fn)
    with pytest.raises(ValueError, match="sow_weights"):
        layer(_x(), sow_weights=True)
    with pytest.raises(TypeError, match="is_causal"):
        make_attention_fn(is_causal="yes")


def test_pallas_small_case_matches_flax():
    """The real kernels (interpret mode on a CPU): T=24, head_dim 16, causal GQA."""
    ref = _flax_mha(2)
    ours_layer = _flash_like(ref, implementation="pallas", is_causal=True)
    ours_fn = _flax_mha(2, attention_fn=make_attention_fn("pallas"))
    x = _x((1, T, F))
    _check_matches(ref, ours_layer, x, {"is_causal": True}, {}, tol=1e-4)
    _check_matches(ref, ours_fn, x, {"is_causal": True}, {"is_causal": True}, tol=1e-4)


def test_layer_takes_a_key_or_seed_as_rngs_and_checks_its_arguments_at_construction():
    a = FlashMultiHeadAttention(4, 64, implementation="xla", rngs=jax.random.key(1))
    b = FlashMultiHeadAttention(4, 64, implementation="xla", rngs=nnx.Rngs(1))
    assert np.array_equal(np.asarray(a.query.kernel[...]), np.asarray(b.query.kernel[...]))
    assert FlashMultiHeadAttention(4, 64, rngs=3).num_heads == 4
    with pytest.raises(TypeError, match="rngs"):
        FlashMultiHeadAttention(4, 64, rngs="seed")
    with pytest.raises(ValueError, match="local_window_size"):
        FlashMultiHeadAttention(4, 64, local_window_size=-1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="implementation"):
        FlashMultiHeadAttention(4, 64, implementation="bogus", rngs=nnx.Rngs(0))


def test_fallback_warns_once_and_the_error_names_each_implementation():
    """Dropout at a head dim the kernels lack: one warning (pallas -> xla), then xla's own refusal named as such."""
    q = jnp.ones((1, 8, 2, 8))
    with pytest.warns(UserWarning) as record, pytest.raises(NotImplementedError) as info:
        pallas_flash.dot_product_attention(q, q, q, dropout_rate=0.1, dropout_rng=jax.random.key(0))
    messages = [str(w.message) for w in record if "falling back" in str(w.message)]
    assert len(messages) == 1 and "'pallas' to 'xla'" in messages[0] and "head_dim" in messages[0]
    assert "pallas:" in str(info.value) and "xla: jax.nn xla attention has no attention dropout" in str(info.value)


# ---------------------------------------------------------------- context parallelism (ring attention)


def _seq_mesh():
    from jax.sharding import AxisType

    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (conftest gives 4 host devices)")
    return jax.make_mesh((1, 2), ("data", "seq"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:2])


def test_context_parallel_layer_matches_the_plain_layer(seed):
    """The sequence in zigzag order over 2 devices (ring attention, Pallas kernels, GQA 4:2): output and
    gradients (random cotangent) equal the plain layer's on the sequence in order, reordered."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pallas_flash.nnx import ContextParallel

    cp = ContextParallel(_seq_mesh(), seq_axis="seq", batch_axis="data")
    t = 16  # 4 chunks of 4
    order = cp.order(t)
    np.testing.assert_array_equal(order, np.asarray(pallas_flash.zigzag(jnp.arange(t), 2, axis=0)))
    ref = _flash_like(_flax_mha(num_kv_heads=2), is_causal=True)
    ours = _flash_like(ref, implementation="pallas", is_causal=True, context_parallel=cp)
    x = _x((B, t, F), seed=seed)
    cot = _x((B, t, F), seed=seed + 1)
    out_r, g_r, gx_r = _value_and_grads(ref, x, cot)
    x_cp = jax.device_put(x[:, order], NamedSharding(cp.mesh, P("data", "seq")))
    out_o, g_o, gx_o = nnx.jit(_value_and_grads)(ours, x_cp, cot[:, order])
    _assert_close(out_o, out_r[:, order], 1e-4)
    _assert_close(gx_o, gx_r[:, order], 1e-4)
    for a, b in zip(g_o, g_r, strict=True):
        _assert_close(a, b, 1e-4)


def test_context_parallel_refuses_what_the_ring_lacks():
    from pallas_flash.nnx import ContextParallel

    mesh = _seq_mesh()
    cp = ContextParallel(mesh, seq_axis="seq", batch_axis="data")
    with pytest.raises(ValueError, match="seq_axis 'model' is not an axis of the mesh"):
        ContextParallel(mesh, seq_axis="model")
    with pytest.raises(ValueError, match="mesh axis 'seq' is used twice"):
        ContextParallel(mesh, seq_axis="seq", batch_axis="seq")
    with pytest.raises(ValueError, match="layout must be one of"):
        ContextParallel(mesh, layout="spiral")
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        ContextParallel("mesh")
    with pytest.raises(ValueError, match="cuts the sequence into 4 equal chunks, but its length is 10"):
        cp.order(10)
    layer = dict(num_heads=N, in_features=F, is_causal=True, rngs=0)
    with pytest.raises(NotImplementedError, match="attention dropout .* under context parallelism"):
        FlashMultiHeadAttention(**layer, dropout_rate=0.1, context_parallel=cp)
    with pytest.raises(NotImplementedError, match="KV cache .* under context parallelism"):
        FlashMultiHeadAttention(**layer, decode=True, context_parallel=cp)
    with pytest.raises(ValueError, match="Pallas kernel backend: implementation must be None or one of"):
        FlashMultiHeadAttention(**layer, implementation="xla", context_parallel=cp)
    with pytest.raises(TypeError, match="context_parallel must be a pallas_flash.nnx.ContextParallel"):
        FlashMultiHeadAttention(**layer, context_parallel=mesh)
    attn = FlashMultiHeadAttention(**layer, context_parallel=cp)
    assert attn.implementation == "pallas"
    with pytest.raises(NotImplementedError, match="KV cache under context parallelism"):
        attn.init_cache((B, 8, F))
    x = _x((B, 8, F))
    with pytest.raises(NotImplementedError, match="KV cache .* under context parallelism"):
        attn(x, prefill=True)
    with pytest.raises(NotImplementedError, match="mask under context parallelism"):
        attn(x, mask=jnp.ones((B, 1, 8, 8), bool))
    windowed = FlashMultiHeadAttention(**layer, local_window_size=4, context_parallel=cp)
    with pytest.raises(NotImplementedError, match="local_window_size under context parallelism"):
        windowed(x)
