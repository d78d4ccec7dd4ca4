"""The automatic context-parallel path: ``dot_product_attention`` under ``jit`` with the sequence sharded.

On four host CPU devices (conftest), interpret mode: q, k, v (with the
cotangent and the segment ids) sharded on the sequence over a mesh axis, alone
(a 1-D mesh of 4), over both axes of a 2 x 2 mesh (listed in the mesh's order
or not), or beside batch or head sharding on a second axis, under ``Auto`` axes (``custom_partitioning``'s
lower_fn runs the ring) and ``Explicit`` axes (``shard_map`` at trace time).
Each case checks that the compiled forward and forward+backward move K/V with
collective-permutes and hold no all-gather, all-to-all or all-reduce; that the
output and dq, dk, dv keep the inputs' sharding; and that values and gradients
(random cotangent) equal the float64 reference. Also: ``attention_with_lse``
keeps its lse sharded on the sequence; k/v that are not sharded follow the
query's sequence sharding without a gather; a training step on activations
sharded over data and sequence, and ``vmap``, gather nothing; calls the ring
does not implement are gathered under ``Auto`` axes and raise
``NotImplementedError`` under ``Explicit`` ones; uneven sequence shards
raise ``ValueError``; the glue's old import path still works.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_flash as pf
from pallas_flash.reference import attention_reference
from tests.cases import CONFIG
from tests.conftest import HOST_DEVICES, ON_GPU, TOLERANCE, rel_err
from tests.test_ring import random_inputs, side_inputs

pytestmark = pytest.mark.skipif(ON_GPU or HOST_DEVICES < 4, reason="runs on 4 host CPU devices (tests/conftest.py)")

GATHERS = ("all-gather", "all-to-all", "all-reduce")

MESHES = {  # name: (mesh shape, axis names, query spec); k/v and the cotangent follow the query
    "seq": ((4,), ("seq",), P(None, "seq")),
    "seq_over_both_axes": ((2, 2), ("data", "seq"), P(None, ("data", "seq"))),
    "seq_over_both_axes_against_mesh_order": ((2, 2), ("data", "seq"), P(None, ("seq", "data"))),
    "data_x_seq": ((2, 2), ("data", "seq"), P("data", "seq")),
    "seq_x_heads": ((2, 2), ("seq", "heads"), P(None, "seq", "heads")),
}

CASES = {  # name: (mesh, Explicit axes, causal, [B, T, N, K, H], features)
    "seq_auto_causal_gqa": ("seq", False, True, (1, 4 * 12, 4, 2, 24), set()),
    "seq_explicit_lengths_segments": ("seq", True, False, (2, 4 * 10, 2, 1, 16), {"lengths", "segments"}),
    "seq_over_both_axes_auto_causal_lengths": ("seq_over_both_axes", False, True, (1, 4 * 9, 2, 2, 16), {"lengths"}),
    "seq_over_both_axes_against_mesh_order_auto_causal": ("seq_over_both_axes_against_mesh_order", False, True,
                                                          (1, 4 * 8, 2, 1, 16), set()),
    "seq_over_both_axes_against_mesh_order_explicit_gqa_lengths": ("seq_over_both_axes_against_mesh_order", True,
                                                                   False, (1, 4 * 8, 4, 2, 16), {"lengths"}),
    "data_x_seq_auto_causal_segments_lengths": ("data_x_seq", False, True, (2, 2 * 20, 2, 2, 16),
                                                {"segments", "lengths"}),
    "data_x_seq_explicit_causal_gqa": ("data_x_seq", True, True, (2, 2 * 18, 4, 1, 16), set()),
    "seq_x_heads_auto_gqa_segments": ("seq_x_heads", False, False, (1, 2 * 17, 4, 2, 16), {"segments"}),
    "seq_x_heads_explicit_causal_gqa_lengths": ("seq_x_heads", True, True, (1, 2 * 18, 4, 2, 16), {"lengths"}),
}


def _mesh(name: str, explicit: bool):
    shape, names, spec = MESHES[name]
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names), devices=jax.devices("cpu")[:4]), spec


def _place(mesh, spec: P, arrays, side: dict):
    """q, k, v (and more arrays like them) on ``spec``; segment ids on its (batch, seq) dims, lengths on its batch."""
    batch, seq = (tuple(spec) + (None, None))[:2]
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    side_specs = {n: P(batch, seq) if n.endswith("segment_ids") else P(batch) for n in side}
    return [put(x, spec) for x in arrays], {n: put(x, side_specs[n]) for n, x in side.items()}


def _gathers(hlo: str) -> list[str]:
    return [op for op in GATHERS if op in hlo]


def _reference(q, k, v, cts, **kw):
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        out, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **kw), *f64)
        grads = vjp(jax.tree.map(lambda c: jnp.asarray(np.asarray(c, np.float64)), cts))
    return jax.tree.map(np.asarray, out), [np.asarray(g) for g in grads]


def _check(labels, got, want, seed, name):
    tol = TOLERANCE[jnp.dtype(jnp.float32)]
    for label, g, w in zip(labels, got, want):
        g = np.asarray(g, np.float64)
        assert g.shape == w.shape and not np.isnan(g).any(), f"{label} ({name})"
        err = rel_err(g, w)
        assert err <= tol, f"{label}: relative error {err:.3e} > {tol:.0e} ({name}, seed={seed})"


@pytest.mark.parametrize("name", CASES)
def test_sequence_sharded_call_runs_the_ring(name, seed):
    mesh_name, explicit, causal, shape, features = CASES[name]
    mesh, spec = _mesh(mesh_name, explicit)
    q, k, v, ct = random_inputs(shape, jnp.float32, seed)
    side = side_inputs(features, shape[0], shape[1], seed)
    (pq, pk, pv, pct), pside = _place(mesh, spec, (q, k, v, ct), side)

    def attend(q, k, v, side):
        return pf.dot_product_attention(q, k, v, is_causal=causal, implementation="pallas", config=CONFIG, **side)

    def fwd_bwd(q, k, v, side, ct):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, side), q, k, v)
        return out, vjp(ct)

    with jax.set_mesh(mesh):
        fwd_hlo = jax.jit(attend).lower(pq, pk, pv, pside).compile().as_text()
        compiled = jax.jit(fwd_bwd).lower(pq, pk, pv, pside, pct).compile()
        out, grads = compiled(pq, pk, pv, pside, pct)
    for label, hlo in (("forward", fwd_hlo), ("forward+backward", compiled.as_text())):
        assert _gathers(hlo) == [], f"{label} ({name}): {_gathers(hlo)} in the HLO"
        assert "collective-permute" in hlo, f"{label} ({name}): K/V never travel"
    for label, got, x in zip(("out", "dq", "dk", "dv"), (out, *grads), (pq, pq, pk, pv)):
        assert got.sharding.is_equivalent_to(x.sharding, got.ndim), f"{label}: {got.sharding} != {x.sharding}"
    want_out, want_grads = _reference(q, k, v, ct, is_causal=causal, **side)
    _check(("out", "dq", "dk", "dv"), (out, *grads), (want_out, *want_grads), seed, name)


def test_ring_over_two_axes_against_the_mesh_order_needs_no_set_mesh(seed):
    """The sequence over ("seq", "data") of a ("data", "seq") mesh, jit with no ``jax.set_mesh``: the partition
    callback then has no mesh in its context, and ``ppermute`` wants the mesh's order of the axes."""
    mesh, spec = _mesh("seq_over_both_axes_against_mesh_order", explicit=False)
    shape = (1, 4 * 8, 2, 1, 16)
    q, k, v, ct = random_inputs(shape, jnp.float32, seed)
    (pq, pk, pv, pct), _ = _place(mesh, spec, (q, k, v, ct), {})

    def fwd_bwd(q, k, v, ct):
        fn = lambda q, k, v: pf.dot_product_attention(q, k, v, is_causal=True, config=CONFIG)  # noqa: E731
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct)

    compiled = jax.jit(fwd_bwd).lower(pq, pk, pv, pct).compile()
    out, grads = compiled(pq, pk, pv, pct)
    assert _gathers(compiled.as_text()) == [] and "collective-permute" in compiled.as_text()
    want_out, want_grads = _reference(q, k, v, ct, is_causal=True)
    _check(("out", "dq", "dk", "dv"), (out, *grads), (want_out, *want_grads), seed, "no set_mesh")


def test_attention_with_lse_keeps_the_lse_sharded(seed):
    """``(out, lse)`` with equal position offsets (the causal mask unshifted): both sharded on the sequence, the
    lse's cotangent reaching dq, dk, dv."""
    mesh, spec = _mesh("seq", explicit=False)
    shape = (1, 4 * 12, 2, 2, 16)
    q, k, v, ct = random_inputs(shape, jnp.float32, seed)
    ct_lse = jnp.asarray(np.random.default_rng(seed + 2).standard_normal((1, 2, shape[1])), jnp.float32)
    (pq, pk, pv, pct), _ = _place(mesh, spec, (q, k, v, ct), {})
    pct_lse = jax.device_put(ct_lse, NamedSharding(mesh, P(None, None, "seq")))

    def fwd_bwd(q, k, v, cts):
        fn = lambda q, k, v: pf.attention_with_lse(q, k, v, is_causal=True, q_offset=7, k_offset=7,  # noqa: E731
                                                   config=CONFIG)
        outs, vjp = jax.vjp(fn, q, k, v)
        return outs, vjp(cts)

    with jax.set_mesh(mesh):
        compiled = jax.jit(fwd_bwd).lower(pq, pk, pv, (pct, pct_lse)).compile()
        (out, lse), grads = compiled(pq, pk, pv, (pct, pct_lse))
    assert _gathers(compiled.as_text()) == [] and "collective-permute" in compiled.as_text()
    assert lse.sharding.is_equivalent_to(pct_lse.sharding, 3), lse.sharding
    for got, x in zip((out, *grads), (pq, pq, pk, pv)):
        assert got.sharding.is_equivalent_to(x.sharding, got.ndim), f"{got.sharding} != {x.sharding}"
    (want_out, want_lse), want_grads = _reference(q, k, v, (ct, ct_lse), is_causal=True, return_lse=True)
    _check(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (want_out, want_lse, *want_grads), seed, "lse")


def test_unsharded_keys_follow_the_query_sequence(seed):
    """Auto axes, only q sharded on the sequence: k/v are sliced to follow (no gather) and the ring runs."""
    mesh, spec = _mesh("seq", explicit=False)
    q, k, v, _ = random_inputs((1, 4 * 10, 2, 1, 16), jnp.float32, seed)
    pq = jax.device_put(q, NamedSharding(mesh, spec))
    pk, pv = (jax.device_put(x, NamedSharding(mesh, P())) for x in (k, v))
    fn = jax.jit(lambda q, k, v: pf.dot_product_attention(q, k, v, is_causal=True, config=CONFIG))
    compiled = fn.lower(pq, pk, pv).compile()
    assert _gathers(compiled.as_text()) == [] and "collective-permute" in compiled.as_text()
    out = compiled(pq, pk, pv)
    assert out.sharding.is_equivalent_to(pq.sharding, 4), out.sharding
    _check(("out",), (out,), (_reference(q, k, v, np.zeros(q.shape), is_causal=True)[0],), seed, "follow")


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_a_training_step_on_activations_sharded_over_data_and_sequence(explicit, seed):
    """q, k, v projected from activations ``[B, T, D]`` sharded P("data", "seq") (their sharding found by propagation,
    or by the types): the step's only collectives are the ring's permutes and the sums of the weights' gradients."""
    mesh, _ = _mesh("data_x_seq", explicit)
    b, t, d, n, h = 2, 2 * 16, 24, 2, 16
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, t, d), dtype=np.float32)
    weights = {name: rng.standard_normal((d, n * h), dtype=np.float32) / 5 for name in "qkvo"}

    def loss(w, x, attention):
        q, k, v = ((x @ w[name]).reshape(b, t, n, h) for name in "qkv")
        out = attention(q, k, v).reshape(b, t, n * h)
        return jnp.mean((out @ w["o"].T) ** 2)

    kernels = lambda q, k, v: pf.dot_product_attention(q, k, v, is_causal=True, config=CONFIG)  # noqa: E731
    placed_x = jax.device_put(x, NamedSharding(mesh, P("data", "seq")))
    placed_w = jax.device_put(weights, NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(lambda w, x: loss(w, x, kernels))).lower(placed_w, placed_x).compile()
        value, grads = step(placed_w, placed_x)
    hlo = step.as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo and "collective-permute" in hlo
    with jax.enable_x64(True):
        reference = lambda q, k, v: attention_reference(q, k, v, is_causal=True)  # noqa: E731
        w64 = {name: jnp.asarray(w, jnp.float64) for name, w in weights.items()}
        want, want_grads = jax.value_and_grad(lambda w, x: loss(w, x, reference))(w64, jnp.asarray(x, jnp.float64))
    names = sorted(weights)
    got = [value] + [grads[name] for name in names]
    _check(["loss"] + names, got, [np.asarray(want)] + [np.asarray(want_grads[name]) for name in names], seed, "step")


def test_vmap_over_a_sequence_sharded_call(seed):
    """vmap adds a leading factor; the sequence (dim 2 now) still runs the ring."""
    mesh, _ = _mesh("seq", explicit=False)
    q, k, v, _ = random_inputs((3, 4 * 8, 2, 2, 16), jnp.float32, seed)
    q, k, v = (x[:, None] for x in (q, k, v))  # [3, 1, T, N, H]
    placed = [jax.device_put(x, NamedSharding(mesh, P(None, None, "seq"))) for x in (q, k, v)]
    fn = jax.vmap(lambda q, k, v: pf.dot_product_attention(q, k, v, is_causal=True, config=CONFIG))
    compiled = jax.jit(fn).lower(*placed).compile()
    assert _gathers(compiled.as_text()) == [] and "collective-permute" in compiled.as_text()
    out = compiled(*placed)
    assert out.sharding.is_equivalent_to(placed[0].sharding, 5), out.sharding
    want = np.stack([_reference(q[i], k[i], v[i], np.zeros(q[i].shape), is_causal=True)[0] for i in range(3)])
    _check(("out",), (out,), (want,), seed, "vmap")


def test_auto_axes_gather_the_sequence_for_a_call_the_ring_does_not_implement(seed):
    """A local window under Auto axes: the sequence is all-gathered around the kernels (documented); exact."""
    mesh, spec = _mesh("seq", explicit=False)
    q, k, v, _ = random_inputs((1, 4 * 8, 2, 2, 16), jnp.float32, seed)
    placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
    fn = jax.jit(lambda q, k, v: pf.dot_product_attention(q, k, v, local_window_size=(5, 2), config=CONFIG))
    compiled = fn.lower(*placed).compile()
    assert "all-gather" in compiled.as_text() and "collective-permute" not in compiled.as_text()
    want = _reference(q, k, v, np.zeros(q.shape), local_window_size=(5, 2))[0]
    _check(("out",), (compiled(*placed),), (want,), seed, "window")


UNSUPPORTED = {  # feature: (keywords of the call, what the error names)
    "window": (dict(local_window_size=4), "a local window"),
    "soft_cap": (dict(logits_soft_cap=3.0), "a logits soft-cap"),
    "dropout": (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "dropout"),
    "bias": (dict(bias=jnp.zeros((1, 1, 32, 32))), "a bias"),
    "mask": (dict(mask=jnp.ones((1, 1, 32, 32), bool)), "a mask"),
    "alibi": (dict(alibi_slopes=jnp.ones((2,))), "ALiBi slopes"),
    "shifted_causal": (dict(is_causal=True, q_offset=3), "shifted by position offsets"),
}


@pytest.mark.parametrize("feature", UNSUPPORTED)
def test_explicit_axes_refuse_a_call_the_ring_does_not_implement(feature):
    kw, message = UNSUPPORTED[feature]
    mesh, spec = _mesh("seq", explicit=True)
    x = jax.device_put(jnp.zeros((1, 32, 2, 16)), NamedSharding(mesh, spec))
    call = pf.attention_with_lse if "q_offset" in kw else pf.dot_product_attention
    with jax.set_mesh(mesh), pytest.raises(NotImplementedError, match=f"sharded over mesh axes.*{message}"):
        jax.jit(lambda x: call(x, x, x, implementation="pallas", config=CONFIG, **kw)).trace(x)


def test_explicit_axes_refuse_different_query_and_key_lengths():
    mesh, spec = _mesh("seq", explicit=True)
    q = jax.device_put(jnp.zeros((1, 32, 2, 16)), NamedSharding(mesh, spec))
    kv = jax.device_put(jnp.zeros((1, 48, 2, 16)), NamedSharding(mesh, spec))
    with jax.set_mesh(mesh), pytest.raises(NotImplementedError, match=r"different lengths \(query \(1, 32, 2, 16\)"):
        jax.jit(lambda q, kv: pf.dot_product_attention(q, kv, kv, implementation="pallas", config=CONFIG)).trace(q, kv)


def test_uneven_sequence_shards_raise():
    """Auto axes (Explicit ones refuse an uneven sharding before the kernels are reached)."""
    mesh, spec = _mesh("seq", explicit=False)
    x = jnp.zeros((1, 30, 2, 16))

    def fn(x):  # 30 positions over 4 devices
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        return pf.dot_product_attention(x, x, x, implementation="pallas", config=CONFIG)

    with pytest.raises(Exception, match=r"sequence dim .* mesh axes \('seq',\) of size 4, which does not divide its "
                                        r"length 30"):
        jax.jit(fn).lower(x).compile()
