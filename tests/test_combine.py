"""Blocks of a longer sequence (position offsets) and the exact merge of partial results.

A problem split in parts along its keys (and queries), each part computed by
``attention_with_lse`` with its position offsets and merged by ``combine``,
must equal the whole problem: values and gradients (through the merge, so
through the log-sum-exp too) against the float64 reference, with a random
cotangent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash.reference import attention_reference
from pallas_flash.testing.shapes import Shape
from tests.cases import CONFIG, random_qkv
from tests.conftest import ON_GPU, TOLERANCE, rel_err

SHAPE = Shape("split", 2, 300, 300, 4, 2, 64) if ON_GPU else Shape("split", 2, 37, 45, 4, 2, 16)

FEATURES = {
    "full": dict(),
    "causal": dict(is_causal=True),
    "window": dict(local_window_size=(9, 4)),
    "causal_window_softcap": dict(is_causal=True, local_window_size=(12, 0), logits_soft_cap=3.0),
    "alibi_causal": dict(is_causal=True, alibi_slopes=jnp.asarray([0.05, 0.1, 0.2, 0.3], jnp.float32)),
}


def _split_attention(q, k, v, q_cuts, k_cuts, **features):
    """Attention of the whole from parts: query chunks x key chunks, each with its offsets, merged per query chunk."""
    outs, lses = [], []
    for q0, q1 in zip(q_cuts[:-1], q_cuts[1:]):
        parts = [
            pf.attention_with_lse(
                q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], q_offset=q0, k_offset=k0, config=CONFIG, **features
            )
            for k0, k1 in zip(k_cuts[:-1], k_cuts[1:])
        ]
        out, lse = pf.combine([p[0] for p in parts], [p[1] for p in parts])
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", FEATURES)
def test_split_and_merge_equals_the_whole(name, dtype, seed):
    features = FEATURES[name]
    q, k, v, ct = random_qkv(SHAPE, dtype, seed)
    rng = np.random.default_rng(seed)
    ct_lse = jnp.asarray(rng.standard_normal((SHAPE.batch, SHAPE.num_heads, SHAPE.seq_q)), jnp.float32)
    tq, tk = SHAPE.seq_q, SHAPE.seq_k
    q_cuts = (0, tq // 3, tq)
    k_cuts = (0, tk // 2 - 3, tk - 5, tk)  # three key parts, the last one short

    def split(q, k, v):
        return _split_attention(q, k, v, q_cuts, k_cuts, **features)

    (out, lse), vjp = jax.vjp(split, q, k, v)
    grads = vjp((ct, ct_lse))

    # Rows that see no key in the whole get lse = -inf: their lse cotangent must not matter.
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        ref_features = {n: (jnp.asarray(x, jnp.float64) if n == "alibi_slopes" else x) for n, x in features.items()}
        (r_out, r_lse), r_vjp = jax.vjp(
            lambda q, k, v: attention_reference(q, k, v, return_lse=True, **ref_features), *f64
        )
        r_lse_np = np.asarray(r_lse)
        ct_lse64 = jnp.where(jnp.isfinite(r_lse), jnp.asarray(np.asarray(ct_lse), jnp.float64), 0.0)
        r_grads = r_vjp((jnp.asarray(np.asarray(ct, np.float64)), ct_lse64))
    tol = TOLERANCE[jnp.dtype(dtype)]
    finite = np.isfinite(r_lse_np)
    assert np.array_equal(np.isfinite(np.asarray(lse)), finite)
    assert rel_err(np.asarray(lse)[finite], r_lse_np[finite]) <= tol
    for label, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (r_out, *r_grads)):
        err = rel_err(got, np.asarray(want))
        assert err <= tol, f"{label}: relative error {err:.3e} > {tol:.0e} ({name}, seed={seed})"


def test_split_and_merge_keeps_the_dropout_mask_of_the_whole(seed):
    """Dropout bits hash global positions: parts at their offsets, merged, give the whole call's dropped attention
    (values and gradients), not that of masks hashed from each part's own rows."""
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    features = dict(is_causal=True, dropout_rate=0.3, dropout_rng=jax.random.key(seed))
    q_cuts, k_cuts = (0, SHAPE.seq_q // 3, SHAPE.seq_q), (0, SHAPE.seq_k // 2 - 3, SHAPE.seq_k)
    split = lambda q, k, v: _split_attention(q, k, v, q_cuts, k_cuts, **features)[0]  # noqa: E731
    whole = lambda q, k, v: pf.attention_with_lse(q, k, v, config=CONFIG, **features)[0]  # noqa: E731
    (got, got_vjp), (want, want_vjp) = jax.vjp(split, q, k, v), jax.vjp(whole, q, k, v)
    tol = TOLERANCE[jnp.dtype(jnp.float32)]
    for label, a, b in zip(("out", "dq", "dk", "dv"), (got, *got_vjp(ct)), (want, *want_vjp(ct))):
        assert rel_err(a, b) <= tol, f"{label}: relative error {rel_err(a, b):.3e} > {tol:.0e} (seed={seed})"


def test_offsets_alone_match_the_reference(seed):
    """One block whose keys start after its queries (causal): rows before the first key see nothing."""
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    out, lse = pf.attention_with_lse(q, k, v, is_causal=True, q_offset=40, k_offset=50, config=CONFIG)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        r_out, r_lse = attention_reference(*f64, is_causal=True, q_offset=40, k_offset=50, return_lse=True)
    r_lse = np.asarray(r_lse)
    tol = TOLERANCE[jnp.dtype(jnp.float32)]
    assert rel_err(out, np.asarray(r_out)) <= tol
    assert np.array_equal(np.isneginf(np.asarray(lse)), np.isneginf(r_lse))
    seen = np.isfinite(r_lse)
    assert seen.any() and rel_err(np.asarray(lse)[seen], r_lse[seen]) <= tol  # the finite lse values too
    assert np.all(np.asarray(out)[:, :10] == 0)  # rows 40..49 see no key at 50 and beyond


def test_combine_edge_cases():
    out = jnp.ones((1, 3, 2, 4))
    lse = jnp.asarray([[[0.0, -jnp.inf, 1.0], [-jnp.inf, -jnp.inf, 2.0]]])
    o, l = pf.combine([out, 2 * out], [lse, lse])
    assert np.allclose(np.asarray(o)[0, :, 0, 0], [1.5, 0.0, 1.5])  # equal weights; an unseen row stays 0
    assert np.allclose(np.asarray(l)[0, 0], [np.log(2.0), -np.inf, 1.0 + np.log(2.0)])
    # A NaN in a part that a row sees reaches that row's output.
    o, _ = pf.combine([out.at[0, 0].set(jnp.nan), out], [lse, lse])
    assert np.isnan(np.asarray(o)[0, 0, 0, 0])
    # A NaN lse (a part whose row saw a NaN logit) stays NaN in the merged lse and out, not "-inf, sees no key".
    o, l = pf.combine([out, out], [lse.at[0, 0, 0].set(jnp.nan), lse])
    assert np.isnan(np.asarray(l)[0, 0, 0]) and np.isnan(np.asarray(o)[0, 0, 0]).all()
    assert np.isfinite(np.asarray(l)[0, 0, 2]) and np.isfinite(np.asarray(o)[0, 2]).all()  # other rows untouched
    with pytest.raises(ValueError, match="lse"):
        pf.combine([out], [lse[:, :, :2]])
    with pytest.raises(ValueError, match="as many"):
        pf.combine([out, out], [lse])


def test_combine_ignores_what_an_unseen_part_holds(seed):
    """Causal queries 0..4 over three key parts: the last two are seen by no row (lse -inf) and hold NaN outputs,
    which must not reach the merge (0 * NaN); a NaN in a part a row sees (finite lse) must."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s) for s in ((2, 5, 3, 8), (2, 24, 3, 8), (2, 24, 3, 8)))
    with jax.enable_x64(True):
        whole, whole_lse = attention_reference(*(jnp.asarray(x) for x in (q, k, v)), is_causal=True, return_lse=True)
        parts = [attention_reference(jnp.asarray(q), jnp.asarray(k[:, a:a + 8]), jnp.asarray(v[:, a:a + 8]),
                                     is_causal=True, k_offset=a, return_lse=True) for a in (0, 8, 16)]
    lses = [jnp.asarray(l, jnp.float32) for _, l in parts]
    assert np.isneginf(np.asarray(lses[1])).all() and np.isneginf(np.asarray(lses[2])).all()
    outs = [jnp.asarray(parts[0][0], jnp.float32)] + [jnp.full((2, 5, 3, 8), jnp.nan)] * 2
    out, lse = pf.combine(outs, lses)
    assert rel_err(out, np.asarray(whole)) < TOLERANCE[jnp.dtype(jnp.float32)]
    assert rel_err(lse, np.asarray(whole_lse)) < TOLERANCE[jnp.dtype(jnp.float32)]
    out, _ = pf.combine([outs[0].at[1, 3, 2, 0].set(jnp.nan)] + outs[1:], lses)
    assert np.isnan(np.asarray(out)[1, 3, 2, 0]) and np.isfinite(np.delete(np.asarray(out)[1, 3], 2, axis=0)).all()


def test_combine_bad_types():
    out, lse = jnp.ones((1, 2, 3, 4)), jnp.zeros((1, 3, 2))
    with pytest.raises(TypeError, match=r"outs\[0\] must be an array, got list"):
        pf.combine([[1.0]], [lse])
    with pytest.raises(TypeError, match=r"lses\[1\] must be an array, got float"):
        pf.combine([out, out], [lse, 0.0])
    with pytest.raises(TypeError, match=r"outs\[1\] must have a floating dtype, got int32"):
        pf.combine([out, out.astype(jnp.int32)], [lse, lse])


def test_attention_with_lse_needs_a_kernel_backend():
    q, k, v, _ = random_qkv(SHAPE, jnp.float32, 0)
    with pytest.raises(ValueError, match="kernel backend"):
        pf.attention_with_lse(q, k, v, implementation="xla")
    with pytest.raises(TypeError, match="q_offset"):
        pf.attention_with_lse(q, k, v, q_offset=1.5)
