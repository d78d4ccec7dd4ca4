"""Ring attention (context parallelism) on 4 (and 2) host devices: values, gradients, skipped work, errors.

Each case shards a sequence over a mesh axis, runs ``ring_attention`` inside
``jax.shard_map`` (the zigzag layout reorders the sequence first and back
after) and compares the output and dq, dk, dv under a random cotangent with
the float64 reference on the unsharded arrays. The kernels run through a
counting backend (the Pallas kernels plus a host callback per kernel call
that adds up the query x key rows it computed), so each case also checks that
causal rings compute exactly the visible chunk pairs: hidden pairs are skipped,
not computed and masked.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_flash as pf
from pallas_flash import backends
from pallas_flash.backends.base import KernelBackend
from pallas_flash.reference import attention_reference
from pallas_flash.sharding.context import ring_attention, sequence_parallel_attention, sequence_sharding
from tests.cases import CONFIG, packed_ids
from tests.conftest import HOST_DEVICES, ON_GPU, TOLERANCE, rel_err

pytestmark = pytest.mark.skipif(ON_GPU or HOST_DEVICES < 4, reason="runs on 4 host CPU devices (tests/conftest.py)")

WORK = {"forward": 0, "backward": 0}


@dataclasses.dataclass(frozen=True)
class Counting(KernelBackend):
    """The Pallas kernels, adding the rows x keys of every call that runs to ``WORK``."""

    name = "counting"
    inner: KernelBackend = backends.get("triton")  # CONFIG is the Triton kernels' own config

    @property
    def config_type(self):
        return self.inner.config_type

    def supports(self, q, k, v, inputs, spec):
        self.inner.supports(q, k, v, inputs, spec)

    def default_config(self, q, k, spec):
        return self.inner.default_config(q, k, spec)

    @staticmethod
    def _count(kind, area):
        def add():
            WORK[kind] += area

        jax.debug.callback(add)

    def forward(self, q, k, v, inputs, spec, *, config, interpret):
        self._count("forward", q.shape[1] * k.shape[1])
        return self.inner.forward(q, k, v, inputs, spec, config=config, interpret=interpret)

    def backward(self, q, k, v, out, lse2, do, dlse, inputs, spec, **kw):
        self._count("backward", q.shape[1] * k.shape[1])
        return self.inner.backward(q, k, v, out, lse2, do, dlse, inputs, spec, **kw)


def mesh_of(n: int, names=("seq",), shape=None, axis_type=AxisType.Auto):
    shape = shape or (n,)
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names), devices=jax.devices("cpu")[:n])


def expected_work(n: int, seq: int, causal: bool, layout: str) -> int:
    """Query x key rows of the visible chunk pairs, summed over devices."""
    if not causal:
        return n * n * (seq // n) ** 2
    chunks = n * (2 if layout == "zigzag" else 1)
    return chunks * (chunks + 1) // 2 * (seq // chunks) ** 2


def ring_fn(n: int, layout: str, side: dict, check_vma: bool = False, **options):
    """Global ``(q, k, v) -> out`` through the ring: zigzag order in, sequence order out."""
    mesh = mesh_of(n)
    order = (lambda x: pf.zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    back = (lambda x: pf.unzigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    seq_specs = {name: P(None, "seq") if name.endswith("segment_ids") else P() for name in side}
    placed = {name: order(x) if name.endswith("segment_ids") else x for name, x in side.items()}

    def local(q, k, v, side):
        return ring_attention(q, k, v, axis_name="seq", layout=layout, implementation=Counting(), config=CONFIG,
                              **side, **options)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "seq"),) * 3 + (seq_specs,), out_specs=P(None, "seq"),
                            check_vma=check_vma)
    return jax.jit(lambda q, k, v: back(sharded(order(q), order(k), order(v), placed)))


def random_inputs(shape, dtype, seed):
    b, t, n_heads, kv_heads, h = shape
    rng = np.random.default_rng(seed)
    draw = lambda s: jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype)  # noqa: E731
    return draw((b, t, n_heads, h)), draw((b, t, kv_heads, h)), draw((b, t, kv_heads, h)), draw((b, t, n_heads, h))


def side_inputs(features: set, b: int, t: int, seed: int) -> dict:
    rng = np.random.default_rng(seed + 1)
    side = {}
    if "segments" in features:
        ids = jnp.asarray(packed_ids(rng, b, t, max(3, t // 3)))
        side.update(q_segment_ids=ids, kv_segment_ids=ids)
    if "lengths" in features:
        side["query_seq_lengths"] = jnp.asarray(rng.integers(t // 2, t + 1, b), jnp.int32)
        side["key_value_seq_lengths"] = jnp.asarray(rng.integers(t // 3, t + 1, b), jnp.int32)
    return side


CASES = {  # name: (devices, layout, causal, [B, T, N, K, H], dtype, features)
    "contiguous_causal_gqa": (4, "contiguous", True, (1, 4 * 24, 4, 2, 16), jnp.float32, set()),
    "contiguous_segments_lengths": (4, "contiguous", False, (2, 4 * 16, 2, 1, 16), jnp.float32, {"segments", "lengths"}),
    "zigzag_causal_gqa_segments_lengths": (4, "zigzag", True, (2, 4 * 16, 4, 2, 16), jnp.float32,
                                           {"segments", "lengths"}),
    "mesh_of_2_zigzag_bf16": (2, "zigzag", True, (1, 2 * 48, 2, 1, 16), jnp.bfloat16, set()),
    "mesh_of_2_contiguous_causal_lengths": (2, "contiguous", True, (2, 2 * 40, 2, 2, 16), jnp.float32, {"lengths"}),
}


# Under check_vma=True (JAX's default) too: the lengths replicated, the rest varying over the sequence axis;
# the contiguous causal ring's lax.cond has a branch that skips its kernels.
VMA_CASES = ["contiguous_causal_gqa", "zigzag_causal_gqa_segments_lengths"]


@pytest.mark.parametrize("name, check_vma", [(name, False) for name in CASES] + [(name, True) for name in VMA_CASES],
                         ids=list(CASES) + [f"{name}-check_vma" for name in VMA_CASES])
def test_ring_matches_the_reference_and_skips_hidden_pairs(name, check_vma, seed):
    n, layout, causal, shape, dtype, features = CASES[name]
    q, k, v, ct = random_inputs(shape, dtype, seed)
    side = side_inputs(features, shape[0], shape[1], seed)
    fn = ring_fn(n, layout, side, check_vma, is_causal=causal)
    WORK.update(forward=0, backward=0)
    out, vjp = jax.vjp(fn, q, k, v)
    grads = jax.block_until_ready(vjp(ct))
    # Every kernel call ran once forward and once backward; hidden chunk pairs never.
    assert WORK == dict.fromkeys(WORK, expected_work(n, shape[1], causal, layout)), name

    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        r_out, r_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, is_causal=causal, **side), *f64)
        r_grads = r_vjp(jnp.asarray(np.asarray(ct, np.float64)))
    tol = TOLERANCE[jnp.dtype(dtype)]
    for label, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (r_out, *r_grads)):
        assert got.dtype == dtype and got.shape == want.shape
        err = rel_err(got, np.asarray(want))
        assert err <= tol, f"{label}: relative error {err:.3e} > {tol:.0e} ({name}, seed={seed})"


def test_zigzag_lse_and_its_gradient(seed):
    """``return_lse`` (zigzag, causal, H=24): the global log-sum-exp of each local row, and its
    cotangent reaches dq, dk, dv exactly."""
    n, shape = 4, (1, 4 * 24, 2, 2, 24)
    q, k, v, ct = random_inputs(shape, jnp.float32, seed)
    ct_lse = jnp.asarray(np.random.default_rng(seed + 2).standard_normal((1, 2, shape[1])), jnp.float32)
    mesh = mesh_of(n)
    local = lambda q, k, v: ring_attention(q, k, v, axis_name="seq", is_causal=True, layout="zigzag",  # noqa: E731
                                           return_lse=True, implementation=Counting(), config=CONFIG)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "seq"),) * 3,
                            out_specs=(P(None, "seq"), P(None, None, "seq")), check_vma=False)

    def fn(q, k, v):
        out, lse = sharded(*(pf.zigzag(x, n) for x in (q, k, v)))
        return pf.unzigzag(out, n), pf.unzigzag(lse, n, axis=2)

    WORK.update(forward=0, backward=0)
    (out, lse), vjp = jax.vjp(jax.jit(fn), q, k, v)
    grads = jax.block_until_ready(vjp((ct, ct_lse)))
    assert WORK == dict.fromkeys(WORK, expected_work(n, shape[1], True, "zigzag"))
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        (r_out, r_lse), r_vjp = jax.vjp(
            lambda q, k, v: attention_reference(q, k, v, is_causal=True, return_lse=True), *f64)
        r_grads = r_vjp((jnp.asarray(np.asarray(ct, np.float64)), jnp.asarray(np.asarray(ct_lse, np.float64))))
    tol = TOLERANCE[jnp.dtype(jnp.float32)]
    for label, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (r_out, r_lse, *r_grads)):
        err = rel_err(got, np.asarray(want))
        assert err <= tol, f"{label}: relative error {err:.3e} > {tol:.0e} (seed={seed})"


def test_sequence_parallel_attention_on_a_data_by_seq_mesh(seed):
    """The glue on global arrays: Explicit shardings (batch over data, sequence over seq) are read at trace
    time; output and gradients keep them; no all-gather or all-to-all in the compiled program."""
    mesh = mesh_of(4, ("data", "seq"), (2, 2), AxisType.Explicit)
    shape = (2, 2 * 32, 2, 1, 16)
    q, k, v, ct = random_inputs(shape, jnp.float32, seed)
    sharding = NamedSharding(mesh, P("data", "seq"))
    q, k, v, ct = (jax.device_put(x, sharding) for x in (q, k, v, ct))
    assert sequence_sharding(q)[1:] == ("data", "seq", None)

    def loss(q, k, v):
        out = sequence_parallel_attention(q, k, v, is_causal=True, config=CONFIG)
        return jnp.sum(out * ct), out

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    hlo = fn.lower(q, k, v).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo and "collective-permute" in hlo
    (_, out), grads = fn(q, k, v)
    for x in (out, *grads):
        assert tuple(x.sharding.spec)[:2] == ("data", "seq")
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        r_out, r_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, is_causal=True), *f64)
        r_grads = r_vjp(jnp.asarray(np.asarray(ct, np.float64)))
    tol = TOLERANCE[jnp.dtype(jnp.float32)]
    for label, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (r_out, *r_grads)):
        err = rel_err(np.asarray(got), np.asarray(want))
        assert err <= tol, f"{label}: relative error {err:.3e} > {tol:.0e} (seed={seed})"


def test_sequence_parallel_attention_reshards_its_inputs_under_explicit_axes(seed):
    """Explicit axes: k/v replicated, lengths replicated (as ``jnp.array`` gives them), segment ids on the batch
    axis only; the glue puts each on its spec (the sequence of k/v and ids, the batch) before the ring."""
    mesh = mesh_of(4, ("data", "seq"), (2, 2), AxisType.Explicit)
    shape = (2, 2 * 16, 2, 1, 16)
    q, k, v, ct = random_inputs(shape, jnp.float32, seed)
    side = side_inputs({"segments", "lengths"}, shape[0], shape[1], seed)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    placed = {name: put(x, P("data") if name.endswith("segment_ids") else P()) for name, x in side.items()}

    def fwd_bwd(q, k, v, side):
        fn = lambda q, k, v: sequence_parallel_attention(q, k, v, is_causal=True, config=CONFIG, **side)  # noqa: E731
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(put(ct, P("data", "seq")))

    with jax.set_mesh(mesh):
        out, grads = jax.jit(fwd_bwd)(put(q, P("data", "seq")), put(k, P()), put(v, P()), placed)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        r_out, r_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, is_causal=True, **side), *f64)
        r_grads = r_vjp(jnp.asarray(np.asarray(ct, np.float64)))
    tol = TOLERANCE[jnp.dtype(jnp.float32)]
    for label, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (r_out, *r_grads)):
        err = rel_err(np.asarray(got), np.asarray(want))
        assert err <= tol, f"{label}: relative error {err:.3e} > {tol:.0e} (seed={seed})"


def test_sequence_parallel_attention_clips_numpy_lengths_past_int32():
    """A NumPy int64 length past int32 ("all keys") is clipped as dot_product_attention clips it, not wrapped by a
    conversion to a JAX array before the ring."""
    mesh = mesh_of(4)
    q, k, v, _ = random_inputs((2, 4 * 16, 2, 1, 16), jnp.float32, 0)
    lengths = np.array([2**40 + 5, 37], np.int64)  # jnp.asarray without x64 would make the first 5
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "seq")))  # noqa: E731
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: sequence_parallel_attention(
            q, k, v, mesh=mesh, seq_axis="seq", is_causal=True, config=CONFIG, key_value_seq_lengths=lengths,
        ))(put(q), put(k), put(v))
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        want = attention_reference(*f64, is_causal=True, key_value_seq_lengths=np.array([64, 37]))
    assert rel_err(np.asarray(out), np.asarray(want)) <= TOLERANCE[jnp.dtype(jnp.float32)]

def _trace_ring(shape_q=(1, 16, 2, 16), shape_k=None, n=4, check_vma=False, **kwargs):
    q = jnp.zeros((shape_q[0], shape_q[1] * n, *shape_q[2:]))
    k = jnp.zeros((shape_q[0], (shape_k or shape_q)[1] * n, *(shape_k or shape_q)[2:]))
    fn = jax.shard_map(lambda q, k: ring_attention(q, k, k, axis_name="seq", **kwargs), mesh=mesh_of(n),
                       in_specs=(P(None, "seq"),) * 2, out_specs=P(None, "seq"), check_vma=check_vma)
    return jax.eval_shape(fn, q, k)


def test_errors():
    with pytest.raises(ValueError, match="layout must be one of"):
        _trace_ring(layout="striped")
    with pytest.raises(ValueError, match="local length must be even"):
        _trace_ring(shape_q=(1, 15, 2, 16), layout="zigzag")
    with pytest.raises(ValueError, match="sharded alike"):
        _trace_ring(shape_k=(1, 8, 2, 16))
    assert _trace_ring(check_vma=True).shape == (1, 64, 2, 16)  # refused before ("needs check_vma=False")
    with pytest.raises(ValueError, match="kernel backend"):
        _trace_ring(implementation="xla")
    with pytest.raises(ValueError, match="number of key/value heads"):
        _trace_ring(shape_k=(1, 16, 3, 16))
    # Refused whatever the value: a window of 0 (each query sees itself), mask=False (hides every key), arrays.
    for feature in (dict(local_window_size=4), dict(local_window_size=0), dict(logits_soft_cap=2.0),
                    dict(dropout_rate=0.1), dict(mask=False), dict(mask=jnp.ones((1, 1, 64, 64), bool)),
                    dict(bias=jnp.zeros((1, 1, 64, 64))), dict(alibi_slopes=jnp.ones((2,)))):
        with pytest.raises(NotImplementedError, match=f"ring attention supports.*not {next(iter(feature))}"):
            _trace_ring(**feature)
    with pytest.raises(ValueError, match="logits_soft_cap must be a positive finite number, got 0.0"):
        _trace_ring(logits_soft_cap=0.0)
    with pytest.raises(NotImplementedError, match="head_dim"):
        _trace_ring(shape_q=(1, 16, 2, 8))
    q = jnp.zeros((1, 4 * 16, 2, 16))
    w = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape), jnp.float32)
    ring = jax.shard_map(lambda q: ring_attention(q, q, q, axis_name="seq", is_causal=True), mesh=mesh_of(4),
                         in_specs=P(None, "seq"), out_specs=P(None, "seq"), check_vma=False)
    with pytest.raises(NotImplementedError, match="second-order"):
        jax.eval_shape(jax.grad(lambda q: jnp.vdot(jax.grad(lambda q: jnp.vdot(ring(q), w))(q), w)), q)
    with pytest.raises(ValueError, match="not bound"):
        ring_attention(jnp.zeros((1, 16, 2, 16)), jnp.zeros((1, 16, 2, 16)), jnp.zeros((1, 16, 2, 16)), axis_name="seq")
    with pytest.raises(ValueError, match="kv_segment_ids must have shape"):
        _trace_ring(q_segment_ids=jnp.zeros((1, 16), jnp.int32), kv_segment_ids=jnp.zeros((1, 4), jnp.int32))


def test_glue_errors():
    mesh = mesh_of(4)
    x = jnp.zeros((1, 4 * 5, 2, 16))
    with pytest.raises(ValueError, match="8 equal chunks"):
        sequence_parallel_attention(x, x, x, mesh=mesh, seq_axis="seq", layout="zigzag")
    with pytest.raises(ValueError, match="not in the mesh"):
        sequence_parallel_attention(x, x, x, mesh=mesh, seq_axis="sequence")
    with pytest.raises(ValueError, match="whole GQA groups"):
        sequence_parallel_attention(x, x[:, :, :1], x[:, :, :1], mesh=mesh_of(4, ("seq", "model"), (2, 2)),
                                    seq_axis="seq", head_axis="model")
    with pytest.raises(NotImplementedError, match=r"needs Tq == Tk, got query \(1, 20, 2, 16\) and key \(1, 8, 2, 16\)"):
        sequence_parallel_attention(x, x[:, :8], x[:, :8], mesh=mesh, seq_axis="seq")  # cross-attention: fall back
    with pytest.raises(ValueError, match="needs mesh and seq_axis"):
        jax.jit(lambda x: sequence_parallel_attention(x, x, x))(x)  # an unsharded (Auto) array: nothing to read
