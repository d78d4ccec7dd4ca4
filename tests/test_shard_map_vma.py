"""The kernels inside ``jax.shard_map`` with JAX's default ``check_vma=True``: data parallelism by hand.

Each device runs the kernels on its own shard (batch, heads or both sharded; MHA, GQA, and MQA with the one K/V
head replicated); outputs and gradients (``jax.vjp`` inside the ``shard_map``, random cotangent) equal the float64
reference, and the outputs vary over the inputs' axes (an ``out_specs`` naming an axis needs that). Before, the
``pallas_call``'s output type had no ``manual_axis_type`` and JAX raised a ``ValueError`` asking for
``check_vma=False``. (Ring attention under ``check_vma=True``: tests/test_ring.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_flash as pf
from pallas_flash import backends
from pallas_flash.testing.shapes import Shape
from tests.cases import CONFIG, random_qkv
from tests.test_sharding import _check_against_reference

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (conftest gives 4 host devices)")

LAYOUTS = {
    # name: (mesh shape, axis names, [B, Tq, Tk, N, K, H], query spec, key/value spec)
    "batch_gqa": ((4,), ("x",), (4, 29, 35, 8, 4, 24), P("x"), P("x")),
    "heads_mha": ((4,), ("x",), (2, 21, 21, 4, 4, 16), P(None, None, "x"), P(None, None, "x")),
    "batch_x_heads_gqa": ((2, 2), ("data", "model"), (4, 21, 21, 8, 4, 16), P("data", None, "model"),
                          P("data", None, "model")),
    # The one K/V head replicated: dK/dV are the sums over the head shards, invariant as K/V are.
    "heads_mqa_replicated_kv": ((4,), ("x",), (2, 21, 21, 8, 1, 16), P(None, None, "x"), P()),
}


def _dot_product_attention(q, k, v):
    return pf.dot_product_attention(q, k, v, is_causal=True, implementation="pallas", config=CONFIG)


def _flash_attention(q, k, v):
    return pf.flash_attention(q, k, v, causal=True, config=CONFIG)


def _run(fn, name, seed, vmapped=False):
    """``fn``'s output and gradients under ``LAYOUTS[name]`` in a check_vma=True shard_map, with the inputs."""
    mesh_shape, axes, dims, q_spec, kv_spec = LAYOUTS[name]
    mesh = jax.make_mesh(mesh_shape, axes)
    q, k, v, ct = random_qkv(Shape(name, *dims), jnp.float32, seed)

    def fwd_bwd(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        assert jax.typeof(out).manual_axis_type.varying == frozenset(axes)  # the union of the inputs' axes
        return out, vjp(ct)

    specs = (q_spec, kv_spec, kv_spec, q_spec)
    if vmapped:  # a leading vmap dim in front of every array, inside the shard_map
        fwd_bwd, specs = jax.vmap(fwd_bwd), tuple(P(None, *s) for s in specs)
    f = jax.shard_map(fwd_bwd, mesh=mesh, in_specs=specs, out_specs=(specs[0], specs[:3]))  # check_vma=True
    args = [x[None] if vmapped else x for x in (q, k, v, ct)]
    out, grads = jax.jit(f)(*(jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs)))
    if vmapped:
        out, grads = out[0], [g[0] for g in grads]
    return out, grads, (q, k, v, ct)


@pytest.mark.parametrize("name", LAYOUTS)
def test_dot_product_attention_and_its_gradients(name, seed):
    out, grads, (q, k, v, ct) = _run(_dot_product_attention, name, seed)
    _check_against_reference(name, out, grads, q, k, v, ct, dict(is_causal=True), [], jnp.float32, seed)


def test_flash_attention_and_its_gradients(seed):
    out, grads, (q, k, v, ct) = _run(_flash_attention, "batch_x_heads_gqa", seed)
    _check_against_reference("flash", out, grads, q, k, v, ct, dict(is_causal=True), [], jnp.float32, seed)


def test_vmap_inside_the_shard_map(seed):
    out, grads, (q, k, v, ct) = _run(_dot_product_attention, "heads_mha", seed, vmapped=True)
    _check_against_reference("vmap", out, grads, q, k, v, ct, dict(is_causal=True), [], jnp.float32, seed)


@pytest.mark.parametrize("name", ["batch_gqa", "heads_mqa_replicated_kv"])
def test_kernels_called_unpartitioned(name, monkeypatch, seed):
    """A backend whose interpreter has ordered effects (Mosaic GPU's) runs interpreted calls directly, not through
    the partitioned primitive: that path types its results too. (The Mosaic interpreter itself does not run in a
    multi-device shard_map on a CPU, check_vma or not: the Triton kernels stand in for it.)"""
    monkeypatch.setattr(type(backends.get("triton")), "interpret_has_effects", True)
    out, grads, (q, k, v, ct) = _run(_dot_product_attention, name, seed)
    _check_against_reference(name, out, grads, q, k, v, ct, dict(is_causal=True), [], jnp.float32, seed)
