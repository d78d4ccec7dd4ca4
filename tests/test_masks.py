"""Masks and attention variants in the kernels, against the float64 reference.

Padding lengths, packed-document segment ids, sliding windows, dense masks
and biases (with the bias gradient), ALiBi (with the slopes' gradient), the
logits soft-cap and in-kernel dropout; each alone and combined with each
other, with ``is_causal`` and with GQA, through ``pallas_flash.dot_product_attention``.

On a CPU the kernels run in Pallas interpret mode with 16-row blocks, so every
case crosses several query and key blocks (skipped, masked and unmasked ones);
on a GPU the same cases run at longer sequences with the shipped block configs.
The block-range tests check block skipping itself: a block that holds no
visible element is outside the range the kernels loop over.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash.testing.shapes import Shape
from pallas_flash import dropout as pf_dropout
from pallas_flash.reference import attention_reference, visibility_mask
from pallas_flash.spec import AttentionSpec
from pallas_flash.backends.triton import blocks as common
from tests.conftest import ON_GPU, TOLERANCE, rel_err
from tests.test_attention import SMALL_BLOCKS

CONFIG = None if ON_GPU else SMALL_BLOCKS

# One self-attention and one cross-attention shape (Tq != Tk, ragged tails), GQA.
if ON_GPU:
    SELF = Shape("self", 2, 700, 700, 4, 2, 64)
    CROSS = Shape("cross", 2, 333, 517, 6, 2, 80)
else:
    SELF = Shape("self", 2, 40, 40, 4, 2, 16)
    CROSS = Shape("cross", 2, 37, 45, 6, 2, 24)


# ------------------------------------------------------------------ helpers


@dataclasses.dataclass(frozen=True)
class Case:
    """Which features a call uses; ``build`` draws the arrays for a shape."""

    causal: bool = False
    window: tuple[int, int] | None = None
    q_lengths: bool = False
    kv_lengths: bool = False
    segments: str | None = None  # "packed" (sorted, shared by q and kv when Tq == Tk), "long" or "random"
    mask: tuple[int, int, int, int] | str | None = None  # 1 = full dim, 0 = broadcast; or "late"
    bias: tuple[int, int, int, int] | None = None
    bias_grad: bool = True
    alibi: str | None = None  # "n" or "bn"
    alibi_grad: bool = False
    soft_cap: float | None = None
    dropout: float = 0.0


def _packed_ids(rng, batch: int, t: int, max_doc: int):
    ids = np.zeros((batch, t), np.int32)
    for b in range(batch):
        pos, doc = 0, 0
        while pos < t:
            n = int(rng.integers(1, max_doc + 1))
            ids[b, pos : pos + n] = doc
            pos, doc = pos + n, doc + 1
    return ids


def build(case: Case, shape: Shape, seed: int):
    """``(kernel kwargs, reference kwargs, differentiable extras)`` for one case."""
    rng = np.random.default_rng(seed + 1)
    B, Tq, N, _ = shape.q_shape
    Tk = shape.seq_k
    kw, ref, diff = {}, {}, {}
    both = {}
    if case.causal:
        both["is_causal"] = True
    if case.window is not None:
        both["local_window_size"] = case.window
    if case.q_lengths:
        lens = rng.integers(0, Tq + 1, size=B)
        lens[0] = max(lens[0], Tq // 2)  # at least one long row set
        both["query_seq_lengths"] = jnp.asarray(lens, jnp.int32)
    if case.kv_lengths:
        lens = rng.integers(1, Tk + 1, size=B)
        lens[0] = max(lens[0], Tk // 2)  # (one visible key makes dq exactly 0: no relative error)
        if B > 1:
            lens[-1] = 0  # a batch whose queries see no key at all
        both["key_value_seq_lengths"] = jnp.asarray(lens, jnp.int32)
    if case.segments == "long":  # two documents: whole blocks inside one run unmasked
        q_ids = (np.arange(Tq)[None, :] >= (4 * Tq) // 5).astype(np.int32).repeat(B, 0)
        kv_ids = (np.arange(Tk)[None, :] >= (4 * Tk) // 5).astype(np.int32).repeat(B, 0)
        both["q_segment_ids"], both["kv_segment_ids"] = jnp.asarray(q_ids), jnp.asarray(kv_ids)
    if case.segments == "packed":
        max_doc = max(3, (2 * Tq) // 3)
        q_ids = _packed_ids(rng, B, Tq, max_doc)
        kv_ids = q_ids if Tq == Tk else _packed_ids(rng, B, Tk, max_doc)
        both["q_segment_ids"], both["kv_segment_ids"] = jnp.asarray(q_ids), jnp.asarray(kv_ids)
    elif case.segments == "random":
        both["q_segment_ids"] = jnp.asarray(rng.integers(0, 3, (B, Tq)), jnp.int32)
        both["kv_segment_ids"] = jnp.asarray(rng.integers(0, 3, (B, Tk)), jnp.int32)
    full = (B, N, Tq, Tk)
    if case.mask == "late":  # each row sees keys j >= start_i only: leading blocks fully masked
        start = rng.integers(0, Tk, size=(B, 1, Tq, 1))
        both["mask"] = jnp.asarray(np.arange(Tk)[None, None, None, :] >= start)
    elif case.mask is not None:
        mshape = tuple(n if on else 1 for n, on in zip(full, case.mask))
        m = rng.random(mshape) > 0.25
        both["mask"] = jnp.asarray(m)
    if case.bias is not None:
        bshape = tuple(n if on else 1 for n, on in zip(full, case.bias))
        b = jnp.asarray(rng.standard_normal(bshape), jnp.float32)
        (diff if case.bias_grad else both)["bias"] = b
    if case.alibi is not None:
        s = rng.uniform(0.02, 0.3, (N,) if case.alibi == "n" else (B, N))
        (diff if case.alibi_grad else both)["alibi_slopes"] = jnp.asarray(s, jnp.float32)
    if case.soft_cap is not None:
        both["logits_soft_cap"] = case.soft_cap
    kw.update(both)
    ref.update(both)
    if case.dropout > 0:
        key = jax.random.key(seed)
        kw.update(dropout_rate=case.dropout, dropout_rng=key)
        seed_words = pf_dropout.seed_from_key(key)
        ref.update(
            dropout_rate=case.dropout,
            dropout_mask=pf_dropout.full_keep_mask(seed_words, B, N, Tq, Tk, rate=case.dropout),
        )
    return kw, ref, diff


def random_qkv(shape: Shape, dtype, seed: int):
    rng = np.random.default_rng(seed)

    def draw(s):
        return jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype)

    return draw(shape.q_shape), draw(shape.kv_shape), draw(shape.kv_shape), draw(shape.q_shape)


def kernel_fn(kw, diff_names, **extra):
    def fn(q, k, v, *d):
        return pf.dot_product_attention(
            q, k, v, implementation="pallas", config=CONFIG, **kw, **dict(zip(diff_names, d)), **extra
        )

    return fn


def check(case: Case, shape: Shape, dtype, seed: int, **extra):
    """Output and every gradient (dq, dk, dv, and dbias / dslopes when differentiated) vs the reference."""
    kw, ref_kw, diff = build(case, shape, seed)
    q, k, v, ct = random_qkv(shape, dtype, seed)
    names = list(diff)
    out, vjp = jax.vjp(kernel_fn(kw, names, **extra), q, k, v, *diff.values())
    grads = vjp(ct)
    assert out.shape == q.shape and out.dtype == q.dtype
    for g, x in zip(grads, (q, k, v, *diff.values())):
        assert g.shape == x.shape and g.dtype == x.dtype

    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, *diff.values())]

        def ref_fn(q, k, v, *d):
            return attention_reference(q, k, v, **ref_kw, **dict(zip(names, d)))

        ref_out, ref_vjp = jax.vjp(ref_fn, *f64)
        ref_grads = [np.asarray(g) for g in ref_vjp(jnp.asarray(np.asarray(ct, np.float64)))]
        ref_out = np.asarray(ref_out)

    tol = TOLERANCE[jnp.dtype(dtype)]
    labels = ["out", "dq", "dk", "dv", *(f"d{n}" for n in names)]
    for label, got, want in zip(labels, (out, *grads), (ref_out, *ref_grads)):
        if label == "dalibi_slopes":
            err = np.linalg.norm(np.asarray(got, np.float64) - want) / _slope_grad_scale(
                shape, ref_kw, dict(zip(names, f64[3:])), f64[:3], ct
            )
        else:
            err = rel_err(got, want)
        assert err <= tol, f"{label}: relative error {err:.3e} > {tol:.0e} ({case}, {jnp.dtype(dtype).name}, seed={seed})"
    return out, grads


def _slope_grad_scale(shape: Shape, ref_kw, diff64, qkv64, ct) -> float:
    """The norm of sum |dS[b, n, i, j] * (j - i)|: the terms whose signed sum is d slope.

    The slope gradient adds up every logit gradient dS times its distance;
    those terms largely cancel, so the sum can be far smaller than the terms
    and an error relative to the sum alone measures that cancellation, not the
    kernel. A sum of terms each accurate to a relative ``tol`` is accurate to
    ``tol`` times the sum of their magnitudes, so that is the denominator.
    dS comes from the float64 reference, as the gradient of a zero bias added
    to the logits.
    """
    B, Tq, N, _ = shape.q_shape
    Tk = shape.seq_k
    kw = {**ref_kw, **diff64}
    base = kw.pop("bias", None)
    with jax.enable_x64(True):

        def with_probe(probe):
            bias = probe if base is None else jnp.asarray(base, jnp.float64) + probe
            return attention_reference(*qkv64, bias=bias, **kw)

        _, vjp = jax.vjp(with_probe, jnp.zeros((B, N, Tq, Tk), jnp.float64))
        (ds,) = vjp(jnp.asarray(np.asarray(ct, np.float64)))
    dist = np.abs(np.arange(Tk)[None, :] - np.arange(Tq)[:, None])  # [Tq, Tk]
    terms = (np.abs(np.asarray(ds)) * dist).sum(axis=(2, 3))  # [B, N]
    if np.ndim(diff64["alibi_slopes"]) == 1:  # [N] slopes: one sum over the batch too
        terms = terms.sum(axis=0)
    return float(np.linalg.norm(terms))


# ------------------------------------------------------------ each feature alone

ALONE = {
    "q_lengths": Case(q_lengths=True),
    "kv_lengths": Case(kv_lengths=True),
    "lengths_causal": Case(causal=True, q_lengths=True, kv_lengths=True),
    "segments_packed_causal": Case(causal=True, segments="packed"),
    "segments_random": Case(segments="random"),
    "segments_long_docs": Case(segments="long"),
    "segments_long_docs_causal_lengths": Case(causal=True, segments="long", kv_lengths=True),
    "window_sym": Case(window=(5, 5)),
    "window_left_right": Case(window=(9, 2)),
    "window_causal": Case(causal=True, window=(6, 0)),
    "window_zero": Case(window=(0, 0)),
    "mask_full": Case(mask=(1, 1, 1, 1)),
    "mask_b1qk_causal": Case(causal=True, mask=(1, 0, 1, 1)),
    "mask_1n1k": Case(mask=(0, 1, 0, 1)),
    "mask_11q1": Case(mask=(0, 0, 1, 0)),
    "mask_late_start": Case(mask="late"),
    "mask_late_start_bias": Case(mask="late", bias=(1, 1, 1, 1)),
    "bias_full": Case(bias=(1, 1, 1, 1)),
    "bias_1n1k_causal": Case(causal=True, bias=(0, 1, 0, 1)),
    "bias_b1qk_const": Case(bias=(1, 0, 1, 1), bias_grad=False),
    "alibi_n_causal": Case(causal=True, alibi="n", alibi_grad=True),
    "alibi_bn": Case(alibi="bn"),
    "soft_cap": Case(soft_cap=2.0),
    "soft_cap_causal": Case(causal=True, soft_cap=5.0),
    "dropout": Case(dropout=0.3),
    "dropout_causal": Case(causal=True, dropout=0.15),
}


# Every case on the self-attention shape; the cross-attention shape (Tq != Tk,
# ragged tails on both sides) runs the ones where Tq != Tk changes the ranges.
ON_CROSS = (
    "lengths_causal",
    "segments_packed_causal",
    "segments_long_docs",
    "window_left_right",
    "mask_1n1k",
    "mask_late_start",
    "bias_1n1k_causal",
    "alibi_bn",
    "soft_cap",
    "dropout",
)
ALONE_PARAMS = [pytest.param(case, SELF, id=f"{name}-self") for name, case in ALONE.items()] + [
    pytest.param(ALONE[name], CROSS, id=f"{name}-cross") for name in ON_CROSS
]


@pytest.mark.parametrize("case, shape", ALONE_PARAMS)
def test_feature_alone(case, shape, seed):
    check(case, shape, jnp.float32, seed)


# ------------------------------------------------------------------ combined

COMBINED = {
    # The combination: causal + segments + window + GQA + soft-cap.
    "causal_segments_window_softcap": Case(causal=True, segments="packed", window=(7, 0), soft_cap=3.0),
    "lengths_window_segments": Case(window=(9, 4), q_lengths=True, kv_lengths=True, segments="random"),
    "mask_bias_alibi_causal": Case(causal=True, mask=(1, 0, 1, 1), bias=(0, 1, 1, 1), alibi="bn", alibi_grad=True),
    "everything": Case(
        causal=True,
        window=(11, 0),
        q_lengths=True,
        kv_lengths=True,
        segments="packed",
        mask=(1, 1, 1, 1),
        bias=(1, 1, 1, 1),
        alibi="n",
        alibi_grad=True,
        soft_cap=4.0,
        dropout=0.2,
    ),
}


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
        assert rel_err(got, np.asarray(want)) < 1e-4


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
    assert rel_err(ours, theirs) < 1e-4
    assert np.all(np.asarray(ours)[1, Tq // 2 :] == 0.0)


def test_xla_delegate_takes_segments_and_alibi(seed):
    """``implementation="xla"`` gets segment ids as a mask and ALiBi as a bias: same result as the kernels."""
    shape = SELF
    case = Case(causal=True, segments="packed", alibi="bn")
    kw, _, _ = build(case, shape, seed)
    q, k, v, _ = random_qkv(shape, jnp.float32, seed)
    ours = pf.dot_product_attention(q, k, v, implementation="pallas", config=CONFIG, **kw)
    xla = pf.dot_product_attention(q, k, v, implementation="xla", **kw)
    assert rel_err(ours, xla) < 1e-4


# ------------------------------------------------------------------ dropout


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


# ------------------------------------------------------------ block skipping


WINDOW_SPECS = [
    dict(causal=True),
    dict(window=(5, 0), causal=True),
    dict(window=(20, 3)),
    dict(window=(0, 0)),
    dict(window=(3, 40)),
    dict(),
]


@pytest.mark.parametrize("spec_kw", WINDOW_SPECS, ids=str)
@pytest.mark.parametrize("seq_q, seq_k", [(70, 70), (45, 83), (83, 45)])
def test_block_ranges_skip_every_invisible_block(spec_kw, seq_q, seq_k):
    """Forward/dQ and dK/dV block ranges: blocks outside hold no visible element, are tight, and the unmasked middle is fully visible."""
    spec = AttentionSpec(scale=1.0, **spec_kw)
    rng = np.random.default_rng(seq_q * 7 + seq_k)
    for block_q, block_k in ((16, 16), (16, 32), (32, 16)):
        for kv_len in (None, int(rng.integers(0, seq_k + 1))):
            for q_len in (None, int(rng.integers(0, seq_q + 1))):
                vis = np.asarray(
                    visibility_mask(
                        seq_q,
                        seq_k,
                        batch=1,
                        causal=spec.causal,
                        local_window_size=spec.window,
                        query_seq_lengths=None if q_len is None else [q_len],
                        key_value_seq_lengths=None if kv_len is None else [kv_len],
                    )
                )[0, 0]
                structural = np.asarray(
                    visibility_mask(seq_q, seq_k, batch=1, causal=spec.causal, local_window_size=spec.window)
                )[0, 0]
                _check_kv_ranges(spec, vis, structural, block_q, block_k, q_len, kv_len)
                _check_q_ranges(spec, vis, structural, block_q, block_k, q_len, kv_len)


def _as_int(x):
    return int(np.asarray(x))


def _check_kv_ranges(spec, vis, structural, bq, bk, q_len, kv_len):
    seq_q, seq_k = vis.shape
    nk = -(-seq_k // bk)
    for q0 in range(0, seq_q, bq):
        lo, flo, fhi, hi = (
            _as_int(x)
            for x in common.kv_block_range(
                q0,
                spec=spec,
                block_q=bq,
                block_k=bk,
                seq_k=seq_k,
                kv_len=None if kv_len is None else jnp.int32(kv_len),
                q_len=None if q_len is None else jnp.int32(q_len),
                seq_q=seq_q,
            )
        )
        any_vis = [vis[q0 : q0 + bq, kb * bk : (kb + 1) * bk].any() for kb in range(nk)]
        for kb in range(nk):
            if not lo <= kb < hi:
                assert not any_vis[kb], (q0, kb, lo, hi)
        needed = [kb for kb in range(nk) if any_vis[kb]]
        if needed:  # tight: the first and last loaded blocks hold visible elements
            assert lo == needed[0] and hi == needed[-1] + 1, (q0, lo, hi, needed)
        else:
            assert hi == lo
        if seq_k >= bk:
            for kb in range(flo, fhi):  # the unmasked loop: every element visible, no ragged tail
                c0, c1 = kb * bk, (kb + 1) * bk
                assert c1 <= seq_k and (kv_len is None or c1 <= kv_len)
                r1 = min(q0 + bq, seq_q if q_len is None else q_len)  # rows past q_len are never stored
                assert structural[q0:r1, c0:c1].all(), (q0, kb)


def _check_q_ranges(spec, vis, structural, bq, bk, q_len, kv_len):
    seq_q, seq_k = vis.shape
    nq = -(-seq_q // bq)
    for k0 in range(0, seq_k, bk):
        lo, flo, fhi, hi = (
            _as_int(x)
            for x in common.q_block_range(
                k0,
                spec=spec,
                block_q=bq,
                block_k=bk,
                seq_q=seq_q,
                q_len=None if q_len is None else jnp.int32(q_len),
                kv_len=None if kv_len is None else jnp.int32(kv_len),
                seq_k=seq_k,
            )
        )
        if kv_len is not None and k0 + bk > kv_len:  # the kernel masks the straddling block everywhere
            flo = fhi = lo
        any_vis = [vis[qb * bq : (qb + 1) * bq, k0 : k0 + bk].any() for qb in range(nq)]
        for qb in range(nq):
            if not lo <= qb < hi:
                assert not any_vis[qb], (k0, qb, lo, hi)
        needed = [qb for qb in range(nq) if any_vis[qb]]
        if needed:
            assert lo == needed[0] and hi == needed[-1] + 1, (k0, lo, hi, needed)
        else:
            assert hi == lo
        if seq_q >= bq:
            for qb in range(flo, fhi):
                r0, r1 = qb * bq, (qb + 1) * bq
                assert r1 <= seq_q
                c1 = min(k0 + bk, seq_k if kv_len is None else kv_len)
                assert structural[r0:r1, k0:c1].all(), (k0, qb)


@pytest.mark.parametrize("kind", ["packed", "random"])
def test_segment_block_ranges_skip_other_documents(kind):
    """Query blocks loop only over key blocks of their own documents (and vice versa); blocks
    inside one document on both sides run without the segment mask."""
    rng = np.random.default_rng(0)
    t = 200
    ids = _packed_ids(rng, 2, t, 40) if kind == "packed" else rng.integers(0, 3, (2, t)).astype(np.int32)
    jids = jnp.asarray(ids)
    for bq, bk in ((16, 16), (32, 16), (16, 64)):
        for over, (b_self, b_other) in (("kv", (bq, bk)), ("q", (bk, bq))):
            lo, hi, flo, fhi = (np.asarray(x) for x in common.segment_block_ranges(jids, jids, bq, bk, over=over))
            n_other = -(-t // b_other)
            for b in range(2):
                same = ids[b][:, None] == ids[b][None, :]
                for i in range(lo.shape[1]):
                    rows = slice(i * b_self, (i + 1) * b_self)

                    def tile(j):
                        cols = slice(j * b_other, (j + 1) * b_other)
                        return same[rows, cols] if over == "kv" else same[cols, rows]

                    shared = [j for j in range(n_other) if tile(j).any()]
                    for j in range(n_other):
                        if not lo[b, i] <= j < hi[b, i]:
                            assert not tile(j).any()
                    if kind == "packed":
                        assert lo[b, i] == shared[0] and hi[b, i] == shared[-1] + 1
                    assert lo[b, i] <= flo[b, i] <= fhi[b, i] <= hi[b, i]
                    for j in range(flo[b, i], fhi[b, i]):
                        assert tile(j).all(), (over, b, i, j)
                    if kind == "packed":  # every block wholly inside the block's own document is unmasked
                        full = [j for j in range(n_other) if tile(j).all() and len(set(ids[b][rows])) == 1]
                        assert list(range(flo[b, i], fhi[b, i])) == full


# ------------------------------------------------------------ errors


def _qkv():
    return random_qkv(Shape("e", 2, 8, 8, 4, 2, 16), jnp.float32, 0)[:3]


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(bias=jnp.zeros((2, 3, 8, 8))), ValueError, ["bias", "(2, 4, 8, 8)", "(2, 3, 8, 8)"]),
        (dict(bias=jnp.zeros((1, 1, 2, 4, 8, 8))), ValueError, ["bias"]),
        (dict(bias=jnp.zeros((2, 4, 8, 8), jnp.int32)), TypeError, ["bias", "floating"]),
        (dict(mask=jnp.ones((2, 4, 8, 7), bool)), ValueError, ["mask", "(2, 4, 8, 7)"]),
        (dict(mask=jnp.ones((2, 4, 8, 8), jnp.float32)), TypeError, ["mask", "boolean"]),
        (dict(alibi_slopes=jnp.ones((2,))), ValueError, ["alibi_slopes", "(4,)"]),
        (dict(alibi_slopes=jnp.ones((4,), jnp.int32)), TypeError, ["alibi_slopes"]),
        (dict(logits_soft_cap=-1.0), ValueError, ["logits_soft_cap"]),
        (dict(logits_soft_cap="x"), TypeError, ["logits_soft_cap"]),
        (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), ValueError, ["dropout_rate"]),
        (dict(dropout_rate=0.1), ValueError, ["dropout_rng"]),
        (dict(dropout_rate=0.1, dropout_rng=jnp.zeros(3)), TypeError, ["dropout_rng"]),
    ],
)
def test_bad_variant_arguments_raise_named_errors(kwargs, error, words):
    with pytest.raises(error) as info:
        pf.dot_product_attention(*_qkv(), implementation="pallas", **kwargs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_traced_soft_cap_and_rate_are_type_errors():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="logits_soft_cap"):
        jax.jit(lambda c: pf.dot_product_attention(q, k, v, logits_soft_cap=c, implementation="pallas"))(2.0)
    with pytest.raises(TypeError, match="dropout_rate"):
        jax.jit(
            lambda r: pf.dot_product_attention(q, k, v, dropout_rate=r, dropout_rng=jax.random.key(0), implementation="pallas")
        )(0.1)


@pytest.mark.parametrize(
    "kwargs",
    [dict(logits_soft_cap=3.0), dict(dropout_rate=0.1, dropout_rng=jax.random.key(0))],
    ids=["soft_cap", "dropout"],
)
def test_jax_nn_delegates_raise_not_implemented_for_kernel_only_features(kwargs):
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError):
        pf.dot_product_attention(q, k, v, implementation="xla", **kwargs)
    # ("pallas", "xla") takes the kernels, which have them.
    got = pf.dot_product_attention(q, k, v, implementation=("xla", "pallas"), config=CONFIG, **kwargs)
    want = pf.dot_product_attention(q, k, v, implementation="pallas", config=CONFIG, **kwargs)
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_features_under_jit_and_vmap(seed):
    """Traced mask, bias, slopes and dropout key under jit; vmap over an extra batch axis."""
    shape = Shape("small", 1, 24, 24, 2, 1, 16)
    q, k, v, _ = random_qkv(shape, jnp.float32, seed)
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
    batched = jax.vmap(lambda q, k, v: f(q, k, v, bias, mask, slopes, key))(*xs)
    assert rel_err(batched[0], eager) < 1e-6


# ------------------------------------------------------------ the benchmark script


@pytest.mark.skipif(ON_GPU, reason="on a GPU the benchmark itself runs (python -m benchmarks.masks)")
def test_masks_benchmark_smoke(tmp_path):
    """``python -m benchmarks.masks --smoke``: tiny problems run, are checked and make the table."""
    from benchmarks import masks

    problem = masks.problems()[-1]
    assert problem.name == "packed_docs_16k" and sum(problem.doc_lens) == 16384
    assert all(1024 <= n <= 4096 for n in problem.doc_lens)
    assert masks.Problem("w", 1, 16384, 16, 128, window=256).visible_pairs() == sum(min(i + 1, 257) for i in range(16384))
    rc = masks.main(["--smoke", "--problems", "causal,window16,packed_docs", "--out", str(tmp_path)])
    assert rc == 0
    text = (tmp_path / "masks.md").read_text()
    records = [json.loads(line) for line in (tmp_path / "masks.jsonl").read_text().splitlines()]
    ours = [r for r in records if r["impl"] == "pallas_flash"]
    assert len(ours) == 6 and all(r["status"] == "ok" and r["err"] < 2e-2 for r in ours)
    assert "window16 vs causal" in text and "| packed_docs" in text


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
        assert rel_err(got, np.asarray(want)) < 1e-4
