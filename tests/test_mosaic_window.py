"""The Mosaic GPU kernels with a local window (``local_window_size=(left, right)``), in interpret mode on a CPU.

The forward streams only the key blocks a query tile's window reaches (the first
one from the window's left edge, the last from its right edge or the causal
diagonal), masks the blocks across either edge, and keeps the two compute
warpgroups' turns in step when one of them starts later than the other. Each
case: the output and the log-sum-exp (``-inf`` exactly where the reference's is:
rows whose window holds no key) against float64, both schedules, persistent or
not. The backward (all three kernel pairs, head dims 64 to 256): the dK/dV
kernel streams the query blocks whose windows reach its keys and masks those
across either edge, the dQ kernel the key blocks as the forward does;
gradients under a random cotangent against float64, both dQ modes.
``MosaicBackend.supports`` refuses windows until these have passed on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_flash.backends.mosaic_gpu import MosaicBackwardConfig, MosaicForwardConfig
from pallas_flash.backends.mosaic_gpu.backward import mosaic_backward
from pallas_flash.backends.mosaic_gpu.forward import mosaic_forward
from pallas_flash.reference import attention_reference
from pallas_flash.spec import AttentionInputs, AttentionSpec
from pallas_flash.testing.shapes import Shape
from tests.cases import random_qkv
from tests.conftest import ON_GPU, TOLERANCE, rel_err

# name: (shape, causal, window (left, right), lengths)
CASES = {
    # A window narrower than a key block: both edges inside one block, warpgroup 1 starting a block later.
    "causal_w40": (Shape("w", 1, 300, 300, 2, 1, 64), True, (40, 0), False),
    # Wider than a block, both sides, Tq < Tk, GQA.
    "both_sides_tq<tk_gqa2": (Shape("w", 1, 200, 333, 4, 2, 64), False, (70, 90), False),
    # Tq > Tk: late rows whose window holds no key (lse = -inf, O = 0); a right edge below the diagonal.
    "tq>tk_right_negative": (Shape("w", 1, 333, 150, 2, 1, 128), False, (100, -20), False),
    # A window and per-batch lengths.
    "causal_w100_lengths": (Shape("w", 3, 260, 260, 2, 1, 64), True, (100, 0), True),
}


def _check(shape: Shape, causal: bool, window, lengths: bool, fwd: MosaicForwardConfig, seed: int):
    q, k, v, _ = random_qkv(shape, jnp.bfloat16, seed)
    q_len = kv_len = None
    if lengths:
        q_len = jnp.asarray([shape.seq_q // 3, shape.seq_q - 37, shape.seq_q + 100], jnp.int32)
        kv_len = jnp.asarray([shape.seq_k // 2 + 5, shape.seq_k, 0], jnp.int32)
    spec = AttentionSpec(scale=1.0 / np.sqrt(shape.head_dim), causal=causal, window=window,
                         has_q_lengths=lengths, has_kv_lengths=lengths)
    out, lse2 = mosaic_forward(q, k, v, AttentionInputs(q_lengths=q_len, kv_lengths=kv_len), spec=spec, config=fwd,
                               interpret=True)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x.astype(jnp.float32), np.float64)) for x in (q, k, v)]
        ref_out, ref_lse = attention_reference(*f64, is_causal=causal, local_window_size=window, return_lse=True,
                                               query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
        ref_out, ref_lse = np.asarray(ref_out), np.asarray(ref_lse)
    lse = np.asarray(lse2, np.float64) * np.log(2.0)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)), "lse: -inf rows differ"
    seen = np.isfinite(ref_lse)
    assert seen.any() and (~seen).any() if window[1] < 0 else seen.any()
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), "out: not finite"
    tol = TOLERANCE[jnp.dtype(jnp.bfloat16)]
    assert rel_err(out, ref_out) <= tol, f"out: {rel_err(out, ref_out):.3e}"
    assert rel_err(lse[seen], ref_lse[seen]) <= tol, f"lse: {rel_err(lse[seen], ref_lse[seen]):.3e}"


@pytest.mark.skipif(ON_GPU, reason="interpret mode")
@pytest.mark.parametrize("persistent", [False, True], ids=["cta_per_tile", "persistent"])
@pytest.mark.parametrize("overlap, compute_wgs", [(False, 2), (True, 2), (True, 3)],
                         ids=["turns", "overlap", "overlap_wgs3"])
@pytest.mark.parametrize("name", CASES)
def test_interpret_window_forward(name, overlap, compute_wgs, persistent, seed):
    shape, causal, window, lengths = CASES[name]
    fwd = MosaicForwardConfig(block_kv=64, num_stages=2, overlap=overlap, persistent=persistent,
                              compute_wgs=compute_wgs)
    _check(shape, causal, window, lengths, fwd, seed)


@pytest.mark.parametrize("window", [(100, 0), (70, 90)], ids=["causal_left", "both_sides"])
@pytest.mark.parametrize(
    "head_dim, config",
    [
        (64, MosaicForwardConfig(block_kv=128, num_stages=2, overlap=False, persistent=True)),
        (128, MosaicForwardConfig(block_kv=128, num_stages=2, overlap=True, persistent=True)),
        (256, MosaicForwardConfig(block_kv=64, num_stages=2, overlap=True, persistent=False)),
    ],
    ids=["d64_turns_persistent", "d128_overlap_persistent", "d256_overlap"],
)
def test_window_forward_lowers_for_cuda(head_dim, config, window):
    """The windowed forward lowers for CUDA on any machine (see ``tests/test_mosaic_lowering.py``)."""
    import re

    q = jnp.zeros((2, 300, 4, head_dim), jnp.bfloat16)
    k = jnp.zeros((2, 333, 2, head_dim), jnp.bfloat16)
    spec = AttentionSpec(scale=0.1, causal=window[1] == 0, window=window)
    fn = jax.jit(lambda q, k, v: mosaic_forward(q, k, v, AttentionInputs(), spec=spec, config=config))
    text = fn.trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"stablehlo.custom_call @(mosaic_gpu\w*)", text)) == 1


FUSED = MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2, deterministic=False)
DETERMINISTIC = MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2, deterministic=True)
BWD_CASES = {
    "causal_w40_det": (Shape("w", 1, 300, 300, 2, 1, 64), True, (40, 0), False, DETERMINISTIC),
    "causal_w40_fused": (Shape("w", 1, 300, 300, 2, 1, 64), True, (40, 0), False, FUSED),
    "both_sides_tq<tk_gqa2_rows128": (
        Shape("w", 1, 200, 333, 4, 2, 64), False, (70, 90), False,
        MosaicBackwardConfig(block_q=128, num_stages=2, dq_block_kv=128, dq_num_stages=2),
    ),
    "tq>tk_right_negative_d128_fused": (Shape("w", 1, 333, 150, 2, 1, 128), False, (100, -20), False, FUSED),
    "causal_w100_lengths_det": (Shape("w", 3, 260, 260, 2, 1, 64), True, (100, 0), True, DETERMINISTIC),
    # D=256: backward_wide.py's role split (64-row tiles on both sides).
    "d256_causal_w70_lengths": (Shape("w", 3, 200, 200, 2, 1, 256), True, (70, 0), True, DETERMINISTIC),
    "d256_both_sides_tq>tk_gqa2": (Shape("w", 1, 230, 150, 4, 2, 256), False, (50, 30), False, DETERMINISTIC),
}


def _check_gradients(shape: Shape, causal: bool, window, lengths: bool, fwd: MosaicForwardConfig,
                     bwd: MosaicBackwardConfig, seed: int, interpret: bool):
    """The forward's output and the backward's gradients under random cotangents against float64."""
    q, k, v, ct = random_qkv(shape, jnp.bfloat16, seed)
    q_len = kv_len = None
    if lengths:
        q_len = jnp.asarray([shape.seq_q // 3, shape.seq_q - 37, shape.seq_q + 100], jnp.int32)
        kv_len = jnp.asarray([shape.seq_k // 2 + 5, shape.seq_k, 0], jnp.int32)
    spec = AttentionSpec(scale=1.0 / np.sqrt(shape.head_dim), causal=causal, window=window,
                         has_q_lengths=lengths, has_kv_lengths=lengths)
    inputs = AttentionInputs(q_lengths=q_len, kv_lengths=kv_len)
    ct_lse = np.random.default_rng(seed + 7).standard_normal((shape.batch, shape.num_heads, shape.seq_q))

    def run(q, k, v, ct, ct_lse):
        out, lse2 = mosaic_forward(q, k, v, inputs, spec=spec, config=fwd, interpret=interpret)
        dlse = jnp.where(jnp.isneginf(lse2), 0.0, ct_lse)  # the op's convention: no gradient through -inf
        g = mosaic_backward(q, k, v, out, lse2, ct, dlse, spec=spec, config=bwd, inputs=inputs, interpret=interpret)
        return out, g.dq, g.dk, g.dv

    got = (run if interpret else jax.jit(run))(q, k, v, ct, jnp.asarray(ct_lse, jnp.float32))
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x.astype(jnp.float32), np.float64)) for x in (q, k, v, ct)]

        def f(q, k, v):
            return attention_reference(q, k, v, is_causal=causal, local_window_size=window, return_lse=True,
                                       query_seq_lengths=q_len, key_value_seq_lengths=kv_len)

        (ref_out, ref_lse), vjp = jax.vjp(f, *f64[:3])
        want = (ref_out, *vjp((f64[3], jnp.where(jnp.isfinite(ref_lse), jnp.asarray(ct_lse, jnp.float64), 0.0))))
    tol = TOLERANCE[jnp.dtype(jnp.bfloat16)]
    for label, g, ref in zip(("out", "dq", "dk", "dv"), got, want):
        g, ref = np.asarray(g, np.float64), np.asarray(ref)
        assert g.shape == ref.shape and np.isfinite(g).all(), label
        assert rel_err(g, ref) <= tol, f"{label}: relative error {rel_err(g, ref):.3e} ({shape}, window {window})"


@pytest.mark.skipif(ON_GPU, reason="interpret mode")
@pytest.mark.parametrize("name", BWD_CASES)
def test_interpret_window_backward(name, seed):
    shape, causal, window, lengths, bwd = BWD_CASES[name]
    _check_gradients(shape, causal, window, lengths, MosaicForwardConfig(block_kv=64, num_stages=2), bwd, seed,
                     interpret=True)


GPU_CASES = {
    "d64_causal_w256_lengths": (Shape("w", 3, 2000, 2000, 4, 1, 64), True, (256, 0), True),
    "d128_both_sides_tq<tk_gqa4": (Shape("w", 2, 1500, 1777, 8, 2, 128), False, (300, 200), False),
    "d128_tq>tk_right_negative": (Shape("w", 2, 1777, 900, 4, 4, 128), False, (500, -30), False),
    "d256_causal_w100": (Shape("w", 2, 1000, 1000, 4, 4, 256), True, (100, 0), False),
}


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["deterministic", "fused"])
@pytest.mark.parametrize("overlap", [False, True], ids=["turns", "overlap"])
@pytest.mark.parametrize("name", GPU_CASES)
def test_gpu_window(name, overlap, fused, seed):
    shape, causal, window, lengths = GPU_CASES[name]
    wide = shape.head_dim == 256
    if wide and fused:
        pytest.skip("head_dim 256: the backward is deterministic in either mode")
    fwd = MosaicForwardConfig(block_kv=64 if wide else 128, num_stages=2, overlap=overlap, persistent=not wide)
    bwd = MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2, deterministic=not fused)
    _check_gradients(shape, causal, window, lengths, fwd, bwd, seed, interpret=False)


@pytest.mark.parametrize(
    "head_dim, config",
    [
        (64, MosaicBackwardConfig(block_q=128, num_stages=3, dq_block_kv=128, dq_num_stages=2)),
        (128, MosaicBackwardConfig(num_stages=2, deterministic=False)),
        (256, MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2)),
    ],
    ids=["d64_deterministic", "d128_fused", "d256"],
)
def test_window_backward_lowers_for_cuda(head_dim, config):
    import re

    q = jnp.zeros((2, 300, 4, head_dim), jnp.bfloat16)
    k = jnp.zeros((2, 333, 2, head_dim), jnp.bfloat16)
    lse2 = jnp.zeros((2, 4, 300), jnp.float32)
    spec = AttentionSpec(scale=0.1, causal=False, window=(70, 90))

    def backward(q, k, v, out, lse2, do):
        return mosaic_backward(q, k, v, out, lse2, do, None, spec=spec, config=config)[:3]

    text = jax.jit(backward).trace(q, k, k, q, lse2, q).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"stablehlo.custom_call @(mosaic_gpu\w*)", text)) == (1 if not config.deterministic else 2)
