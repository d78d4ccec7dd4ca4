"""Inputs a careless or hostile caller passes: non-finite values, any finite scale, extreme windows and
offsets, empty arrays, higher-order derivatives, saturated logits.

Each behaves as jax.nn does or fails with a clear error; nothing comes back silently wrong.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash.reference import attention_reference
from pallas_flash.testing.shapes import Shape
from tests.cases import CONFIG, POISONS, random_qkv
from tests.conftest import TOLERANCE, rel_err

SHAPE = Shape("r", 2, 37, 45, 4, 2, 16)


def _pallas(q, k, v, **kw):
    return pf.dot_product_attention(q, k, v, implementation="pallas", config=CONFIG, **kw)


def _grads(fn, q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(ct))


def _against_reference(q, k, v, ct, tol=None, **kw):
    got = _grads(lambda q, k, v: _pallas(q, k, v, **kw), q, k, v, ct)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        want = _grads(lambda q, k, v: attention_reference(q, k, v, **kw), *f64, jnp.asarray(np.asarray(ct, np.float64)))
    tol = tol or TOLERANCE[jnp.dtype(q.dtype)]
    for label, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = rel_err(g, np.asarray(w))
        assert err <= tol, f"{label}: relative error {err:.3e} > {tol:.0e} ({kw})"
    return got


# ------------------------------------------------------------------ non-finite values


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", POISONS)
def test_non_finite_inputs_reach_every_row_that_sees_them(name, causal, seed):
    """As jax.nn: a non-finite q, k or v entry makes every row that sees it non-finite; other rows stay exact."""
    which, value = POISONS[name]
    q, k, v, _ = random_qkv(SHAPE, jnp.float32, seed)
    arrays = {"q": q, "k": k, "v": v}
    row = 20  # a query row, or the key/value position poisoned
    arrays[which] = arrays[which].at[0, row, 0, 3].set(value)
    got = np.asarray(_pallas(arrays["q"], arrays["k"], arrays["v"], is_causal=causal))
    want = np.asarray(jax.nn.dot_product_attention(arrays["q"], arrays["k"], arrays["v"], is_causal=causal))
    # The rows that see the poisoned entry: batch 0; query head 0 (q) or the group of KV head 0 (k, v).
    sees = np.zeros(got.shape[:3], bool)
    if which == "q":
        sees[0, row, 0] = True
    else:
        sees[0, row if causal else 0 :, :2] = True
    assert not np.isfinite(want[sees]).all()
    assert np.array_equal(np.isfinite(got[sees]), np.isfinite(want[sees])), f"a row that sees {name} lost it"
    # jax.nn also spreads NaN to rows that do not see it (0 * NaN in its P.V); wherever it is finite, so are we.
    finite = np.isfinite(want)
    assert np.isfinite(got[finite]).all()
    assert rel_err(got[finite], want[finite]) <= TOLERANCE[jnp.dtype(jnp.float32)]


@pytest.mark.parametrize("feature", ["bias", "alibi"])
def test_non_finite_bias_and_slopes_propagate(feature, seed):
    q, k, v, _ = random_qkv(SHAPE, jnp.float32, seed)
    if feature == "bias":
        bias = jnp.zeros((1, 1, SHAPE.seq_q, SHAPE.seq_k)).at[0, 0, 5, 7].set(jnp.nan)
        got = np.asarray(_pallas(q, k, v, bias=bias))
        rows = np.isnan(got).any(axis=(0, 2, 3))
        assert rows[5] and rows.sum() == 1  # exactly the row whose logit is NaN
    else:
        slopes = jnp.asarray([0.1, jnp.nan, 0.2, 0.3])
        got = np.asarray(_pallas(q, k, v, alibi_slopes=slopes))
        assert np.isnan(got[:, :, 1]).all() and np.isfinite(got[:, :, [0, 2, 3]]).all()


def test_nan_reaches_the_gradients_and_the_loss(seed):
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    k = k.at[1, 3, 1, 0].set(jnp.nan)
    loss = lambda q, k, v: jnp.vdot(_pallas(q, k, v, is_causal=True), ct)  # noqa: E731
    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert np.isnan(float(value))
    assert all(np.isnan(np.asarray(g)).any() for g in grads)


@pytest.mark.parametrize("row", ["first", "last"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_garbage_past_the_lengths_reaches_nothing(which, row, seed):
    """Padding: a NaN in a row past a batch row's query or key length reaches neither the output nor any
    gradient (jax.nn's XLA path spreads it over the row, 0 * NaN; the Mosaic kernels match these,
    ``test_mosaic_nonfinite.py``). ``first``: the first row past the length, inside the block that straddles it
    (it once reached dQ, dK and dV, with the GPU's blocks and the CPU's alike); ``last``: the array's last row."""
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    arrays = {"q": q, "k": k, "v": v}
    q_len, kv_len = 30, 33
    position = {"first": q_len if which == "q" else kv_len, "last": arrays[which].shape[1] - 1}[row]
    arrays[which] = arrays[which].at[1, position, 0, 3].set(jnp.nan)  # past batch row 1's length
    lengths = dict(query_seq_lengths=jnp.asarray([37, q_len]), key_value_seq_lengths=jnp.asarray([45, kv_len]))
    out, *grads = _grads(lambda q, k, v: _pallas(q, k, v, **lengths), arrays["q"], arrays["k"], arrays["v"], ct)
    leaked = [label for label, x in zip(("out", "dq", "dk", "dv"), (out, *grads)) if not np.isfinite(np.asarray(x)).all()]
    assert not leaked, f"the garbage in {which} reached {leaked}"


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("row", ["first", "last"])
def test_a_bias_past_the_query_length_reaches_nothing(value, row, seed):
    """A NaN or +inf bias entry in a query row past the length (padding): the dQ kernel computes the block that
    straddles the length whole, and read the bias there (``exp2(NaN - lse2)``), so dQ, dbias and the ALiBi slopes'
    gradient turned NaN. Every output and gradient stays finite, and the rows before the length match float64."""
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    q_len = 30
    position = {"first": q_len, "last": SHAPE.seq_q - 1}[row]
    bias = jax.random.normal(jax.random.key(seed), (SHAPE.batch, SHAPE.num_heads, SHAPE.seq_q, SHAPE.seq_k))
    bias = bias.at[1, :, position, 3].set(value)
    slopes = jnp.full((SHAPE.num_heads,), 0.1, jnp.float32)
    kw = dict(query_seq_lengths=jnp.asarray([37, q_len]))

    def fn(q, k, v, bias, slopes):
        return pf.dot_product_attention(q, k, v, bias, implementation="pallas", config=CONFIG, alibi_slopes=slopes,
                                        **kw)

    out, vjp = jax.vjp(fn, q, k, v, bias, slopes)
    grads = vjp(ct)
    leaked = [label for label, x in zip(("out", "dq", "dk", "dv", "dbias", "dslopes"), (out, *grads))
              if not np.isfinite(np.asarray(x)).all()]
    assert not leaked, f"the {value} bias reached {leaked}"
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, jnp.where(jnp.isfinite(bias), bias, 0.0))]
        want = attention_reference(*f64, alibi_slopes=np.asarray(slopes, np.float64), **kw)
    assert rel_err(out, np.asarray(want)) <= TOLERANCE[jnp.dtype(jnp.float32)]


def test_rows_that_see_no_key_still_give_zeros(seed):
    q, k, v, _ = random_qkv(SHAPE, jnp.float32, seed)
    out = np.asarray(_pallas(q, k, v, key_value_seq_lengths=jnp.asarray([0, 5])))
    assert np.all(out[0] == 0.0) and np.all(np.isfinite(out))


# ------------------------------------------------------------------ scale, windows, offsets


@pytest.mark.parametrize("scale", [-10.0, -0.3, 0.0], ids=["minus10", "minus0.3", "zero"])
def test_any_finite_scale(scale, seed):
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    _against_reference(q, k, v, ct, scale=scale, is_causal=True)


@pytest.mark.parametrize(
    "kw",
    [
        dict(local_window_size=(2**31 - 1, 0)),
        dict(local_window_size=(2**31 - 1, 2**31 - 1)),
        dict(local_window_size=(0, 2**31 - 1), is_causal=True),
        dict(local_window_size=(3, 2**31 - 1)),
    ],
    ids=["left_max", "both_max", "right_max_causal", "right_max"],
)
def test_windows_up_to_the_int32_limit(kw, seed):
    """Against an explicit mask (jax.nn's own XLA path gets these forwards wrong)."""
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    _against_reference(q, k, v, ct, **kw)


def test_offsets_up_to_the_int32_limit(seed):
    """Offsets near 2**31 - 1: the output, the lse and dq, dk, dv (random cotangents on both) against float64."""
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    ct_lse = jnp.asarray(np.random.default_rng(seed + 3).standard_normal((SHAPE.batch, SHAPE.num_heads, SHAPE.seq_q)),
                         jnp.float32)
    top = 2**31 - 1 - SHAPE.seq_k
    kw = dict(is_causal=True, q_offset=top, k_offset=top - 20)
    (out, lse), vjp = jax.vjp(lambda q, k, v: pf.attention_with_lse(q, k, v, config=CONFIG, **kw), q, k, v)
    grads = vjp((ct, ct_lse))
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        (want, want_lse), r_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, return_lse=True, **kw), *f64)
        want_grads = r_vjp((jnp.asarray(np.asarray(ct, np.float64)), jnp.asarray(np.asarray(ct_lse, np.float64))))
    assert np.isfinite(np.asarray(want_lse)).all()  # every row sees keys 0..20 at least: no -inf lse to skip
    tol = TOLERANCE[jnp.dtype(jnp.float32)]
    for label, got, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (want, want_lse, *want_grads)):
        err = rel_err(got, np.asarray(ref))
        assert err <= tol, f"{label}: relative error {err:.3e} > {tol:.0e} (seed={seed})"
    with pytest.raises(ValueError, match="q_offset"):
        pf.attention_with_lse(q, k, v, q_offset=2**31 - 1)


# ------------------------------------------------------------------ empty inputs


@pytest.mark.parametrize(
    "shape",
    [(0, 8, 2, 2, 16), (2, 0, 2, 2, 16), (2, 8, 0, 0, 16)],
    ids=["batch0", "tq0", "heads0"],
)
def test_empty_inputs_give_empty_outputs(shape):
    b, t, n, kh, h = shape
    q = jnp.ones((b, t, n, h))
    kv = jnp.ones((b, t, kh, h))
    out = pf.dot_product_attention(q, kv, kv, implementation="pallas")
    assert out.shape == q.shape and out.dtype == q.dtype
    grads = jax.grad(lambda q, k, v: pf.dot_product_attention(q, k, v, implementation="pallas").sum(), (0, 1, 2))(q, kv, kv)
    assert [g.shape for g in grads] == [q.shape, kv.shape, kv.shape]


def test_no_keys_gives_zeros_and_minus_inf_lse():
    q = jnp.ones((2, 5, 2, 16))
    kv = jnp.ones((2, 0, 2, 16))
    out, lse = pf.attention_with_lse(q, kv, kv)
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
    dq = jax.grad(lambda q: pf.dot_product_attention(q, kv, kv, implementation="pallas").sum())(q)
    assert np.all(np.asarray(dq) == 0)


# ------------------------------------------------------------------ higher-order derivatives


def test_second_order_derivatives_say_what_to_use():
    q, k, v, _ = random_qkv(Shape("h", 1, 16, 16, 1, 1, 16), jnp.float32, 0)
    loss = lambda q: _pallas(q, k, v).sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match="implementation='xla'"):
        jax.grad(lambda q: jax.grad(loss)(q).sum())(q)
    with pytest.raises(NotImplementedError, match="second-order"):
        jax.hessian(loss)(q)
    # The named alternative works.
    xla_loss = lambda q: pf.dot_product_attention(q, k, v, implementation="xla").sum()  # noqa: E731
    assert jax.hessian(xla_loss)(q).shape == q.shape * 2
    # Forward mode meets the kernels' custom VJP: NotImplementedError (JAX's TypeError before), so the automatic
    # choice falls back to xla, with the same tangent as jax.nn's.
    tangent = jax.random.normal(jax.random.key(1), q.shape)
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        jax.jvp(lambda q: _pallas(q, k, v), (q,), (tangent,))
    with pytest.warns(UserWarning, match="falling back from 'pallas' to 'xla'.*forward-mode"):
        _, ours = jax.jvp(lambda q: pf.dot_product_attention(q, k, v), (q,), (tangent,))
    _, theirs = jax.jvp(lambda q: jax.nn.dot_product_attention(q, k, v), (q,), (tangent,))
    assert rel_err(ours, theirs) < 1e-5


# ------------------------------------------------------------------ saturation


@pytest.mark.parametrize("scale", [10.0, 1e3, 1e5])
def test_float32_gradients_at_huge_logits_stay_within_the_documented_bound(scale, seed):
    """float32 at logits up to ~1e7: the output stays exact; dV's relative error grows as ~1.6e-8 * max|logit|.

    The backward recomputes the logits: one float32 rounding of ``scale * q.k`` (``|L| 2^-24``) moves P
    by that factor, so dV (= P^T dO) carries it. The README states this bound. dQ/dK cancel to ~0 in
    exact arithmetic at saturated rows; where a row's largest logits nearly tie, the same rounding moves
    dS = P (dP - delta) by ``|L| 2^-24 P (1 - P)`` (``P (1 - P) <= 1/4``), on top of float32 rounding of
    ``scale |dO| |v| |k|``. (Measured over 25 seeds: at most 2e-8 of ``scale |dO| |v| |k|`` at scale 1e3,
    where near-ties are common, 7e-10 at 10 and 2e-10 at 1e5, where rows are exactly one-hot in float32.)
    """
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    out, dq, dk, dv = _grads(lambda q, k, v: _pallas(q, k, v, scale=scale), q, k, v, ct)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        w_out, w_dq, w_dk, w_dv = _grads(
            lambda q, k, v: attention_reference(q, k, v, scale=scale), *f64, jnp.asarray(np.asarray(ct, np.float64))
        )
        max_logit = scale * float(jnp.max(jnp.abs(jnp.einsum("bqnh,bknh->bnqk", f64[0], jnp.repeat(f64[1], 2, axis=2)))))
    # out = P V moves with P as dv = P^T dO does (the logit rounding |L| 2^-24): the same bound.
    assert rel_err(out, np.asarray(w_out)) <= max(4e-8 * max_logit, 1e-5)
    assert rel_err(dv, np.asarray(w_dv)) <= max(4e-8 * max_logit, 1e-5)
    bound = 2.0**-24 * (1 + max_logit / 4) * scale * float(np.linalg.norm(ct) * np.linalg.norm(v) * np.linalg.norm(k))
    assert float(np.linalg.norm(np.asarray(dq) - np.asarray(w_dq))) <= bound
    assert float(np.linalg.norm(np.asarray(dk) - np.asarray(w_dk))) <= bound
