"""models.gpt2: sizes, shapes, tied embeddings, initialisation, causality."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import gpt2

ON_GPU = jax.default_backend() == "gpu"


def _tiny(**kw):
    return gpt2.get_config("tiny", attention="xla", **kw)


def test_gpt2_preset_is_124m_without_allocating():
    cfg = gpt2.get_config("gpt2")
    n = gpt2.param_count(cfg)  # jax.eval_shape inside: no memory is used
    assert n == 124_475_904  # nanoGPT's GPT-2 124M with vocab 50304
    # By hand: embeddings + 12 blocks (attn 4 D^2 + 4 D, MLP 8 D^2 + 5 D, 2 LN) + final LN.
    D, L, V, Tmax = 768, 12, 50304, 1024
    per_block = (4 * D * D + 4 * D) + (8 * D * D + 5 * D) + 4 * D
    assert n == V * D + Tmax * D + L * per_block + 2 * D
    assert gpt2.param_count(cfg, include_position=False) == n - Tmax * D
    assert 350e6 < gpt2.param_count(gpt2.get_config("gpt2-medium")) < 360e6
    # The byte-level body keeps the 124M transformer.
    assert gpt2.param_count(dataclasses.replace(cfg, vocab_size=256)) == n - (V - 256) * D


def test_flops_per_token():
    cfg = gpt2.get_config("gpt2")
    n = gpt2.param_count(cfg, include_position=False)
    assert gpt2.flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 1024 * 768


def test_forward_shapes_and_dtypes():
    cfg = _tiny()
    model = gpt2.GPT(cfg, rngs=nnx.Rngs(0))
    idx = jnp.zeros((3, 40), jnp.int32)
    logits = model(idx)
    assert logits.shape == (3, 40, 256) and logits.dtype == jnp.bfloat16  # compute dtype
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}
    assert cfg.dtype == "bfloat16"
    with pytest.raises(ValueError, match="block_size"):
        model(jnp.zeros((1, cfg.block_size + 1), jnp.int32))
    with pytest.raises(ValueError, match="idx"):
        model(jnp.zeros((4,), jnp.int32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_matches_optax(dtype):
    """Values and gradients (random cotangent) of the fused-gradient cross-entropy."""
    import optax

    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    logits = (3 * jax.random.normal(k1, (2, 5, 37))).astype(dtype)
    labels = jax.random.randint(k2, (2, 5), 0, 37)
    ct = jax.random.normal(k3, (2, 5))

    def ref(x):  # float64 on the same (rounded) logits
        return optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float64), labels)

    with jax.enable_x64(True):
        want, ref_vjp = jax.vjp(ref, logits)
        (want_grad,) = ref_vjp(ct.astype(jnp.float64))
    got, vjp = jax.vjp(lambda x: gpt2.cross_entropy(x, labels), logits)
    (grad,) = vjp(ct)
    assert got.dtype == jnp.float32 and grad.dtype == logits.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    tol = 1e-6 if dtype == "float32" else 8e-3  # the gradient is rounded to bf16
    np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="labels"):
        gpt2.cross_entropy(logits, labels[:, :4])
    with pytest.raises(ValueError, match="labels"):
        gpt2.cross_entropy(logits, labels.astype(jnp.float32))


def test_cross_entropy_extreme_logits():
    """The one-pass max/sum reduction: large offsets and -inf (masked) vocabulary entries."""
    import optax

    k1, k2, k3 = jax.random.split(jax.random.key(11), 3)
    logits = 3 * jax.random.normal(k1, (6, 300))
    logits = logits.at[0].add(1e4).at[1].add(-1e4)  # softmax is shift-invariant
    logits = logits.at[2, ::2].set(-jnp.inf).at[3, 1:].set(-jnp.inf)  # masked entries
    labels = jax.random.randint(k2, (6,), 0, 300).at[2].set(1).at[3].set(0)
    ct = jax.random.normal(k3, (6,))
    with jax.enable_x64(True):
        want, ref_vjp = jax.vjp(
            lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels),
            logits.astype(jnp.float64),
        )
        (want_grad,) = ref_vjp(ct.astype(jnp.float64))
    got, vjp = jax.vjp(lambda x: gpt2.cross_entropy(x, labels), logits)
    (grad,) = vjp(ct)
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(grad))
    # float32 arithmetic at |logits| ~ 1e4 (lse - logit cancels, exp(x - lse)
    # inherits its rounding): a few float32 ulps of that magnitude.
    tol = 4 * np.finfo(np.float32).eps * 1e4
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, rtol=tol, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bias_gelu_matches_autodiff(dtype):
    """The recomputing bias + GELU: values and both gradients (random cotangent)."""
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    y = (3 * jax.random.normal(k1, (4, 5, 33))).astype(dtype)
    bias = jax.random.normal(k2, (33,)).astype(dtype)
    ct = jax.random.normal(k3, (4, 5, 33)).astype(dtype)

    def ref(y, bias):
        return jax.nn.gelu(y + bias, approximate=True)

    with jax.enable_x64(True):
        want, ref_vjp = jax.vjp(ref, y.astype(jnp.float64), bias.astype(jnp.float64))
        want_dy, want_db = ref_vjp(ct.astype(jnp.float64))
    got, vjp = jax.vjp(gpt2.bias_gelu, y, bias)
    dy, db = vjp(ct)
    assert got.dtype == dy.dtype == db.dtype == jnp.dtype(dtype)
    tol = 1e-5 if dtype == "float32" else 3e-2  # arithmetic in the input dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dy, np.float64), want_dy, rtol=tol, atol=tol)
    # The bias gradient sums 20 rows: bf16 rounds the per-row terms and the result.
    np.testing.assert_allclose(np.asarray(db, np.float64), want_db, rtol=tol, atol=4 * tol)
    # Against autodiff through jax.nn.gelu in the same dtype: the same arithmetic.
    auto_dy, _ = jax.vjp(ref, y, bias)[1](ct)
    np.testing.assert_allclose(np.asarray(dy, np.float64), np.asarray(auto_dy, np.float64),
                               rtol=1e-6 if dtype == "float32" else 8e-3, atol=1e-7)


def test_tied_embeddings():
    model = gpt2.GPT(_tiny(dtype="float32"), rngs=nnx.Rngs(0))
    names = {
        jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    }
    assert any("wte" in n for n in names)
    assert not any("head" in n for n in names)  # no separate output matrix
    idx = jnp.zeros((1, 8), jnp.int32)  # token 5 never appears in the input
    before = model(idx)
    model.wte.embedding[...] = model.wte.embedding[...].at[5].add(1.0)
    after = model(idx)
    changed = np.abs(np.asarray(after - before)).max(axis=(0, 1)) > 0
    assert changed[5] and changed.sum() == 1  # only the head's column for token 5 moved


def test_gpt2_initialisation():
    cfg = _tiny(n_layer=4, n_embd=256)
    model = gpt2.GPT(cfg, rngs=nnx.Rngs(0))
    block = model.blocks[0]
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    for w, std in [
        (model.wte.embedding, 0.02),
        (model.wpe.embedding, 0.02),
        (block.mlp.c_fc.kernel, 0.02),
        (block.attn.query.kernel, 0.02),
        (block.mlp.c_proj.kernel, resid),
        (block.attn.out.kernel, resid),
    ]:
        assert np.std(np.asarray(w[...])) == pytest.approx(std, rel=0.05)
    assert np.all(np.asarray(block.mlp.c_fc.bias[...]) == 0)
    assert np.all(np.asarray(block.ln_1.scale[...]) == 1)


def test_residual_stream_defaults_to_the_compute_dtype():
    idx = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    default = gpt2.GPT(_tiny(dtype="float32"), rngs=nnx.Rngs(0))(idx)
    f32 = gpt2.GPT(_tiny(dtype="float32", residual_dtype="float32"), rngs=nnx.Rngs(0))(idx)
    bf16 = gpt2.GPT(_tiny(dtype="float32", residual_dtype="bfloat16"), rngs=nnx.Rngs(0))(idx)
    np.testing.assert_array_equal(default, f32)
    assert not np.array_equal(default, bf16)  # the bf16 residual really rounds


def test_causal():
    model = gpt2.GPT(_tiny(dtype="float32"), rngs=nnx.Rngs(0))
    idx = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    a = model(idx)
    b = model(idx.at[:, 10].set((idx[:, 10] + 1) % 256))
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_dropout_only_with_a_key():
    model = gpt2.GPT(_tiny(dtype="float32", dropout=0.2), rngs=nnx.Rngs(0))
    idx = jnp.zeros((1, 8), jnp.int32)
    np.testing.assert_array_equal(model(idx), model(idx))
    assert not np.allclose(model(idx, dropout_rng=jax.random.key(1)), model(idx))


def test_generate():
    model = gpt2.GPT(_tiny(), rngs=nnx.Rngs(0))
    prompt = jnp.array([100, 101, 102], jnp.int32)
    greedy = gpt2.generate(model, prompt, 10, temperature=0.0)
    assert greedy.shape == (13,) and np.array_equal(greedy[:3], prompt)
    np.testing.assert_array_equal(greedy, gpt2.generate(model, prompt, 10, temperature=0.0))
    sampled = gpt2.generate(model, prompt, 140, rng=jax.random.key(3))  # past block_size
    assert sampled.shape == (143,) and int(sampled.max()) < 256


def test_config_errors():
    with pytest.raises(ValueError, match="unknown model config"):
        gpt2.get_config("gpt5")
    with pytest.raises(ValueError, match="n_embd"):
        gpt2.GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="attention"):
        gpt2.GPTConfig(attention="flash")
    with pytest.raises(ValueError, match="dtype"):
        gpt2.GPTConfig(dtype="float99")
    with pytest.raises(ValueError, match="residual_dtype"):
        gpt2.GPTConfig(residual_dtype="half-ish")
    with pytest.raises(ValueError, match="n_layer"):
        gpt2.GPTConfig(n_layer=0)
    # A dtype that parses but is not a float (an int8 residual stream zeroed the model), or none at all.
    for field, value in (("residual_dtype", "int8"), ("dtype", "int32"), ("param_dtype", "bool"), ("dtype", None)):
        with pytest.raises(ValueError, match=f"GPTConfig.{field} must name a float dtype"):
            gpt2.GPTConfig(**{field: value})
    with pytest.raises(ValueError, match="GPTConfig.attention must be None, a backend name"):
        gpt2.GPTConfig(attention=1)
    with pytest.raises(ValueError, match="GPTConfig.dropout must be a number"):
        gpt2.GPTConfig(dropout="0.1")


def test_cross_entropy_out_of_range_labels_are_nan_both_ways():
    """A label outside [0, V): NaN loss and NaN gradient row (a negative one wrapped to a class in the loss, and
    matched none in the gradient); the other rows are untouched."""
    logits = jax.random.normal(jax.random.key(0), (4, 7))
    labels = jnp.asarray([1, -1, 7, 3])
    loss, vjp = jax.vjp(lambda x: gpt2.cross_entropy(x, labels), logits)
    (grad,) = vjp(jnp.ones(4))
    assert np.isnan(np.asarray(loss)[1:3]).all() and np.isfinite(np.asarray(loss)[[0, 3]]).all()
    assert np.isnan(np.asarray(grad)[1:3]).all() and np.isfinite(np.asarray(grad)[[0, 3]]).all()


def test_dropout_keeps_a_nan():
    """Inverted dropout as a product: a NaN in a dropped entry stays NaN (a select put 0 there)."""
    x = jnp.full((4, 8), jnp.nan)
    assert np.isnan(np.asarray(gpt2._dropout(x, 0.5, jax.random.key(0)))).all()
    y = jnp.ones((64, 64))
    out = np.asarray(gpt2._dropout(y, 0.25, jax.random.key(1)))
    assert set(np.unique(out).tolist()) <= {0.0, np.float32(1 / 0.75)} and 0.6 < (out > 0).mean() < 0.9


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: compares the compiled Pallas kernels with XLA")
def test_pallas_matches_xla_on_gpu():
    cfg = gpt2.get_config("gpt2", n_layer=2, block_size=512)
    idx = jax.random.randint(jax.random.key(0), (2, 512), 0, cfg.vocab_size)
    model = gpt2.GPT(dataclasses.replace(cfg, attention="xla"), rngs=nnx.Rngs(0))
    flash = gpt2.GPT(dataclasses.replace(cfg, attention="pallas"), rngs=nnx.Rngs(0))
    ref, out = model(idx), flash(idx)
    np.testing.assert_allclose(out, ref, atol=5e-2, rtol=5e-2)  # bf16 compute


def test_positions():
    """Default arange; [T] or [B, T] positions embed those positions; wrong shapes and the cache refuse them."""
    model = gpt2.GPT(_tiny(n_layer=1, dtype="float32"), rngs=nnx.Rngs(0))
    x = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    ref = model(x)
    np.testing.assert_array_equal(model(x, positions=jnp.arange(16)), ref)
    np.testing.assert_array_equal(model(x, positions=jnp.broadcast_to(jnp.arange(16), (2, 16))), ref)
    shifted = model(x, positions=jnp.stack([jnp.arange(16), jnp.arange(16) + 3]))
    np.testing.assert_allclose(shifted[0], ref[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(shifted[1], ref[1])
    with pytest.raises(ValueError, match=r"positions must have shape \[T\] or \[B, T\]"):
        model(x, positions=jnp.arange(15))
    model.init_cache(2, 32)
    with pytest.raises(ValueError, match="positions are for calls without the KV cache"):
        model(x, positions=jnp.arange(16), prefill=True)


@pytest.mark.parametrize("attention", ["triton", "mosaic"])
def test_config_takes_every_pallas_backend_by_name(attention):
    """``python -m train --attention triton|mosaic`` and ``benchmarks.gpt2`` pass these names on to the model."""
    assert gpt2.GPTConfig(attention=attention).attention == attention
