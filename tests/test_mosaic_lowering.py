"""Every Mosaic GPU kernel variant lowers for CUDA, on any machine.

``jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))`` runs Pallas's
Mosaic GPU lowering (the kernel body to the Mosaic GPU dialect, serialized
into the ``mosaic_gpu`` custom call) without a GPU. It does not run ptxas, so
register spills and the like still need the GPU suite; what it catches on a
CPU is a primitive or a layout the compiled path has no lowering for, which
interpret mode, with its own rules, can miss. The variants: both forward
schedules, one CTA per tile and persistent, head dims 64/128/256, causal and
not, with and without per-batch lengths; both backward modes.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from pallas_flash.backends.mosaic_gpu import MosaicBackwardConfig, MosaicForwardConfig
from pallas_flash.backends.mosaic_gpu.backward import mosaic_backward
from pallas_flash.backends.mosaic_gpu.forward import mosaic_forward
from pallas_flash.spec import AttentionInputs, AttentionSpec

B, TQ, TK, HEADS, KV_HEADS = 2, 300, 333, 4, 2


def _spec_and_inputs(causal: bool, lengths: bool):
    spec = AttentionSpec(scale=0.1, causal=causal, has_q_lengths=lengths, has_kv_lengths=lengths)
    inputs = AttentionInputs(q_lengths=jnp.array([200, 300], jnp.int32), kv_lengths=jnp.array([0, 250], jnp.int32))
    return spec, inputs if lengths else AttentionInputs()


def _lowered_kernels(fn, *args) -> list[str]:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return re.findall(r"stablehlo.custom_call @(mosaic_gpu\w*)", text)


@pytest.mark.parametrize("lengths", [False, True], ids=["plain", "lengths"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "head_dim, config",
    [
        (64, MosaicForwardConfig(block_kv=128, num_stages=2, overlap=False, persistent=True)),
        (128, MosaicForwardConfig(block_kv=128, num_stages=2, overlap=True, persistent=True)),
        (128, MosaicForwardConfig(block_kv=128, num_stages=2, overlap=True, persistent=False)),
        (256, MosaicForwardConfig(block_kv=64, num_stages=2, overlap=False, persistent=False)),
    ],
    ids=["d64_turns_persistent", "d128_overlap_persistent", "d128_overlap", "d256_turns"],
)
def test_forward_lowers_for_cuda(head_dim, config, causal, lengths):
    q = jnp.zeros((B, TQ, HEADS, head_dim), jnp.bfloat16)
    k = jnp.zeros((B, TK, KV_HEADS, head_dim), jnp.bfloat16)
    spec, inputs = _spec_and_inputs(causal, lengths)
    kernels = _lowered_kernels(lambda q, k, v: mosaic_forward(q, k, v, inputs, spec=spec, config=config), q, k, k)
    assert len(kernels) == 1, kernels


@pytest.mark.parametrize("lengths", [False, True], ids=["plain", "lengths"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "head_dim, config, kernels",
    [
        (64, MosaicBackwardConfig(block_q=128, num_stages=3, dq_block_kv=128, dq_num_stages=2), 2),
        (128, MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=3, deterministic=True), 2),
        (128, MosaicBackwardConfig(num_stages=2, deterministic=False), 1),
        (256, MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2, deterministic=True), 2),
    ],
    ids=["d64_deterministic", "d128_deterministic", "d128_fused", "d256"],
)
def test_backward_lowers_for_cuda(head_dim, config, kernels, causal, lengths):
    q = jnp.zeros((B, TQ, HEADS, head_dim), jnp.bfloat16)
    k = jnp.zeros((B, TK, KV_HEADS, head_dim), jnp.bfloat16)
    lse2 = jnp.zeros((B, HEADS, TQ), jnp.float32)
    spec, inputs = _spec_and_inputs(causal, lengths)

    def backward(q, k, v, out, lse2, do):
        return mosaic_backward(q, k, v, out, lse2, do, None, spec=spec, config=config, inputs=inputs)[:3]

    assert len(_lowered_kernels(backward, q, k, k, q, lse2, q)) == kernels
