"""Plain arrays (no mesh in their types) under ``jax.set_mesh`` of a mesh with Explicit axes.

``jax.jit`` treats such arrays as replicated on the mesh (``jax.nn.dot_product_attention`` just works there, its
outputs replicated on it); the kernels must too. Before, they took the ``custom_partitioning`` path, traced under
the mesh's Explicit context, and the interpreted kernels' stores raised a ShardingTypeError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import pallas_flash as pf
from pallas_flash.reference import attention_reference
from pallas_flash.testing.shapes import Shape
from tests.cases import CONFIG, random_qkv
from tests.conftest import TOLERANCE, rel_err
from tests.test_sharding import _check_against_reference, _fwd_bwd

pytestmark = pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (conftest: 4 on a CPU)")

SHAPE = Shape("mesh_context", 2, 21, 21, 4, 2, 24)  # T not a multiple of the blocks, GQA groups of 2


@pytest.mark.parametrize("vmapped", [False, True], ids=["plain", "vmap"])
def test_plain_arrays_under_an_explicit_mesh(vmapped, seed):
    """Values and gradients (random cotangent) equal the float64 reference; outputs replicated, as jax.nn's."""
    mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:2])
    q, k, v, ct = random_qkv(SHAPE, jnp.float32, seed)  # created outside the mesh context: no mesh in the types

    def fn(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=True, implementation="pallas", config=CONFIG)

    def nn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    args = [q, k, v, ct]
    if vmapped:
        fn, nn, args = jax.vmap(fn), jax.vmap(nn), [x[None] for x in args]
    with jax.set_mesh(mesh):
        out, grads = jax.jit(_fwd_bwd(fn))(*args)
        want = jax.jit(nn)(*args[:3])
    for got in (out, *grads):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), f"{got.sharding} != {want.sharding}"
    if vmapped:
        out, grads = out[0], [g[0] for g in grads]
    _check_against_reference("mesh_context", out, grads, q, k, v, ct, dict(is_causal=True), [], jnp.float32, seed)


def test_the_same_call_in_shard_maps_manual_over_other_axes(seed):
    """The same call at the same local shapes in a shard_map manual over both axes, then over one (the other
    Auto), then both again: the kernels' cached trace carries its context's mesh, so it is kept per context."""
    mesh = jax.make_mesh((2, 2), ("pp", "seq"), axis_types=(AxisType.Auto,) * 2)
    q, k, v, ct = random_qkv(Shape("manual", 2, 32, 32, 2, 2, 16), jnp.float32, seed)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, ct)]
        want, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, is_causal=True), *f64[:3])
        want_grads = vjp(f64[3])

    def fn(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=True, implementation="pallas", config=CONFIG)

    for axis_names in ({"pp", "seq"}, {"pp"}, {"pp", "seq"}):
        f = jax.shard_map(_fwd_bwd(fn), mesh=mesh, in_specs=P("pp"), out_specs=P("pp"), axis_names=axis_names,
                          check_vma=False)
        with jax.set_mesh(mesh):
            out, grads = jax.jit(f)(q, k, v, ct)
        for got, w in zip((out, *grads), (want, *want_grads)):
            assert rel_err(got, np.asarray(w)) <= TOLERANCE[jnp.dtype(jnp.float32)], axis_names
