"""``jax.checkpoint`` (remat) around the kernels, and ``pallas_flash.CHECKPOINT_NAMES``.

Under a policy that saves nothing, the backward runs the forward kernels again (rematerialised, as for any op).
Under ``save_only_these_names(*CHECKPOINT_NAMES)`` the forward's output and log-sum-exp are saved and the forward
runs once, as without remat: counted here as the partitioned kernel calls (and, for ring attention, the ring's
``ppermute`` steps) in the gradient's jaxpr. Either way the gradients (random cotangent) equal float64's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import pallas_flash as pf
from pallas_flash.testing.shapes import Shape
from tests.cases import CONFIG, random_qkv
from tests.conftest import ON_GPU
from tests.test_sharding import _check_against_reference, _fwd_bwd

POLICIES = {
    "none": None,  # no jax.checkpoint
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "names": jax.checkpoint_policies.save_only_these_names(*pf.CHECKPOINT_NAMES),
    "out_only": jax.checkpoint_policies.save_only_these_names(pf.CHECKPOINT_NAMES[0]),
}


def _count(jaxpr, primitive: str, kind: str | None = None) -> int:
    """Equations of ``primitive`` in ``jaxpr`` and every jaxpr nested in it (the partitioned primitive's own
    kernels' jaxpr not entered; ``kind``: only its calls of that ``Kernels.kind``)."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            n += kind is None or eqn.params["call"].kernels.kind == kind
            if primitive == "pallas_flash_partitioned":
                continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    n += _count(sub.jaxpr, primitive, kind)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    n += _count(sub, primitive, kind)
    return n


def _grad_fn(attention, policy: str):
    """``(q, k, v, ct) -> (out, (dq, dk, dv))`` with ``attention`` under the policy's ``jax.checkpoint``."""
    return _fwd_bwd(attention if policy == "none" else jax.checkpoint(attention, policy=POLICIES[policy]))


@pytest.mark.parametrize("policy", list(POLICIES))
def test_saved_names_skip_the_forward_rerun(policy, seed):
    shape = Shape("remat", 2, 37, 37, 4, 2, 24)  # not block multiples; GQA groups of 2
    q, k, v, ct = random_qkv(shape, jnp.float32, seed)

    def attention(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=True, implementation="triton", config=CONFIG,
                                        interpret=not ON_GPU)

    fn = _grad_fn(attention, policy)
    jaxpr = jax.make_jaxpr(fn)(q, k, v, ct).jaxpr
    forwards = _count(jaxpr, "pallas_flash_partitioned", "forward")
    assert _count(jaxpr, "pallas_flash_partitioned", "backward") == 1
    assert forwards == (2 if policy in ("nothing_saveable", "out_only") else 1), (policy, forwards)
    out, grads = jax.jit(fn)(q, k, v, ct)
    _check_against_reference("remat", out, grads, q, k, v, ct, dict(is_causal=True), [], jnp.float32, seed)


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (conftest: 4 on a CPU)")
@pytest.mark.parametrize("policy", ["none", "nothing_saveable", "names"])
def test_ring_attention_saved_names_skip_the_forward_ring(policy, seed):
    mesh = jax.make_mesh((2,), ("seq",), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
    q, k, v, ct = random_qkv(Shape("remat_ring", 1, 32, 32, 2, 2, 16), jnp.float32, seed)

    def local(q, k, v):
        return pf.ring_attention(q, k, v, axis_name="seq", is_causal=True, config=CONFIG, interpret=not ON_GPU)

    ring = jax.shard_map(local, mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq"), check_vma=False)
    fn = _grad_fn(ring, policy)
    steps = {name: _count(jax.make_jaxpr(f)(q, k, v, ct).jaxpr, "ppermute")
             for name, f in (("none", _grad_fn(ring, "none")), (policy, fn))}
    assert (steps[policy] > steps["none"]) == (policy == "nothing_saveable"), steps
    out, grads = jax.jit(fn)(q, k, v, ct)
    _check_against_reference("remat_ring", out, grads, *(np.asarray(x) for x in (q, k, v, ct)), dict(is_causal=True),
                             [], jnp.float32, seed)
