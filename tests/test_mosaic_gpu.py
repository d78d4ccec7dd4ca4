"""The Mosaic GPU backend's kernels (``implementation="mosaic"``, #14); its configs and what it refuses are
``test_mosaic_config.py``'s.

On a CPU: the forward and backward kernels in Mosaic GPU interpret mode (``plgpu.InterpretGPUParams``: the
three warpgroups run as threads; TMA copies, mbarriers, wgmma and the
shared-memory rings are simulated, and the interpreter checks that every
barrier phase is observed; its race detector runs on the backward). Primitives
the GPU path uses that have no interpreter rule in jax 0.11.2 are replaced in
interpret mode alone (``forward.py``'s and ``backward.py``'s docstrings): a
wgmma whose left operand is in registers takes a shared-memory copy of it,
``pl.run_state`` accumulators become fresh ones added in registers, and the
backward's TMA reduction of dQ becomes per-CTA partial sums that XLA adds. The
head-dim-256 backward (``backward_wide.py``'s role split) runs in interpret
mode too, under the race detector as well.

Interpret mode runs each warpgroup's host callbacks on XLA's CPU thread pool:
with fewer pool threads than warpgroups that wait on barriers at once it can
deadlock, so these tests rely on conftest's four host devices (on a two-core
machine without them a three-warpgroup kernel can hang).

On a GPU (``gpu`` marker): the compiled kernels against the float64 reference
at odd shapes (Tq != Tk, lengths that are not block multiples, GQA 4:1 and
8:2, head dims 64/128/256, causal and not, bf16 and fp16), values, the
log-sum-exp and gradients under random cotangents, in both backward modes,
and the deterministic mode bit-identical across reruns.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

import pallas_flash as pf
from pallas_flash import backends
from pallas_flash.backends.mosaic_gpu import MosaicBackwardConfig, MosaicConfig, MosaicForwardConfig
from pallas_flash.backends.mosaic_gpu.backward import mosaic_backward
from pallas_flash.backends.mosaic_gpu.config import MAX_SMEM_BYTES, smem_bytes
from pallas_flash.backends.mosaic_gpu.forward import mosaic_forward
from pallas_flash.reference import attention_reference
from pallas_flash.spec import AttentionInputs, AttentionSpec
from pallas_flash.testing.shapes import Shape
from tests.cases import random_qkv
from tests.conftest import ON_GPU, TOLERANCE, rel_err

DTYPES = (jnp.bfloat16, jnp.float16)
FUSED = MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2, deterministic=False)
DETERMINISTIC = MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2, deterministic=True)
# The fused dQ with 128-row steps (D=64 only): no spare dS^T buffer, the first step's product under a condition.
FUSED_ROWS128 = MosaicBackwardConfig(block_q=128, num_stages=2, deterministic=False)


def _qkv(shape: Shape, dtype=jnp.bfloat16, seed: int = 0):
    return random_qkv(shape, dtype, seed)[:3]


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
@pytest.mark.parametrize("persistent", [False, True], ids=["cta_per_tile", "persistent"])
@pytest.mark.parametrize("overlap", [False, True], ids=["turns", "overlap"])
@pytest.mark.parametrize("name", INTERPRET_CASES)
def test_forward_in_interpret_mode(name, overlap, persistent, seed):
    shape, causal, dtype, fwd = INTERPRET_CASES[name]
    fwd = dataclasses.replace(fwd, overlap=overlap, persistent=persistent)
    _check(shape, dtype, causal, seed, MosaicConfig(fwd=fwd), grads=False, interpret=True)


@pytest.mark.skipif(ON_GPU, reason="the GPU tests below run the compiled kernel")
@pytest.mark.parametrize("persistent", [False, True], ids=["cta_per_tile", "persistent"])
@pytest.mark.parametrize("name", ["causal_tq<tk_gqa2", "causal_tq>tk", "full_gqa2_3stages"])
def test_forward_three_warpgroups_in_interpret_mode(name, persistent, seed):
    """Three compute warpgroups (192-row CTAs; the token goes round them): causal diagonals where each of the
    three sees a different number of key blocks, ragged tails, GQA."""
    shape, causal, dtype, fwd = INTERPRET_CASES[name]
    fwd = dataclasses.replace(fwd, overlap=True, persistent=persistent, compute_wgs=3)
    _check(shape, dtype, causal, seed, MosaicConfig(fwd=fwd), grads=False, interpret=True)


# The backward on a CPU: 128-key CTAs and 64-row query blocks, GQA groups summed on chip, ragged tails
# of both sequences (the last key tile's blocks all masked), causal diagonals with Tq < Tk and Tq > Tk,
# fewer rows than one block; both dQ modes (fused: per-CTA partial sums in interpret mode).
BWD_INTERPRET_CASES = {
    "causal_tq<tk_gqa2_fused": (Shape("b", 1, 200, 333, 2, 1, 64), True, jnp.bfloat16, FUSED),
    "causal_tq<tk_gqa2_deterministic": (Shape("b", 1, 200, 333, 2, 1, 64), True, jnp.bfloat16, DETERMINISTIC),
    "causal_tq>tk_gqa4_d128_fused": (Shape("b", 1, 333, 200, 4, 1, 128), True, jnp.float16, FUSED),
    "full_gqa2_ragged_1stage_deterministic": (
        Shape("b", 2, 130, 150, 4, 2, 64), False, jnp.bfloat16,
        MosaicBackwardConfig(num_stages=1, dq_block_kv=128, dq_num_stages=1, deterministic=True),
    ),
    "full_d128_one_block_fused": (Shape("b", 1, 77, 50, 2, 2, 128), False, jnp.float16, FUSED),
    # 128-row query blocks (the D=64 default): diagonals inside a block, fewer rows than one block.
    "causal_tq>tk_gqa2_rows128": (
        Shape("b", 1, 333, 200, 2, 1, 64), True, jnp.bfloat16,
        MosaicBackwardConfig(block_q=128, num_stages=3, dq_block_kv=128, dq_num_stages=2),
    ),
    "causal_tq<tk_gqa2_rows128_fused": (Shape("b", 1, 300, 333, 2, 1, 64), True, jnp.bfloat16, FUSED_ROWS128),
    "full_ragged_rows128_1stage_fused": (  # one stage: the spare dS^T buffer fits, the 128-row dropped product
        Shape("b", 1, 200, 150, 2, 2, 64), False, jnp.bfloat16,
        MosaicBackwardConfig(block_q=128, num_stages=1, deterministic=False),
    ),
    "full_ragged_rows128_d128": (
        Shape("b", 2, 100, 150, 2, 2, 128), False, jnp.float16,
        MosaicBackwardConfig(block_q=128, num_stages=2, dq_block_kv=64, dq_num_stages=3),
    ),
    # D=256: backward_wide.py's role split (64-row CTAs, P handed over through shared memory).
    "d256_causal_tq<tk_gqa2": (Shape("b", 1, 150, 333, 2, 1, 256), True, jnp.bfloat16, DETERMINISTIC),
    "d256_causal_tq>tk_gqa4_1stage": (
        Shape("b", 1, 200, 130, 4, 1, 256), True, jnp.float16,
        MosaicBackwardConfig(num_stages=1, dq_block_kv=64, dq_num_stages=1),
    ),
    "d256_full_gqa2_ragged": (Shape("b", 2, 100, 70, 4, 2, 256), False, jnp.bfloat16, FUSED),
}


@pytest.mark.skipif(ON_GPU, reason="the GPU tests below run the compiled kernels")
@pytest.mark.parametrize("name", BWD_INTERPRET_CASES)
def test_backward_in_interpret_mode(name, seed):
    """The Mosaic forward's residuals drive the Mosaic backward to the float64 gradients (the log-sum-exp's
    cotangent too)."""
    shape, causal, dtype, bwd = BWD_INTERPRET_CASES[name]
    _check(shape, dtype, causal, seed, MosaicConfig(fwd=MosaicForwardConfig(64, 64, 2), bwd=bwd), grads=True,
           interpret=True)


def _residuals(shape: Shape, dtype, causal: bool, seed: int):
    """``(q, k, v, out, lse2, do, dlse, spec)`` with ``out``/``lse2`` from the float32 reference."""
    q, k, v, do = random_qkv(shape, dtype, seed)
    spec = AttentionSpec(scale=1.0 / np.sqrt(shape.head_dim), causal=causal)
    out, lse = attention_reference(q, k, v, is_causal=causal, return_lse=True)
    dlse = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(lse.shape), jnp.float32)
    return q, k, v, out.astype(dtype), (lse / np.log(2.0)).astype(jnp.float32), do, dlse, spec


@pytest.mark.skipif(ON_GPU, reason="interpret mode")
@pytest.mark.parametrize(
    "bwd, head_dim",
    [(FUSED, 64), (FUSED_ROWS128, 64), (DETERMINISTIC, 64), (DETERMINISTIC, 256)],
    ids=["fused", "fused_rows128", "deterministic", "d256"],
)
def test_backward_race_detector(bwd, head_dim, seed):
    """Mosaic GPU interpret mode's happens-before race detector finds no race in either backward kernel."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as mgpu_interpret
    except ImportError:  # a private module: other JAX versions may move it
        pytest.skip("this JAX has no jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call.get_races")
    q, k, v, out, lse2, do, dlse, spec = _residuals(Shape("r", 1, 150, 200, 2, 1, head_dim), jnp.bfloat16, True, seed)
    mgpu_interpret.reset_gpu_interpret_mode_state()
    params = plgpu.InterpretGPUParams(detect_races=True)
    grads = mosaic_backward(q, k, v, out, lse2, do, dlse, spec=spec, config=bwd, interpret=params)
    jax.block_until_ready(grads)
    assert not mgpu_interpret.get_races().races_found
    assert all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in grads[:3])


@pytest.mark.skipif(ON_GPU, reason="interpret mode")
@pytest.mark.parametrize("persistent", [False, True], ids=["cta_per_tile", "persistent"])
@pytest.mark.parametrize("overlap, compute_wgs", [(False, 2), (True, 2), (True, 3)],
                         ids=["turns", "overlap", "overlap_wgs3"])
def test_forward_race_detector(overlap, compute_wgs, persistent, seed):
    """The race detector finds no race in either forward schedule (causal, GQA, ragged: skipped blocks and
    a first warpgroup that sees fewer key blocks than its partner)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as mgpu_interpret
    except ImportError:  # a private module: other JAX versions may move it
        pytest.skip("this JAX has no jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call.get_races")
    q, k, v, _ = random_qkv(Shape("r", 1, 200, 333, 2, 1, 64), jnp.bfloat16, seed)
    spec = AttentionSpec(scale=0.125, causal=True)
    mgpu_interpret.reset_gpu_interpret_mode_state()
    params = plgpu.InterpretGPUParams(detect_races=True)
    fwd = MosaicForwardConfig(block_kv=64, num_stages=2, overlap=overlap, persistent=persistent,
                              compute_wgs=compute_wgs)
    out, lse2 = mosaic_forward(q, k, v, AttentionInputs(), spec=spec, config=fwd, interpret=params)
    jax.block_until_ready(out)
    assert not mgpu_interpret.get_races().races_found
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all()) and bool(jnp.isfinite(lse2).all())


GPU_SHAPES = {
    "gqa4_tq1000_tk777_d64": Shape("m", 2, 1000, 777, 4, 1, 64),
    "gqa4_tq777_tk1000_d128": Shape("m", 1, 777, 1000, 8, 2, 128),
    "mha_t1000_d256": Shape("m", 1, 1000, 1000, 4, 4, 256),
    "gqa2_tq777_tk1000_d256": Shape("m", 1, 777, 1000, 4, 2, 256),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", GPU_SHAPES)
def test_gpu_values_and_gradients(name, causal, dtype, seed):
    _check(GPU_SHAPES[name], dtype, causal, seed, None, grads=True)


@pytest.mark.gpu
@pytest.mark.parametrize("persistent", [False, True], ids=["cta_per_tile", "persistent"])
@pytest.mark.parametrize("overlap", [False, True], ids=["turns", "overlap"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_kv, num_stages", [(64, 2), (64, 4), (128, 2), (128, 3), (192, 2), (256, 2)])
def test_gpu_every_pipeline_shape(block_kv, num_stages, head_dim, overlap, persistent, seed):
    """Each key block and ring depth, on a long ragged causal problem: many refills of every slot (and, persistent,
    more tiles than SMs: 2 batches x 8 heads x 16 query tiles; GQA 4:1)."""
    fwd = MosaicForwardConfig(block_kv=block_kv, num_stages=num_stages, overlap=overlap, persistent=persistent)
    _check_long_ragged_forward(fwd, head_dim, True, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("persistent", [False, True], ids=["cta_per_tile", "persistent"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_three_warpgroups(causal, head_dim, persistent, seed):
    """Three compute warpgroups (192-row CTAs) on the same long ragged problem, causal and not."""
    fwd = MosaicForwardConfig(block_kv=128, num_stages=2, overlap=True, persistent=persistent, compute_wgs=3)
    _check_long_ragged_forward(fwd, head_dim, causal, seed)


def _check_long_ragged_forward(fwd: MosaicForwardConfig, head_dim: int, causal: bool, seed: int):
    """The forward under ``fwd`` against float64 on a long ragged problem (Tq 2000, Tk 2500, GQA 4:1), run twice;
    a config whose tiles do not fit is skipped."""
    need = smem_bytes(fwd.block_q, fwd.block_kv, fwd.num_stages, head_dim, jnp.bfloat16, fwd.q_buffers, fwd.compute_wgs)
    if need > MAX_SMEM_BYTES:
        pytest.skip(f"{fwd} does not fit in shared memory at head_dim={head_dim}")
    config = MosaicConfig(fwd=fwd)
    shape = Shape("p", 2, 2000, 2500, 8, 2, head_dim)
    out, lse = _check(shape, jnp.bfloat16, causal, seed, config, grads=False)
    again = pf.attention_with_lse(*_qkv(shape, jnp.bfloat16, seed), is_causal=causal, implementation="mosaic",
                                  config=config)
    # No atomics and no reordering between runs: the forward is bit-identical run to run.
    assert np.array_equal(np.asarray(out), np.asarray(again[0])) and np.array_equal(np.asarray(lse), np.asarray(again[1]))


def _gradients(shape: Shape, dtype, causal: bool, seed: int, bwd: MosaicBackwardConfig):
    q, k, v, ct = random_qkv(shape, dtype, seed)
    ct_lse = jnp.asarray(np.random.default_rng(seed + 7).standard_normal((shape.batch, shape.num_heads, shape.seq_q)),
                         jnp.float32)

    @jax.jit
    def grads(q, k, v, ct, ct_lse):
        def f(q, k, v):
            return pf.attention_with_lse(q, k, v, is_causal=causal, implementation="mosaic", config=MosaicConfig(bwd=bwd))

        return jax.vjp(f, q, k, v)[1]((ct, ct_lse))

    return grads, (q, k, v, ct, ct_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", ["gqa4_tq1000_tk777_d64", "gqa4_tq777_tk1000_d128"])
def test_gpu_deterministic_backward_is_bit_identical(name, causal, seed):
    """``deterministic=True``: the float64 gradients, and bit-identical dq, dk, dv on every rerun; the fused
    (atomic) mode agrees with it to rounding."""
    shape = GPU_SHAPES[name]
    fn, args = _gradients(shape, jnp.bfloat16, causal, seed, dataclasses.replace(FUSED, deterministic=True))
    first = [np.asarray(g) for g in fn(*args)]
    for _ in range(3):
        for a, b in zip(first, fn(*args)):
            assert np.array_equal(a, np.asarray(b))
    q, k, v, ct, ct_lse = args
    want = _reference(q, k, v, ct, np.asarray(ct_lse), causal)[2:]
    fused_fn, _ = _gradients(shape, jnp.bfloat16, causal, seed, FUSED)
    for label, got, fused, ref in zip(("dq", "dk", "dv"), first, fused_fn(*args), want):
        assert rel_err(got, ref) <= TOLERANCE[jnp.dtype(jnp.bfloat16)], label
        assert rel_err(fused, got.astype(np.float32)) <= 1e-2, label


@pytest.mark.gpu
@pytest.mark.parametrize(
    "bwd",
    [
        MosaicBackwardConfig(num_stages=1, dq_num_stages=1, deterministic=True),
        MosaicBackwardConfig(num_stages=3, dq_block_kv=128, dq_num_stages=2, deterministic=True),
        MosaicBackwardConfig(num_stages=1, deterministic=False),
        MosaicBackwardConfig(num_stages=2, deterministic=False),
        MosaicBackwardConfig(block_q=128, num_stages=2, dq_block_kv=64, dq_num_stages=3),
    ],
    ids=["det_1x1", "det_3x2_dq128", "fused_1", "fused_2", "det_rows128"],
)
def test_gpu_every_backward_pipeline_shape(bwd, seed):
    """Each ring depth and dQ key block on a long ragged causal GQA problem: many refills of every slot."""
    shape = Shape("p", 1, 2000, 2500, 4, 2, 128)
    _check(shape, jnp.bfloat16, True, seed, MosaicConfig(bwd=bwd), grads=True)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gpu_fused_rows128_d64(causal, seed):
    """The fused dQ with 128-row query steps (two wgmma M per dQ product), D=64 where it fits, ragged GQA."""
    shape = Shape("p", 1, 2000, 2500, 4, 2, 64)
    _check(shape, jnp.bfloat16, causal, seed, MosaicConfig(bwd=FUSED_ROWS128), grads=True)
