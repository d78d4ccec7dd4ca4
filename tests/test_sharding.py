"""The kernels under ``jax.jit`` with inputs sharded over batch and heads: each device computes its own shard.

On a CPU with four host devices (conftest) in interpret mode: for 1-D batch,
1-D heads and 2-D (batch x heads) meshes, the compiled HLO of the forward
and of forward+backward holds no all-gather, all-to-all or collective-permute
(the only collective allowed is the all-reduce that sums the gradient of an
input broadcast over a sharded dim); outputs and gradients keep the inputs'
sharding; values and gradients (random cotangent) equal the float64
reference. Side inputs follow the sharding of their dims; dropout masks are
the same sharded or not; multi-query attention (one KV head) partitions
too; meshes that would split a GQA group or the batch unevenly raise errors
naming the axes. (A sharded sequence: tests/test_context_parallel.py.)
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
from pallas_flash.testing.shapes import Shape
from tests.cases import CONFIG, Case, _slope_grad_scale, build, random_qkv
from tests.conftest import TOLERANCE, rel_err
from tests.test_triton_ir import H100, triton_modules  # noqa: F401 - the fixture that captures Triton modules

NUM_DEVICES = len(jax.devices())
pytestmark = pytest.mark.skipif(NUM_DEVICES < 4, reason="needs 4 devices (conftest gives 4 host devices on a CPU)")

# Batch 4 and 8 query heads in 4 GQA groups split 4 ways on either dim; ragged
# lengths (blocks of 16 on a CPU), cross-attention, a non-power-of-two head dim.
SHAPE = Shape("sharded", 4, 29, 35, 8, 4, 24)
GATHERS = ("all-gather", "all-to-all", "collective-permute")

MESHES = {
    # name: (mesh shape, axis names, query spec); k/v and every side input follow the query.
    "batch": ((4,), ("x",), P("x")),
    "heads": ((4,), ("x",), P(None, None, "x")),
    "batch_x_heads": ((2, 2), ("data", "model"), P("data", None, "model")),
}


def _mesh(name: str, explicit: bool = False):
    shape, axes, spec = MESHES[name]
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, axes, axis_types=(kind,) * len(axes)), spec


def _collectives(hlo: str) -> list[str]:
    return [op for op in GATHERS if op in hlo]


def _side_spec(name: str, x, q_spec: P) -> P:
    """The sharding of a side input: its batch and head dims (when full-size) follow the query's."""
    b, _, n, _ = tuple(q_spec) + (None,) * (4 - len(q_spec))
    B, N = SHAPE.batch, SHAPE.num_heads
    if name in ("query_seq_lengths", "key_value_seq_lengths"):
        return P(b)
    if name in ("q_segment_ids", "kv_segment_ids"):
        return P(b, None)
    if name in ("bias", "mask"):
        shape = (1,) * (4 - x.ndim) + tuple(x.shape)
        return P(b if shape[0] == B else None, n if shape[1] == N else None, None, None)
    if name == "alibi_slopes":
        return P(b, n) if x.ndim == 2 else P(n)
    return P()


def _fwd_bwd(fn):
    def run(*args):
        out, vjp = jax.vjp(fn, *args[:-1])
        return out, vjp(args[-1])

    return run


def _compile_sharded(fn, mesh, q_spec, q, k, v, ct, diff=(), side=None):
    """``(compiled forward+backward, placed arguments)``: q/k/v/ct on ``q_spec``, each side input on its own.

    ``diff`` (name, array) pairs are differentiated (positional after q, k, v);
    ``side`` arrays are passed to ``fn`` by name, as arguments of the jitted function.
    """
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    side = dict(side or {})
    primals = [put(q, q_spec), put(k, q_spec), put(v, q_spec)] + [put(x, _side_spec(n, x, q_spec)) for n, x in diff]
    extra = [put(x, _side_spec(n, x, q_spec)) for n, x in side.items()]

    def run(*args):
        n = len(primals)
        named = dict(zip(side, args[n + 1 :]))
        out, vjp = jax.vjp(lambda *p: fn(*p, **named), *args[:n])
        return out, vjp(args[n])

    args = primals + [put(ct, q_spec)] + extra
    return jax.jit(run).lower(*args).compile(), args


def _reference(q, k, v, ct, ref_kw, diff):
    names = [n for n, _ in diff]
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, *(x for _, x in diff))]

        def ref_fn(q, k, v, *d):
            return attention_reference(q, k, v, **ref_kw, **dict(zip(names, d)))

        out, vjp = jax.vjp(ref_fn, *f64)
        grads = vjp(jnp.asarray(np.asarray(ct, np.float64)))
    return np.asarray(out), [np.asarray(g) for g in grads], f64


def _check_against_reference(case, out, grads, q, k, v, ct, ref_kw, diff, dtype, seed):
    ref_out, ref_grads, f64 = _reference(q, k, v, ct, ref_kw, diff)
    tol = TOLERANCE[jnp.dtype(dtype)]
    labels = ["out", "dq", "dk", "dv", *(f"d{n}" for n, _ in diff)]
    for label, got, want in zip(labels, (out, *grads), (ref_out, *ref_grads)):
        assert not np.isnan(np.asarray(got, np.float64)).any(), f"{label} has NaN"
        if label == "dalibi_slopes":  # the slopes' gradient sums terms that cancel: relative to their magnitudes
            scale = _slope_grad_scale(SHAPE, ref_kw, {n: x for (n, _), x in zip(diff, f64[3:])}, f64[:3], ct)
            err = np.linalg.norm(np.asarray(got, np.float64) - want) / scale
        else:
            err = rel_err(got, want)
        assert err <= tol, f"{label}: relative error {err:.3e} > {tol:.0e} ({case}, seed={seed})"


def test_kernels_take_the_default_config_of_their_shard(monkeypatch, seed):
    """Without a config each device's kernels take their backend's default for its shard (half the batch and half
    the heads here), not the whole call's: a config may depend on them (the Mosaic forward's small-grid rule). A
    config the caller passes is used as it is."""
    from pallas_flash import backends
    from pallas_flash.sharding import partition

    triton = type(backends.get("triton"))
    shard_shapes = []
    original = triton.shard_config

    def spy(self, q, k, v, inputs, spec):
        shard_shapes.append((q.shape, k.shape))
        return original(self, q, k, v, inputs, spec)

    monkeypatch.setattr(triton, "shard_config", spy)
    mesh, spec = _mesh("batch_x_heads")
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    for config in (None, CONFIG):
        shard_shapes.clear()
        partition._trace.cache_clear()

        def fn(q, k, v, config=config):
            return pf.dot_product_attention(q, k, v, is_causal=True, implementation="triton", config=config)

        compiled, args = _compile_sharded(fn, mesh, spec, q, k, v, ct)
        if config is None:  # the kernels on (2 of 4 rows, T, 4 of 8 heads, D); the whole call is traced for its shapes
            assert ((2, 29, 4, 24), (2, 35, 2, 24)) in shard_shapes
            assert set(shard_shapes) <= {((2, 29, 4, 24), (2, 35, 2, 24)), ((4, 29, 8, 24), (4, 35, 4, 24))}
        else:
            assert shard_shapes == []
    out, grads = compiled(*args)
    _check_against_reference("causal", out, grads, q, k, v, ct, dict(is_causal=True), [], jnp.float32, seed)


@pytest.mark.parametrize("mesh_name", MESHES)
def test_partitions_with_no_gather_and_matches_reference(mesh_name, seed):
    mesh, spec = _mesh(mesh_name)
    dtype = jnp.float32
    q, k, v, ct = random_qkv(SHAPE, dtype, seed)

    def fn(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=True, implementation="pallas", config=CONFIG)

    compiled, args = _compile_sharded(fn, mesh, spec, q, k, v, ct)
    hlo = compiled.as_text()
    assert _collectives(hlo) == [], f"forward+backward on {mesh_name}: {_collectives(hlo)} in the HLO"
    assert "all-reduce" not in hlo  # nothing to sum: every gradient is sharded like its input
    fwd_hlo = jax.jit(fn).lower(*args[:3]).compile().as_text()
    assert _collectives(fwd_hlo) == [] and "all-reduce" not in fwd_hlo, f"forward on {mesh_name}"

    out, grads = compiled(*args)
    for got, x in zip((out, *grads), args[:3] * 2):
        assert got.sharding.is_equivalent_to(x.sharding, got.ndim), f"{got.sharding} != {x.sharding}"
    _check_against_reference("causal", out, grads, q, k, v, ct, dict(is_causal=True), [], dtype, seed)


def test_multi_query_attention_partitions(seed):
    """One KV head for 4 query heads (MQA): the heads factor is the group alone (Shardy refuses a size-1 factor in a
    compound one; this failed to lower before)."""
    mesh, spec = _mesh("batch")
    shape = Shape("mqa", 4, 21, 21, 4, 1, 16)
    q, k, v, ct = random_qkv(shape, jnp.float32, seed)

    def fn(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=True, implementation="pallas", config=CONFIG)

    compiled, args = _compile_sharded(fn, mesh, spec, q, k, v, ct)
    assert _collectives(compiled.as_text()) == []
    out, grads = compiled(*args)
    for got, x in zip((out, *grads), args[:3] * 2):
        assert got.sharding.is_equivalent_to(x.sharding, got.ndim), f"{got.sharding} != {x.sharding}"
    _check_against_reference("mqa", out, grads, q, k, v, ct, dict(is_causal=True), [], jnp.float32, seed)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_multi_query_attention_shards_the_query_heads(explicit, seed):
    """MQA with the query heads sharded (tensor parallelism) and the one K/V head replicated: each device runs its
    quarter of the heads (no gather); dK/dV are the sums over the head shards, in the primals' shardings."""
    kind = AxisType.Explicit if explicit else AxisType.Auto
    mesh = jax.make_mesh((4,), ("x",), axis_types=(kind,))
    shape = Shape("mqa_tp", 2, 21, 21, 8, 1, 16)
    q, k, v, ct = random_qkv(shape, jnp.float32, seed)
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    args = [put(q, P(None, None, "x")), put(k, P()), put(v, P()), put(ct, P(None, None, "x"))]

    def fn(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=True, implementation="pallas", config=CONFIG)

    with jax.set_mesh(mesh):
        compiled = jax.jit(_fwd_bwd(fn)).lower(*args).compile()
        hlo = compiled.as_text()
        out, grads = compiled(*args)
    assert _collectives(hlo) == [], _collectives(hlo)
    assert "all-reduce" in hlo  # dK/dV summed over the head shards
    assert out.sharding.is_equivalent_to(args[0].sharding, 4)
    for got, x in zip(grads, args[:3]):
        assert got.sharding.is_equivalent_to(x.sharding, got.ndim), f"{got.sharding} != {x.sharding}"
    _check_against_reference("mqa_tp", out, grads, q, k, v, ct, dict(is_causal=True), [], jnp.float32, seed)


SIDE_CASES = {
    # A bias and [N] slopes broadcast over the (sharded) batch: their gradients are summed over batch shards.
    "lengths_segments_bias_b_alibi_n": Case(
        causal=True, q_lengths=True, kv_lengths=True, segments="random", bias=(0, 1, 1, 1), alibi="n", alibi_grad=True
    ),
    # A bias broadcast over the (sharded) heads, a head-broadcast mask, per-batch slopes, a window.
    "mask_bias_n_alibi_bn": Case(window=(7, 3), mask=(1, 0, 1, 1), bias=(1, 0, 0, 1), alibi="bn", alibi_grad=True),
}


@pytest.mark.parametrize("case_name", SIDE_CASES)
def test_side_inputs_follow_the_sharding(case_name, seed):
    case = SIDE_CASES[case_name]
    mesh, spec = _mesh("batch_x_heads")
    dtype = jnp.float32
    kw, ref_kw, diff = build(case, SHAPE, seed)
    q, k, v, ct = random_qkv(SHAPE, dtype, seed)
    names = list(diff)

    def fn(q, k, v, *d, **side):
        return pf.dot_product_attention(
            q, k, v, implementation="pallas", config=CONFIG, **dict(zip(names, d)), **side
        )

    side = {n: x for n, x in kw.items() if hasattr(x, "shape")}
    static = {n: x for n, x in kw.items() if n not in side}
    compiled, args = _compile_sharded(
        lambda *a, **s: fn(*a, **s, **static), mesh, spec, q, k, v, ct, list(diff.items()), side
    )
    hlo = compiled.as_text()
    assert _collectives(hlo) == [], f"{case_name}: {_collectives(hlo)} in the HLO"
    assert "all-reduce" in hlo  # the broadcast bias's (and slopes') gradient, summed over shards
    out, grads = compiled(*args)
    for got, x in zip((out, *grads[:3]), args[:3] * 2):
        assert got.sharding.is_equivalent_to(x.sharding, got.ndim)
    _check_against_reference(case_name, out, grads, q, k, v, ct, ref_kw, list(diff.items()), dtype, seed)


@pytest.mark.parametrize(
    "mesh_name,spec",
    [("batch_x_heads", None), ("batch_x_heads", P(("data", "model"))), ("batch_x_heads", P(None, None, ("model", "data")))],
    ids=["batch_x_heads", "batch_over_both_axes", "heads_over_both_axes"],
)
def test_dropout_mask_is_the_same_sharded_or_not(mesh_name, spec, seed):
    """Keep bits hash global (batch, head, row, col): each shard adds its offsets, so the result is the unsharded one."""
    mesh, default = _mesh(mesh_name)
    spec = default if spec is None else spec
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    key = jax.random.key(seed)

    def fn(q, k, v):
        return pf.dot_product_attention(
            q, k, v, is_causal=True, dropout_rate=0.3, dropout_rng=key, implementation="pallas", config=CONFIG
        )

    compiled, args = _compile_sharded(fn, mesh, spec, q, k, v, ct)
    assert _collectives(compiled.as_text()) == []
    out, grads = compiled(*args)
    want_out, want_grads = jax.jit(_fwd_bwd(fn))(q, k, v, ct)  # one device
    for got, want in zip((out, *grads), (want_out, *want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert rel_err(out, jax.jit(lambda *a: pf.dot_product_attention(*a, is_causal=True, config=CONFIG))(q, k, v)) > 1e-2


def test_explicit_mesh_axes(seed):
    """Under ``jax.set_mesh`` with Explicit axes (jax.make_mesh's default) the shardings are in the types."""
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    spec = P("data", None, "model")
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    bias = jnp.asarray(np.random.default_rng(seed).standard_normal((1, 1, SHAPE.seq_q, SHAPE.seq_k)), jnp.float32)

    def fn(q, k, v, bias):
        return pf.dot_product_attention(q, k, v, bias, is_causal=True, implementation="pallas", config=CONFIG)

    with jax.set_mesh(mesh):
        compiled, args = _compile_sharded(fn, mesh, spec, q, k, v, ct, [("bias", bias)])
        assert _collectives(compiled.as_text()) == []
        out, grads = compiled(*args)
    for got, x in zip((out, *grads[:3]), args[:3] * 2):
        assert got.sharding.is_equivalent_to(x.sharding, got.ndim), f"{got.sharding} != {x.sharding}"
    _check_against_reference("explicit", out, grads, q, k, v, ct, dict(is_causal=True), [("bias", bias)], jnp.float32, seed)


def test_the_same_call_under_another_mesh(seed):
    """The kernels' trace is cached by call and shapes; the same call under ``jax.set_mesh`` of another mesh must
    take that mesh (the cached result types carried the first mesh: a compile error, or the output on it)."""
    q, k, v, _ = random_qkv(Shape("remesh", 4, 16, 16, 4, 4, 16), jnp.float32, seed)
    want = attention_reference(*(np.asarray(x, np.float64) for x in (q, k, v)))
    for shape, names, spec in (((4,), ("x",), P("x")), ((2, 2), ("data", "model"), P("data", None, "model")),
                               ((4,), ("y",), P("y"))):
        mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
        args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
        with jax.set_mesh(mesh):
            out = jax.jit(_attention)(*args)  # a fresh jit: only the kernels' trace is shared
        assert out.sharding.mesh.axis_names == names and out.sharding.is_equivalent_to(args[0].sharding, 4)
        assert rel_err(out, want) <= TOLERANCE[jnp.dtype(jnp.float32)]


def test_explicit_gradients_take_the_primals_shardings(seed):
    """Under Explicit axes the kernels run on the rule's shardings (k/v follow a sequence-sharded q: the ring); the
    custom VJP's cotangents must come back in the primals' types (replicated k/v here), or jax.grad fails."""
    mesh = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Explicit,))
    shape = Shape("ring_explicit", 1, 32, 32, 2, 2, 16)
    q, k, v, ct = random_qkv(shape, jnp.float32, seed)
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    args = [put(q, P(None, "x")), put(k, P()), put(v, P()), put(ct, P(None, "x"))]

    def fn(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=True, implementation="pallas", config=CONFIG)

    with jax.set_mesh(mesh):
        out, grads = jax.jit(_fwd_bwd(fn))(*args)
    for got, x in zip(grads, args[:3]):
        assert got.sharding.is_equivalent_to(x.sharding, got.ndim), f"{got.sharding} != {x.sharding}"
    _check_against_reference("ring_explicit", out, grads, q, k, v, ct, dict(is_causal=True), [], jnp.float32, seed)


def test_mosaic_interpret_mode_under_explicit_axes(seed):
    """The Mosaic interpreter runs unpartitioned (a CPU path): under Explicit axes its inputs are replicated first
    (it cannot index sharded types: a Pallas TypeError before)."""
    mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:2])
    q, k, v, _ = random_qkv(Shape("mosaic_explicit", 2, 16, 16, 2, 2, 64), jnp.bfloat16, seed)
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("x")))  # noqa: E731
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: pf.dot_product_attention(q, k, v, is_causal=True, implementation="mosaic"))(
            put(q), put(k), put(v))
    want = attention_reference(*(np.asarray(x, np.float64) for x in (q, k, v)), is_causal=True)
    assert rel_err(np.asarray(out, np.float32), want) <= TOLERANCE[jnp.dtype(jnp.bfloat16)]


def test_vmap_over_a_sharded_leading_axis(seed):
    """vmap adds a leading dim (a factor of its own): sharded on it, each device still runs only its shard."""
    mesh, _ = _mesh("batch")
    small = Shape("vmapped", 2, 21, 21, 2, 2, 16)
    draws = [random_qkv(small, jnp.float32, seed + i) for i in range(4)]
    q, k, v = (jnp.stack([d[i] for d in draws]) for i in range(3))  # [4, B, T, N, H]

    def fn(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=True, implementation="pallas", config=CONFIG)

    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("x")))  # noqa: E731
    compiled = jax.jit(jax.vmap(fn)).lower(put(q), put(k), put(v)).compile()
    assert _collectives(compiled.as_text()) == []
    out = compiled(put(q), put(k), put(v))
    assert out.sharding.is_equivalent_to(put(q).sharding, out.ndim)
    for i, (qi, ki, vi, _) in enumerate(draws):
        want = attention_reference(*(np.asarray(x, np.float64) for x in (qi, ki, vi)), is_causal=True)
        assert rel_err(out[i], want) <= TOLERANCE[jnp.dtype(jnp.float32)]


def test_vmap_over_an_explicit_sharded_axis(seed):
    """vmap over a dim sharded on an Explicit axis (heads on another): that dim is a factor of the shard_map, so no
    gather; vmap of the shard_map itself failed in the interpreted kernels' stores (a ShardingTypeError)."""
    mesh = jax.make_mesh((2, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
    small = Shape("vmap_explicit", 2, 21, 21, 4, 2, 24)  # T not a multiple of the blocks, GQA groups of 2
    draws = [random_qkv(small, jnp.float32, seed + i) for i in range(2)]
    args = [jax.device_put(jnp.stack([d[i] for d in draws]), NamedSharding(mesh, P("x", None, None, "y")))
            for i in range(4)]  # q, k, v, ct: [2, B, T, N, H]

    def fn(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=True, implementation="pallas", config=CONFIG)

    with jax.set_mesh(mesh):
        compiled = jax.jit(_fwd_bwd(jax.vmap(fn))).lower(*args).compile()
        assert _collectives(compiled.as_text()) == []
        out, grads = compiled(*args)
    for got in (out, *grads):
        assert got.sharding.is_equivalent_to(args[0].sharding, got.ndim), f"{got.sharding} != {args[0].sharding}"
    out, grads = np.asarray(out), [np.asarray(g) for g in grads]
    for i, (q, k, v, ct) in enumerate(draws):
        got = [g[i] for g in grads]
        _check_against_reference("vmap_explicit", out[i], got, q, k, v, ct, dict(is_causal=True), [], jnp.float32, seed)


def _attention(q, k, v):
    return pf.dot_product_attention(q, k, v, implementation="pallas", config=CONFIG)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_heads_that_would_split_a_gqa_group_raise(explicit):
    """8 query heads in 2 groups (2 KV heads) over 4 devices: a shard would hold half a group."""
    mesh, spec = _mesh("heads", explicit=explicit)
    shape = Shape("gqa2", 1, 16, 16, 8, 2, 16)
    q, k, v, _ = random_qkv(shape, jnp.float32, 0)
    q = jax.device_put(q, NamedSharding(mesh, spec))
    k, v = (jax.device_put(x, NamedSharding(mesh, P())) for x in (k, v))
    with jax.set_mesh(mesh), pytest.raises(Exception, match=r"whole GQA groups.*\(8\).*\(2\).*divisible by 4") as info:
        jax.jit(_attention).lower(q, k, v).compile()
    if explicit:  # the shardings are known when tracing: a plain ValueError
        assert info.type is ValueError


def test_uneven_batch_raises():
    mesh, _ = _mesh("batch")
    shape = Shape("b2", 2, 16, 16, 2, 2, 16)
    q, k, v, _ = random_qkv(shape, jnp.float32, 0)

    def fn(q, k, v):
        q = jax.lax.with_sharding_constraint(q, NamedSharding(mesh, P("x")))  # batch 2 over 4 devices
        return _attention(q, k, v)

    with pytest.raises(Exception, match=r"batch dim .* mesh axes \('x',\) of size 4, which does not divide batch 2"):
        jax.jit(fn).lower(q, k, v).compile()


def test_shard_dropout_kernels_lower_for_cuda(triton_modules):  # noqa: F811 - the imported fixture
    """A shard's kernels (the seed carrying its batch/head offsets) lower to Triton modules that verify."""
    from pallas_flash import backends, validate
    from pallas_flash.backends.triton.config import default_config
    from pallas_flash.sharding.partition import Kernels

    shape = Shape("lowered", 2, 300, 300, 4, 2, 64)
    dtype = jnp.bfloat16
    config = default_config(head_dim=64, dtype=dtype, causal=True, seq_q=300, seq_k=300, gpu=H100)
    backend = backends.get("triton")

    def fwd_bwd(q, k, v, do, offsets):
        spec, inputs = validate.attention_call(
            q, k, v, is_causal=True, dropout_rate=0.2, dropout_rng=jax.random.key(0)
        )
        out, lse2 = Kernels("forward", backend, spec, config, False)((q, k, v, inputs), offsets)
        return Kernels("backward", backend, spec, config, False)((q, k, v, out, lse2, do, None, inputs), offsets)

    q = jax.ShapeDtypeStruct(shape.q_shape, dtype)
    kv = jax.ShapeDtypeStruct(shape.kv_shape, dtype)
    jax.jit(fwd_bwd).trace(q, kv, kv, q, jax.ShapeDtypeStruct((3,), jnp.uint32)).lower(lowering_platforms=("cuda",))
    assert len(triton_modules) == 3, "forward, dK/dV and dQ"
    for r in triton_modules:
        r.module.operation.verify()
    # The unsharded kernels (a two-word seed) are other modules: the shard's read its offsets.
    jax.jit(lambda *a: fwd_bwd(*a, None)).trace(q, kv, kv, q).lower(lowering_platforms=("cuda",))
    asm = [r.module.operation.get_asm(enable_debug_info=False) for r in triton_modules]
    assert len(asm) == 6 and all(a != b for a, b in zip(asm[:3], asm[3:]))


# ------------------------------------------------------------ the benchmark CLI (benchmarks/sharding.py)


def test_benchmark_counts_collectives_by_kind():
    from benchmarks.sharding import count_collectives

    hlo = (
        "%ag = bf16[8,16]{1,0} all-gather-start(bf16[4,16]{1,0} %p), dimensions={0}\n"
        "%agd = bf16[8,16]{1,0} all-gather-done(%ag)\n"
        "%ar = f32[4]{0} all-reduce(f32[4]{0} %x), to_apply=%sum\n"
        "%fusion.all-gather.3 = f32[4]{0} fusion(%y)\n"
    )
    assert count_collectives(hlo) == {"all-gather": 1, "all-reduce": 1}


def test_benchmark_smoke_run_partitions_with_no_collectives(tmp_path):
    """The issue's measurement, tiny: the sharded call checks against one device's share and has no collectives."""
    import json

    from benchmarks import sharding as bench

    argv = ["--allow-cpu", "--impls", "pallas_flash", "--splits", "heads", "--only", "fwd_bwd", "--batch", "2",
            "--seq-len", "24", "--heads", "4", "--head-dim", "16", "--min-time", "0", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    (jsonl,) = tmp_path.glob("*.jsonl")
    (rec,) = [r for r in map(json.loads, jsonl.read_text().splitlines()) if r["kind"] == "sharding"]
    assert rec["status"] == "ok", rec.get("message")
    assert rec["collectives"] == {} and rec["err"] < rec["tol"] and rec["sharded_s"] > 0 and rec["alone_s"] > 0
