"""``jax.export`` of calls to the kernels (serving a model exported from JAX).

What exports: a call on one device, under a mesh of ``Explicit`` axes, and inside the caller's ``jax.shard_map``.
What does not: a call partitioned by ``custom_partitioning`` (inputs sharded on ``Auto`` axes), whose partitioner is a
Python callback; JAX refuses to export it ("serialization of host_callbacks"). (jax.nn's cuDNN attention partitions
the same way; not tried here.) On a GPU, JAX's export keeps a list of custom calls whose compatibility it guarantees:
the Mosaic GPU kernels' (``mosaic_gpu_v2``) is on it, Pallas's Triton call is not (its export needs
``disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]``).

The exported function is called back here (``Exported.call``), forward and gradients with a random cotangent, and
must give the un-exported call's values bit for bit (on a GPU, the Mosaic kernels' fused dQ adds in any order:
there, within the tolerance of the float64 reference), which are checked against the float64 reference.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_flash as pf
from pallas_flash.testing.shapes import Shape
from tests.cases import CONFIG, random_qkv
from tests.conftest import ON_GPU
from tests.test_sharding import _check_against_reference, _fwd_bwd

SHAPE = Shape("export", 2, 37, 45, 4, 2, 24)  # Tq != Tk, neither a block multiple; GQA groups of 2
# On a GPU the Triton kernels' custom call is not on JAX's stable list: the export says so.
TRITON_CHECK = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if ON_GPU else []
needs_two = pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (conftest: 4 on a CPU)")


def _attention(q, k, v):
    return pf.dot_product_attention(q, k, v, is_causal=True, implementation="triton", config=CONFIG,
                                    interpret=not ON_GPU)


def _check_round_trip(fn, args, seed):
    """Export ``fn`` (forward + vjp), call the export: equal to ``fn`` itself, and to the reference."""
    exported = jax.export.export(jax.jit(fn), disabled_checks=TRITON_CHECK)(*args)
    out, grads = exported.call(*args)
    want_out, want_grads = jax.jit(fn)(*args)
    for got, want in zip((out, *grads), (want_out, *want_grads)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    _check_against_reference("export", out, grads, *(np.asarray(x) for x in args), dict(is_causal=True), [],
                             jnp.float32, seed)
    return exported


def test_export_on_one_device(seed):
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    exported = _check_round_trip(_fwd_bwd(_attention), (q, k, v, ct), seed)
    assert exported.in_avals[0].shape == q.shape


@needs_two
def test_export_under_explicit_axes(seed):
    mesh = jax.make_mesh((2,), ("b",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:2])
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, NamedSharding(mesh, P("b"))) for x in (q, k, v, ct)]
        _check_round_trip(_fwd_bwd(_attention), args, seed)


@needs_two
def test_export_inside_a_shard_map(seed):
    mesh = jax.make_mesh((2,), ("b",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:2])
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    fn = jax.shard_map(_fwd_bwd(_attention), mesh=mesh, in_specs=P("b"), out_specs=P("b"))
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, NamedSharding(mesh, P("b"))) for x in (q, k, v, ct)]
        _check_round_trip(fn, args, seed)


@needs_two
def test_export_of_auto_sharded_inputs_is_refused_by_jax(seed):
    """The README's stated limit: JAX refuses the partitioner's callback. If this starts to pass, JAX exports
    ``custom_partitioning`` and the README's paragraph is out of date."""
    mesh = jax.make_mesh((2,), ("b",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)
    args = [jax.device_put(x, NamedSharding(mesh, P("b"))) for x in (q, k, v, ct)]
    with pytest.raises(NotImplementedError, match="host_callbacks"):
        jax.export.export(jax.jit(_fwd_bwd(_attention)), disabled_checks=TRITON_CHECK)(*args)


@pytest.mark.gpu
def test_mosaic_kernels_export_on_a_hopper_gpu(seed):
    """The Mosaic GPU kernels' custom call is on JAX's list of stable ones: the export needs no disabled check."""
    q, k, v, ct = random_qkv(Shape("export_mosaic", 2, 200, 333, 4, 2, 64), jnp.bfloat16, seed)

    def fn(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=True, implementation="mosaic")

    exported = jax.export.export(jax.jit(_fwd_bwd(fn)))(q, k, v, ct)
    assert "mosaic_gpu_v2" in set(re.findall(r"custom_call @(\w+)", exported.mlir_module()))
    out, grads = exported.call(q, k, v, ct)  # the fused dQ adds in any order: against the reference, not bits
    _check_against_reference("export_mosaic", out, grads, q, k, v, ct, dict(is_causal=True), [], jnp.bfloat16, seed)
