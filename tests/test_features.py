"""Masks and attention variants in the kernels, against the float64 reference.

Padding lengths, packed-document segment ids, sliding windows, dense masks
and biases (with the bias gradient), ALiBi (with the slopes' gradient) and
the logits soft-cap; each alone and combined with each other, with
``is_causal`` and with GQA, through ``pallas_flash.dot_product_attention``
(cases in ``tests/cases.py``). Also: rows that see no key, -inf biases, jit
and vmap, and that the bias/slope gradients cost nothing unless asked for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash.reference import attention_reference
from pallas_flash.testing.shapes import Shape
from tests.cases import ALONE, COMBINED, CONFIG, CROSS, ON_CROSS, SELF, Case, build, check, kernel_fn, random_qkv
from tests.conftest import TOLERANCE, rel_err

ALONE_PARAMS = [pytest.param(case, SELF, id=f"{name}-self") for name, case in ALONE.items()] + [
    pytest.param(ALONE[name], CROSS, id=f"{name}-cross") for name in ON_CROSS
]


@pytest.mark.parametrize("case, shape", ALONE_PARAMS)
def test_feature_alone(case, shape, seed):
    check(case, shape, jnp.float32, seed)


@pytest.mark.parametrize("case", COMBINED.values(), ids=COMBINED.keys())
def test_features_combined(case, seed):
    check(case, SELF, jnp.float32, seed)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", ["causal_segments_window_softcap", "everything"])
def test_features_combined_half_precision(case, dtype, seed):
    check(COMBINED[case], SELF if case == "everything" else CROSS, dtype, seed)


def test_combined_default_blocks(seed):
    """The shipped (not the forced 16-row) blocks over several blocks, with every structural mask."""
    shape = Shape("default_blocks", 1, 300, 300, 2, 1, 64)
    case = Case(causal=True, window=(100, 0), segments="packed", kv_lengths=True, soft_cap=5.0, bias=(0, 1, 0, 1))
    kw, ref_kw, diff = build(case, shape, seed)
    q, k, v, ct = random_qkv(shape, jnp.float32, seed)
    fn = lambda q, k, v, b: pf.dot_product_attention(q, k, v, bias=b, implementation="pallas", **kw)  # noqa: E731
    out, vjp = jax.vjp(fn, q, k, v, diff["bias"])
    grads = vjp(ct)
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, diff["bias"])]
        r_out, r_vjp = jax.vjp(lambda q, k, v, b: attention_reference(q, k, v, bias=b, **ref_kw), *args)
        r_grads = r_vjp(jnp.asarray(np.asarray(ct, np.float64)))
    for got, want in zip((out, *grads), (r_out, *r_grads)):
        assert rel_err(got, np.asarray(want)) <= TOLERANCE[jnp.dtype(jnp.float32)]


# ------------------------------------------------------------ rows with no key


def test_rows_that_see_no_key_output_zeros_and_finite_grads(seed):
    """Empty rows from lengths, segments, window and mask: zeros out, finite (zero) gradients, no NaN."""
    shape = SELF
    B, Tq, N, _ = shape.q_shape
    Tk = shape.seq_k
    q, k, v, ct = random_qkv(shape, jnp.float32, seed)
    q_ids = np.zeros((B, Tq), np.int32)
    kv_ids = np.zeros((B, Tk), np.int32)
    q_ids[:, : Tq // 4] = 7  # no key has id 7
    mask = np.ones((B, 1, Tq, Tk), bool)
    mask[:, :, Tq // 4 : Tq // 2] = False  # rows masked off entirely
    kv_len = np.array([Tk] * (B - 1) + [0], np.int32)  # last batch sees nothing
    bias = jnp.asarray(np.random.default_rng(seed).standard_normal((B, N, Tq, Tk)), jnp.float32)
    kw = dict(
        q_segment_ids=jnp.asarray(q_ids),
        kv_segment_ids=jnp.asarray(kv_ids),
        mask=jnp.asarray(mask),
        key_value_seq_lengths=jnp.asarray(kv_len),
        logits_soft_cap=3.0,
        alibi_slopes=jnp.full((N,), 0.1, jnp.float32),
        dropout_rate=0.1,
        dropout_rng=jax.random.key(seed),
    )
    fn = lambda q, k, v, b: pf.dot_product_attention(q, k, v, b, implementation="pallas", config=CONFIG, **kw)  # noqa: E731
    out, vjp = jax.vjp(fn, q, k, v, bias)
    grads = vjp(ct)
    for x in (out, *grads):
        assert bool(jnp.isfinite(x).all())
    out = np.asarray(out)
    assert np.all(out[:, : Tq // 2] == 0.0)
    assert np.all(out[-1] == 0.0)
    assert np.all(np.asarray(grads[0])[:, : Tq // 2] == 0.0)  # dq of empty rows
    assert np.all(np.asarray(grads[3])[:, :, : Tq // 2] == 0.0)  # dbias of empty rows
    assert np.all(np.asarray(grads[3])[-1] == 0.0)
    assert np.abs(out[:-1, Tq // 2 :]).sum() > 0  # the other rows did attend


def test_xla_backend_gives_rows_that_see_no_key_zeros_as_the_kernels(seed):
    """``implementation=None`` falls back to ``"xla"`` for what the kernels refuse: a row that sees no key (its
    segment has none, a mask or window hides every key, key length 0) must not become jax.nn's average of every
    value (for segment ids, other documents'). Values and gradients under a random cotangent, as the kernels."""
    shape = SELF
    B, Tq, N, _ = shape.q_shape
    Tk = shape.seq_k
    q, k, v, ct = random_qkv(shape, jnp.float32, seed)
    q_ids = np.zeros((B, Tq), np.int32)
    q_ids[:, :5] = 7  # no key has id 7
    mask = np.ones((B, 1, Tq, Tk), bool)
    mask[:, :, 5:9] = False
    bias = np.random.default_rng(seed).standard_normal((Tq, Tk)).astype(np.float32)
    bias[9:11] = -np.inf  # rows 9 and 10 see no key through the bias (jax.nn: NaN, and NaN gradients)
    bias[11:, ::2] = -np.inf  # the others see every other key
    kw = dict(q_segment_ids=jnp.asarray(q_ids), kv_segment_ids=jnp.zeros((B, Tk), jnp.int32), mask=jnp.asarray(mask),
              key_value_seq_lengths=jnp.asarray([Tk] * (B - 1) + [0], jnp.int32), local_window_size=(4, 4),
              bias=jnp.asarray(bias))
    results = {}
    for impl in ("pallas", "xla"):
        fn = lambda q, k, v, impl=impl: pf.dot_product_attention(q, k, v, implementation=impl, **kw)  # noqa: E731
        out, vjp = jax.vjp(fn, q, k, v)
        results[impl] = (out, *vjp(ct))
    for ours, xla in zip(results["pallas"], results["xla"]):
        assert bool(jnp.isfinite(xla).all())
        assert rel_err(xla, ours) <= TOLERANCE[jnp.dtype(jnp.float32)]
    out = np.asarray(results["xla"][0])
    assert np.all(out[:, :11] == 0.0) and np.all(out[-1] == 0.0) and np.all(out[:, 11:, :][:-1].any(axis=-1))


def test_query_lengths_zero_padded_rows_like_jax_nn(seed):
    """jax.nn semantics: padded query rows output zeros; kv lengths, mask and bias as jax.nn xla."""
    shape = SELF
    B, Tq, N, _ = shape.q_shape
    q, k, v, _ = random_qkv(shape, jnp.float32, seed)
    rng = np.random.default_rng(seed)
    q_len = jnp.asarray([Tq - 3, Tq // 2], jnp.int32)
    kv_len = jnp.asarray([Tq - 5, Tq], jnp.int32)
    mask = jnp.asarray(rng.random((B, 1, Tq, Tq)) > 0.2).at[..., 0].set(True)  # no empty rows
    bias = jnp.asarray(rng.standard_normal((1, N, Tq, Tq)), jnp.float32)
    kw = dict(query_seq_lengths=q_len, key_value_seq_lengths=kv_len, local_window_size=(12, 12))
    ours = pf.dot_product_attention(q, k, v, bias, mask, implementation="pallas", config=CONFIG, **kw)
    theirs = jax.nn.dot_product_attention(q, k, v, bias, mask, implementation="xla", **kw)
    assert rel_err(ours, theirs) <= TOLERANCE[jnp.dtype(jnp.float32)]
    assert np.all(np.asarray(ours)[1, Tq // 2 :] == 0.0)


# ------------------------------------------------------------ bias gradient only when asked


def _pallas_calls(jaxpr):
    """``{kernel name: number of outputs}`` of every pallas_call in a (nested) jaxpr."""
    found = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            name = eqn.params["name"]
            found[name] = len(eqn.outvars)
        for sub in _subjaxprs(eqn):
            found.update(_pallas_calls(sub))
    return found


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if hasattr(x, "eqns"):  # a Jaxpr
                yield x
            elif hasattr(getattr(x, "jaxpr", None), "eqns"):  # a ClosedJaxpr
                yield x.jaxpr


def test_bias_and_slope_gradients_only_computed_when_differentiated():
    """Differentiating only q, k, v: the dQ kernel writes dQ alone (no [B, N, Tq, Tk] dS, no slope sums)."""
    shape = Shape("small", 1, 24, 24, 2, 2, 16)
    q, k, v, ct = random_qkv(shape, jnp.float32, 0)
    bias = jnp.ones((1, 2, 24, 24), jnp.float32)
    slopes = jnp.ones((2,), jnp.float32)

    def loss(q, k, v, b, s):
        out = pf.dot_product_attention(q, k, v, b, alibi_slopes=s, implementation="pallas", config=CONFIG)
        return jnp.vdot(out, ct)

    def dq_outputs(argnums):
        return _pallas_calls(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(q, k, v, bias, slopes).jaxpr)[
            "pallas_flash_bwd_dq"
        ]

    assert dq_outputs((0, 1, 2)) == 1
    assert dq_outputs((0, 3)) == 2
    assert dq_outputs((4,)) == 2
    assert dq_outputs((3, 4)) == 3


def test_features_under_jit_and_vmap(seed):
    """Traced mask, bias, slopes and dropout key under jit; vmap over an extra batch axis (every element, values
    and the VJP under a random cotangent, equal to the unbatched call on that element)."""
    shape = Shape("small", 1, 24, 24, 2, 1, 16)
    q, k, v, ct = random_qkv(shape, jnp.float32, seed)
    rng = np.random.default_rng(seed)
    bias = jnp.asarray(rng.standard_normal((1, 2, 24, 24)), jnp.float32)
    mask = jnp.asarray(rng.random((1, 1, 24, 24)) > 0.2)
    slopes = jnp.asarray([0.1, 0.2], jnp.float32)

    def f(q, k, v, bias, mask, slopes, key):
        return pf.dot_product_attention(
            q, k, v, bias, mask, alibi_slopes=slopes, dropout_rate=0.2, dropout_rng=key, logits_soft_cap=3.0,
            is_causal=True, implementation="pallas", config=CONFIG,
        )

    key = jax.random.key(seed)
    eager = f(q, k, v, bias, mask, slopes, key)
    jitted = jax.jit(f)(q, k, v, bias, mask, slopes, key)
    assert rel_err(jitted, eager) < 1e-6
    xs = [jnp.stack([x, -x]) for x in (q, k, v)]
    cts = jnp.stack([ct, 2 * ct])

    def fwd_bwd(q, k, v, ct):
        out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, bias, mask, slopes, key), q, k, v)
        return (out, *vjp(ct))

    batched = jax.vmap(fwd_bwd)(*xs, cts)
    for i in range(2):  # each element, not only the first: a batching rule that broadcast one would pass that
        alone = fwd_bwd(*(x[i] for x in xs), cts[i])
        for label, got, want in zip(("out", "dq", "dk", "dv"), batched, alone):
            assert rel_err(got[i], want) < 1e-6, f"vmap element {i}: {label}"


def test_minus_inf_bias_entries_and_rows(seed):
    """An additive -inf bias masks like a boolean mask: no NaN, rows of -inf output zeros, gradients finite."""
    shape = SELF
    B, Tq, N, _ = shape.q_shape
    rng = np.random.default_rng(seed)
    bias = rng.standard_normal((B, N, Tq, shape.seq_k)).astype(np.float32)
    bias[rng.random(bias.shape) < 0.3] = -np.inf
    bias[:, :, :3] = -np.inf  # rows that see nothing
    bias[:, :, 5:9, :20] = -np.inf  # rows whose leading key blocks are all -inf
    case = Case(causal=True, soft_cap=5.0)
    kw, ref_kw, _ = build(case, shape, seed)
    q, k, v, ct = random_qkv(shape, jnp.float32, seed)
    bias = jnp.asarray(bias)
    out, vjp = jax.vjp(kernel_fn(kw, ["bias"]), q, k, v, bias)
    grads = vjp(ct)
    for x in (out, *grads):
        assert bool(jnp.isfinite(x).all())
    assert np.all(np.asarray(out)[:, :3] == 0.0)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        r_out, r_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, jnp.asarray(bias, jnp.float64), **ref_kw), *f64)
        r_grads = r_vjp(jnp.asarray(np.asarray(ct, np.float64)))
    for got, want in zip((out, *grads[:3]), (r_out, *r_grads)):
        assert rel_err(got, np.asarray(want)) <= TOLERANCE[jnp.dtype(jnp.float32)]
