"""Every Mosaic GPU kernel variant lowers for CUDA, on any machine.

``jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))`` runs Pallas's
Mosaic GPU lowering (the kernel body to the Mosaic GPU dialect, serialized
into the ``mosaic_gpu`` custom call) without a GPU. It does not run ptxas, so
register spills and the like still need the GPU suite; what it catches on a
CPU is a primitive or a layout the compiled path has no lowering for, which
interpret mode, with its own rules, can miss. The variants: both forward
schedules, one CTA per tile and persistent, head dims 64/128/256, causal and
not, with and without per-batch lengths; both backward modes.

Each kernel's lowered module is also kept as a digest (``mosaic_ir_digests.json``:
the Mosaic GPU module printed without source locations), so that a change meant
to leave the kernels alone (a refactoring, a comment, the code around the
``plgpu.kernel`` calls) is proved to on a CPU. After a deliberate kernel change,
regenerate it with ``PALLAS_FLASH_WRITE_IR_DIGESTS=1`` (``tests/digests.py``).
"""

from __future__ import annotations

import hashlib
import pathlib

import jax
import jax.numpy as jnp
import pytest
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib import mosaic_gpu_dialect
from jax._src.lib.mlir import ir

from pallas_flash.backends.mosaic_gpu import MosaicBackwardConfig, MosaicForwardConfig, occupancy
from pallas_flash.backends.mosaic_gpu.backward import mosaic_backward
from pallas_flash.backends.mosaic_gpu.forward import mosaic_forward
from pallas_flash.spec import AttentionInputs, AttentionSpec
from tests.digests import DigestBook

B, TQ, TK, HEADS, KV_HEADS = 2, 300, 333, 4, 2


def _spec_and_inputs(causal: bool, lengths: bool):
    spec = AttentionSpec(scale=0.1, causal=causal, has_q_lengths=lengths, has_kv_lengths=lengths)
    inputs = AttentionInputs(q_lengths=jnp.array([200, 300], jnp.int32), kv_lengths=jnp.array([0, 250], jnp.int32))
    return spec, inputs if lengths else AttentionInputs()


DIGESTS = DigestBook(pathlib.Path(__file__).with_name("mosaic_ir_digests.json"), "the Mosaic GPU kernels")


@pytest.fixture(scope="module", autouse=True)
def _write_digests():
    yield
    DIGESTS.write()


def _custom_calls(op, found: list) -> list:
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                if child.operation.name == "stablehlo.custom_call":
                    found.append(child.operation)
                _custom_calls(child.operation, found)
    return found


def _module_digest(bytecode: bytes) -> str:
    """The Mosaic GPU module (MLIR bytecode as the custom call holds it) printed without source locations."""
    context = jax_mlir.make_ir_context()
    mosaic_gpu_dialect.register_dialect(context)
    context.allow_unregistered_dialects = True  # the serialized ops (``stable_mosaic_gpu``)
    with context:
        module = ir.Module.parse(bytecode)
        attributes = module.operation.attributes
        if "mosaic_gpu.dump_basename" in attributes:  # a process-wide counter: it depends on what lowered before
            del attributes["mosaic_gpu.dump_basename"]
        text = module.operation.get_asm(enable_debug_info=False)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _mosaic_modules(fn, *args) -> list[bytes]:
    """The Mosaic GPU modules of the kernels that ``fn`` lowers to for CUDA, in program order."""
    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    modules = []
    with module.context:
        for call in _custom_calls(module.operation, []):
            if ir.StringAttr(call.attributes["call_target_name"]).value.startswith("mosaic_gpu"):
                config = ir.DictAttr(call.attributes["mhlo.backend_config"])
                modules.append(ir.StringAttr(config["module"]).value_bytes)
    return modules


def _lowered_kernels(fn, *args) -> list[str]:
    """Digests of the Mosaic GPU kernels that ``fn`` lowers to for CUDA, in program order."""
    return [_module_digest(module) for module in _mosaic_modules(fn, *args)]


def _kernel_names(fn, *args) -> list[list[str]]:
    """Per Mosaic GPU kernel that ``fn`` lowers to, in program order, which of ``KERNEL_NAMES`` its module is named
    by (Mosaic GPU calls it ``<name>_mosaic_gpu_kernel``)."""
    return [[name for name in KERNEL_NAMES if name.encode() + b"_mosaic_gpu" in module]
            for module in _mosaic_modules(fn, *args)]


KERNEL_NAMES = ("pallas_flash_mosaic_fwd", "pallas_flash_mosaic_bwd_dkdv", "pallas_flash_mosaic_bwd_dq",
                "pallas_flash_mosaic_bwd_wide_dkdv", "pallas_flash_mosaic_bwd_wide_dq")


@pytest.mark.parametrize(
    "head_dim, bwd, expected",
    [
        (128, MosaicBackwardConfig(deterministic=True), ["pallas_flash_mosaic_bwd_dkdv", "pallas_flash_mosaic_bwd_dq"]),
        (128, MosaicBackwardConfig(deterministic=False), ["pallas_flash_mosaic_bwd_dkdv"]),
        (256, MosaicBackwardConfig(dq_num_stages=2),
         ["pallas_flash_mosaic_bwd_wide_dkdv", "pallas_flash_mosaic_bwd_wide_dq"]),
    ],
    ids=["deterministic", "fused", "d256"],
)
def test_kernels_carry_their_names(head_dim, bwd, expected):
    """Profilers show each kernel by name (``benchmarks.profile`` counts ``pallas_flash*`` as attention)."""
    q = jnp.zeros((B, TQ, HEADS, head_dim), jnp.bfloat16)
    k = jnp.zeros((B, TK, KV_HEADS, head_dim), jnp.bfloat16)
    lse2 = jnp.zeros((B, HEADS, TQ), jnp.float32)
    spec, inputs = _spec_and_inputs(True, False)
    fwd = MosaicForwardConfig(block_kv=64) if head_dim == 256 else MosaicForwardConfig()
    assert _kernel_names(lambda q, k, v: mosaic_forward(q, k, v, inputs, spec=spec, config=fwd), q, k, k) == [
        ["pallas_flash_mosaic_fwd"]]

    def backward(q, k, v, out, lse2, do):
        return mosaic_backward(q, k, v, out, lse2, do, None, spec=spec, config=bwd, inputs=inputs)[:3]

    assert _kernel_names(backward, q, k, k, q, lse2, q) == [[name] for name in expected]


@pytest.mark.parametrize("lengths", [False, True], ids=["plain", "lengths"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "head_dim, config",
    [
        (64, MosaicForwardConfig(block_kv=128, num_stages=2, overlap=False, persistent=True)),
        (128, MosaicForwardConfig(block_kv=128, num_stages=2, overlap=True, persistent=True)),
        (128, MosaicForwardConfig(block_kv=128, num_stages=2, overlap=True, persistent=False)),
        (256, MosaicForwardConfig(block_kv=64, num_stages=2, overlap=False, persistent=False)),
        (64, MosaicForwardConfig(block_kv=128, num_stages=2, overlap=True, persistent=True, compute_wgs=3)),
        (64, MosaicForwardConfig(block_kv=128, num_stages=2, overlap=True, persistent=False, compute_wgs=3)),
    ],
    ids=["d64_turns_persistent", "d128_overlap_persistent", "d128_overlap", "d256_turns", "d64_wgs3_persistent",
         "d64_wgs3"],
)
def test_forward_lowers_for_cuda(head_dim, config, causal, lengths, request):
    q = jnp.zeros((B, TQ, HEADS, head_dim), jnp.bfloat16)
    k = jnp.zeros((B, TK, KV_HEADS, head_dim), jnp.bfloat16)
    spec, inputs = _spec_and_inputs(causal, lengths)
    kernels = _lowered_kernels(lambda q, k, v: mosaic_forward(q, k, v, inputs, spec=spec, config=config), q, k, k)
    assert len(kernels) == 1, kernels
    DIGESTS.check(request.node.name, kernels)


@pytest.mark.parametrize("lengths", [False, True], ids=["plain", "lengths"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "head_dim, config, kernels",
    [
        (64, MosaicBackwardConfig(block_q=128, num_stages=3, dq_block_kv=128, dq_num_stages=2), 2),
        (128, MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=3, deterministic=True), 2),
        (128, MosaicBackwardConfig(num_stages=2, deterministic=False), 1),
        (64, MosaicBackwardConfig(block_q=128, num_stages=2, deterministic=False), 1),
        (256, MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2, deterministic=True), 2),
    ],
    ids=["d64_deterministic", "d128_deterministic", "d128_fused", "d64_fused_rows128", "d256"],
)
def test_backward_lowers_for_cuda(head_dim, config, kernels, causal, lengths, request):
    q = jnp.zeros((B, TQ, HEADS, head_dim), jnp.bfloat16)
    k = jnp.zeros((B, TK, KV_HEADS, head_dim), jnp.bfloat16)
    lse2 = jnp.zeros((B, HEADS, TQ), jnp.float32)
    spec, inputs = _spec_and_inputs(causal, lengths)

    def backward(q, k, v, out, lse2, do):
        return mosaic_backward(q, k, v, out, lse2, do, None, spec=spec, config=config, inputs=inputs)[:3]

    digests = _lowered_kernels(backward, q, k, k, q, lse2, q)
    assert len(digests) == kernels, digests
    DIGESTS.check(request.node.name, digests)


def test_persistent_causal_forward_orders_lower_for_cuda(monkeypatch, request):
    """The persistent causal forward at the headline's D=64 causal 1k (512 pairs, 4096 tiles for 132 CTAs; 128 MiB
    of K/V) in the default order, which "auto" groups there and snakes (``occupancy.PERSISTENT_FORWARD_*``), and
    by length over every pair ("flat"): the two lower to different kernels. Traced from shapes alone: nothing of
    this size is allocated."""
    monkeypatch.setattr(occupancy, "sm_count", lambda: 132)
    assert occupancy.persistent_forward_group(512, 8, 128 * 2**20, 132) is not None  # the default groups here
    q = jax.ShapeDtypeStruct((16, 1024, 32, 64), jnp.bfloat16)
    spec, inputs = _spec_and_inputs(True, False)
    config = MosaicForwardConfig(block_kv=128, num_stages=3, overlap=False, persistent=True)
    lower = lambda: _lowered_kernels(lambda q, k, v: mosaic_forward(q, k, v, inputs, spec=spec, config=config),
                                     q, q, q)
    default = lower()
    monkeypatch.setattr(occupancy, "PERSISTENT_FORWARD_HEAD_GROUP", None)
    monkeypatch.setattr(occupancy, "PERSISTENT_FORWARD_SNAKE", False)
    flat = lower()
    assert len(default) == len(flat) == 1 and default != flat
    DIGESTS.check(request.node.name + "[default]", default)
    DIGESTS.check(request.node.name + "[flat]", flat)
