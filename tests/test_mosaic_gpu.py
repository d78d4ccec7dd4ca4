"""The Mosaic GPU backend (``implementation="mosaic"``, #14): its config, what it refuses, its forward kernel.

On a CPU: config validation, ``supports`` (``NotImplementedError`` naming what
is missing, and the fallback it allows), and the forward kernel itself in
Mosaic GPU interpret mode (``plgpu.InterpretGPUParams``: the three warpgroups
run as threads; TMA copies, mbarriers, wgmma and the shared-memory ring are
simulated, and the interpreter checks that every barrier phase is observed).
Two primitives of the GPU path have no interpreter rule in jax 0.11.2
(``pl.run_state`` with ``plgpu.ACC.init``, and a wgmma whose left operand is in
registers), so in interpret mode alone P is staged through shared memory
(``forward.py``'s docstring). Gradients on a CPU run the Triton backward in
Triton interpret mode.

On a GPU (``gpu`` marker): the compiled kernels against the float64 reference
at odd shapes (Tq != Tk, lengths that are not block multiples, GQA 4:1 and
8:2, head dims 64/128/256, causal and not, bf16 and fp16), values, the
log-sum-exp and gradients under random cotangents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash import backends
from pallas_flash.backends.mosaic_gpu import MosaicBackend, MosaicConfig, MosaicForwardConfig
from pallas_flash.backends.mosaic_gpu.config import HEAD_DIMS, MAX_SMEM_BYTES, default_config, smem_bytes
from pallas_flash.backends.triton.config import BackwardConfig
from pallas_flash.reference import attention_reference
from pallas_flash.spec import AttentionInputs, AttentionSpec
from pallas_flash.testing.shapes import Shape
from tests.cases import random_qkv
from tests.conftest import ON_GPU, TOLERANCE, rel_err

DTYPES = (jnp.bfloat16, jnp.float16)
# Triton backward blocks small enough for Triton interpret mode on a CPU.
SMALL_BWD = BackwardConfig(16, 16, 16, 16, 4, 1, 4, 1)


def _qkv(shape: Shape, dtype=jnp.bfloat16, seed: int = 0):
    return random_qkv(shape, dtype, seed)[:3]


# --- config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(block_q=128), ValueError, "block_q=128 must be 64"),
        (dict(block_kv=96), ValueError, "block_kv=96 must be one of"),
        (dict(block_kv=512), ValueError, "block_kv=512"),
        (dict(num_stages=1), ValueError, r"num_stages=1 must be in \[2, 6\]"),
        (dict(num_stages=7), ValueError, "num_stages=7"),
        (dict(block_kv=128.0), TypeError, "block_kv=128.0 must be an int"),
        (dict(num_stages=True), TypeError, "num_stages=True must be an int"),
    ],
)
def test_forward_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        MosaicForwardConfig(**kwargs)


def test_config_types_are_checked():
    with pytest.raises(TypeError, match="MosaicConfig.fwd must be a MosaicForwardConfig"):
        MosaicConfig(fwd=pf.ForwardConfig())
    with pytest.raises(TypeError, match="MosaicConfig.bwd must be a Triton BackwardConfig"):
        MosaicConfig(bwd=pf.ForwardConfig())
    q, k, v = _qkv(Shape("c", 1, 64, 64, 2, 1, 64))
    with pytest.raises(TypeError, match="config must be a .*MosaicConfig for the 'mosaic' backend"):
        pf.dot_product_attention(q, k, v, implementation="mosaic", config=pf.FlashConfig())


def test_shared_memory_budget():
    """Tiles over the budget are refused before any lowering; every default config fits."""
    big = MosaicForwardConfig(block_kv=256, num_stages=4)
    assert smem_bytes(64, 256, 4, 256, jnp.bfloat16) > MAX_SMEM_BYTES
    with pytest.raises(ValueError, match="shared memory at head_dim=256 .*smaller block_kv or fewer num_stages"):
        big.check_fits(256, jnp.bfloat16)
    q, k, v = _qkv(Shape("c", 1, 64, 64, 2, 1, 256))
    with pytest.raises(ValueError, match="shared memory"):
        pf.dot_product_attention(q, k, v, implementation="mosaic", config=MosaicConfig(fwd=big))
    for head_dim in HEAD_DIMS:
        for dtype in DTYPES:
            for causal in (False, True):
                cfg = default_config(head_dim=head_dim, dtype=dtype, causal=causal, seq_q=4096, seq_k=4096)
                cfg.fwd.check_fits(head_dim, dtype)
                assert isinstance(cfg.bwd, BackwardConfig)


# --- what the backend refuses --------------------------------------------------------------


def test_registered_as_a_kernel_backend():
    assert "mosaic" in backends.names()
    backend = backends.get("mosaic")
    assert isinstance(backend, MosaicBackend) and isinstance(backend, backends.KernelBackend)
    assert hash(backend) == hash(MosaicBackend())


REFUSED = {
    "mask": (dict(mask=np.tril(np.ones((40, 40), bool))[None, None]), "a mask"),
    "bias": (dict(bias=np.zeros((1, 1, 40, 40), np.float32)), "a bias"),
    "lengths": (dict(key_value_seq_lengths=np.array([30, 40], np.int32)), "sequence lengths"),
    "segments": (dict(q_segment_ids=np.zeros((2, 40), np.int32), kv_segment_ids=np.zeros((2, 40), np.int32)),
                 "segment ids"),
    "alibi": (dict(alibi_slopes=np.full((4,), 0.1, np.float32)), "ALiBi slopes"),
    "soft_cap": (dict(logits_soft_cap=30.0), "a logits soft-cap"),
    "dropout": (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "dropout"),
    "window": (dict(local_window_size=(8, 0)), "a local window"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refuses_features_it_does_not_implement(name):
    kwargs, what = REFUSED[name]
    q, k, v = _qkv(Shape("r", 2, 40, 40, 4, 2, 64))
    with pytest.raises(NotImplementedError, match=f"Mosaic GPU kernels do not implement {what}"):
        pf.dot_product_attention(q, k, v, implementation="mosaic", **kwargs)


def test_refuses_offsets_dtypes_and_head_dims():
    q, k, v = _qkv(Shape("r", 1, 40, 40, 2, 1, 64))
    with pytest.raises(NotImplementedError, match="position offsets"):
        pf.attention_with_lse(q, k, v, q_offset=8, implementation="mosaic")
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    with pytest.raises(NotImplementedError, match="bfloat16 and float16, got float32"):
        pf.dot_product_attention(q32, k32, v32, implementation="mosaic")
    for head_dim in (32, 80, 192):
        qd, kd, vd = _qkv(Shape("r", 1, 40, 40, 2, 1, head_dim))
        with pytest.raises(NotImplementedError, match=rf"head_dim in \(64, 128, 256\), got query \(1, 40, 2, {head_dim}\)"):
            pf.dot_product_attention(qd, kd, vd, implementation="mosaic")


def test_falls_back_to_triton_for_what_it_refuses(seed):
    shape = Shape("f", 1, 40, 40, 2, 1, 64)
    q, k, v = _qkv(shape, jnp.bfloat16, seed)
    kw = dict(is_causal=True, local_window_size=(8, 0))
    ours = pf.dot_product_attention(q, k, v, implementation=("mosaic", "triton"), **kw)
    triton = pf.dot_product_attention(q, k, v, implementation="triton", **kw)
    assert np.array_equal(np.asarray(ours), np.asarray(triton))


# --- the kernel against float64 ------------------------------------------------------------------


def _reference(q, k, v, ct, ct_lse, causal):
    """Float64 ``(out, lse, dq, dk, dv)`` under the cotangents ``(ct, ct_lse)``."""
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x.astype(jnp.float32), np.float64)) for x in (q, k, v)]
        (out, lse), vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, is_causal=causal, return_lse=True), *f64)
        grads = vjp((jnp.asarray(np.asarray(ct.astype(jnp.float32), np.float64)), jnp.asarray(ct_lse, jnp.float64)))
        return [np.asarray(x) for x in (out, lse, *grads)]


def _backend_call(q, k, v, ct, ct_lse, causal: bool, config: MosaicConfig, grads: bool):
    """The backend's own forward and backward in interpret mode, as ``pallas_flash.op`` calls them."""
    backend = backends.get("mosaic")
    spec = AttentionSpec(scale=1.0 / np.sqrt(q.shape[-1]), causal=causal)
    out, lse2 = backend.forward(q, k, v, AttentionInputs(), spec, config=config, interpret=True)
    if not grads:
        return out, lse2 * np.log(2.0), ()
    g = backend.backward(q, k, v, out, lse2, ct, jnp.asarray(ct_lse, jnp.float32), AttentionInputs(), spec,
                         config=config, interpret=True, want_dbias=False, want_dslopes=False)
    return out, lse2 * np.log(2.0), (g.dq, g.dk, g.dv)


def _check(shape: Shape, dtype, causal: bool, seed: int, config: MosaicConfig | None, grads: bool,
           interpret: bool = False):
    """The kernel against float64: through the public API on a GPU, the backend's own calls in interpret mode."""
    q, k, v, ct = random_qkv(shape, dtype, seed)
    ct_lse = np.random.default_rng(seed + 7).standard_normal((shape.batch, shape.num_heads, shape.seq_q))

    def f(q, k, v):
        return pf.attention_with_lse(q, k, v, is_causal=causal, implementation="mosaic", config=config)

    if interpret:
        out, lse, got_grads = _backend_call(q, k, v, ct, ct_lse, causal, config, grads)
    elif grads:
        (out, lse), vjp = jax.vjp(f, q, k, v)
        got_grads = vjp((ct, jnp.asarray(ct_lse, jnp.float32)))
    else:
        out, lse = f(q, k, v)
        got_grads = ()
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (shape.batch, shape.num_heads, shape.seq_q) and lse.dtype == jnp.float32
    want = _reference(q, k, v, ct, ct_lse, causal)
    tol = TOLERANCE[jnp.dtype(dtype)]
    for label, got, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *got_grads), want):
        if label != "lse":
            assert got.shape == ref.shape and got.dtype == q.dtype
        err = rel_err(got, ref)
        assert err <= tol, f"{label}: relative error {err:.3e} > {tol:.0e} ({shape}, causal={causal}, seed={seed})"
    return out, lse


# On a CPU: several 128-row query tiles and 64-key blocks, ragged tails, a causal diagonal where the
# first warpgroup of a CTA sees one key block fewer than the second.
INTERPRET_CASES = {
    "causal_tq<tk_gqa2": (Shape("i", 1, 200, 333, 2, 1, 64), True, jnp.bfloat16, MosaicForwardConfig(64, 64, 2)),
    "causal_tq>tk": (Shape("i", 1, 333, 200, 2, 1, 64), True, jnp.float16, MosaicForwardConfig(64, 64, 3)),
    "full_gqa2_3stages": (Shape("i", 2, 130, 300, 4, 2, 64), False, jnp.bfloat16, MosaicForwardConfig(64, 64, 3)),
    "full_d128_one_block": (Shape("i", 1, 77, 50, 2, 2, 128), False, jnp.float16, MosaicForwardConfig(64, 128, 2)),
}


@pytest.mark.skipif(ON_GPU, reason="the GPU tests below run the compiled kernel")
@pytest.mark.parametrize("name", INTERPRET_CASES)
def test_forward_in_interpret_mode(name, seed):
    shape, causal, dtype, fwd = INTERPRET_CASES[name]
    _check(shape, dtype, causal, seed, MosaicConfig(fwd=fwd, bwd=SMALL_BWD), grads=False, interpret=True)


@pytest.mark.skipif(ON_GPU, reason="the GPU tests below run the compiled kernels")
def test_gradients_in_interpret_mode(seed):
    """The residuals the Mosaic forward returns drive the Triton backward to the float64 gradients
    (and the log-sum-exp's cotangent too)."""
    shape = Shape("g", 1, 70, 90, 4, 2, 64)
    _check(shape, jnp.bfloat16, True, seed, MosaicConfig(fwd=MosaicForwardConfig(64, 64, 2), bwd=SMALL_BWD),
           grads=True, interpret=True)


GPU_SHAPES = {
    "gqa4_tq1000_tk777_d64": Shape("m", 2, 1000, 777, 4, 1, 64),
    "gqa4_tq777_tk1000_d128": Shape("m", 1, 777, 1000, 8, 2, 128),
    "mha_t1000_d256": Shape("m", 1, 1000, 1000, 4, 4, 256),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", GPU_SHAPES)
def test_gpu_values_and_gradients(name, causal, dtype, seed):
    _check(GPU_SHAPES[name], dtype, causal, seed, None, grads=True)


@pytest.mark.gpu
@pytest.mark.parametrize("block_kv, num_stages", [(64, 2), (64, 4), (128, 2), (128, 3), (192, 2), (256, 2)])
def test_gpu_every_pipeline_shape(block_kv, num_stages, seed):
    """Each key block and ring depth, on a long ragged causal problem: many refills of every slot."""
    config = MosaicConfig(fwd=MosaicForwardConfig(block_kv=block_kv, num_stages=num_stages))
    shape = Shape("p", 1, 2000, 2500, 2, 1, 64)
    out, lse = _check(shape, jnp.bfloat16, True, seed, config, grads=False)
    again = pf.attention_with_lse(*_qkv(shape, jnp.bfloat16, seed), is_causal=True, implementation="mosaic",
                                  config=config)
    # No atomics and no reordering between runs: the forward is bit-identical run to run.
    assert np.array_equal(np.asarray(out), np.asarray(again[0])) and np.array_equal(np.asarray(lse), np.asarray(again[1]))
