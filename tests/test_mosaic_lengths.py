"""The Mosaic GPU kernels with per-batch sequence lengths (``query_seq_lengths``/``key_value_seq_lengths``).

The kernels take them (``forward.py``: key blocks past a batch row's key
length are not loaded, the block across it is masked, rows past its query
length see no key and give O = 0, lse = -inf; ``backward.py``,
``backward_dq.py``, ``backward_wide.py``: the same keys masked or skipped,
rows past the query length contribute nothing). Most tests call the kernels
themselves (each config, in interpret mode on a CPU, compiled on a GPU); one
goes through ``pallas_flash.dot_product_attention`` and its ``custom_vjp``.

Each batch row of a case has its own lengths: a query length of 0 (every row
empty), one that is not a block multiple, one past the array (the whole row),
and key lengths of 0, not a block multiple and the whole array; values, the
log-sum-exp (``-inf`` exactly where the reference's is) and the gradients
under random cotangents, against float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash.backends.mosaic_gpu import MosaicBackwardConfig, MosaicForwardConfig
from pallas_flash.backends.mosaic_gpu.backward import mosaic_backward
from pallas_flash.backends.mosaic_gpu.forward import mosaic_forward
from pallas_flash.reference import attention_reference
from pallas_flash.spec import AttentionInputs, AttentionSpec
from pallas_flash.testing.shapes import Shape
from tests.cases import random_qkv
from tests.conftest import ON_GPU, TOLERANCE, rel_err

FUSED = MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2, deterministic=False)
DETERMINISTIC = MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2, deterministic=True)
ROWS128 = MosaicBackwardConfig(block_q=128, num_stages=2, dq_block_kv=64, dq_num_stages=2, deterministic=True)


def _lengths(shape: Shape):
    """Per batch row (3 rows): query lengths ``[0, ragged, past the end]``, key lengths ``[all, ragged, 0]``: a row
    with no query (its keys' dK, dV are 0), both lengths ragged, and queries that see no key (O = 0, lse = -inf)."""
    q_len = np.array([0, shape.seq_q - 37, shape.seq_q + 100], np.int32)
    kv_len = np.array([shape.seq_k, shape.seq_k // 2 + 5, 0], np.int32)
    return jnp.asarray(q_len), jnp.asarray(kv_len)


def _reference(q, k, v, ct, ct_lse, causal, q_len, kv_len):
    """Float64 ``(out, lse, dq, dk, dv)``."""
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x.astype(jnp.float32), np.float64)) for x in (q, k, v)]

        def f(q, k, v):
            return attention_reference(q, k, v, is_causal=causal, return_lse=True, query_seq_lengths=q_len,
                                       key_value_seq_lengths=kv_len)

        (out, lse), vjp = jax.vjp(f, *f64)
        ct64 = jnp.asarray(np.asarray(ct.astype(jnp.float32), np.float64))
        grads = vjp((ct64, jnp.where(jnp.isfinite(lse), jnp.asarray(ct_lse, jnp.float64), 0.0)))
        return [np.asarray(x) for x in (out, lse, *grads)]


def _check_lengths(shape: Shape, dtype, causal: bool, seed: int, fwd: MosaicForwardConfig, bwd: MosaicBackwardConfig,
                   which: str, interpret: bool):
    q, k, v, ct = random_qkv(shape, dtype, seed)
    ct_lse = np.random.default_rng(seed + 7).standard_normal((shape.batch, shape.num_heads, shape.seq_q))
    q_len, kv_len = _lengths(shape)
    use_q, use_kv = which in ("both", "q"), which in ("both", "kv")
    spec = AttentionSpec(scale=1.0 / np.sqrt(shape.head_dim), causal=causal, has_q_lengths=use_q,
                         has_kv_lengths=use_kv)
    inputs = AttentionInputs(q_lengths=q_len if use_q else None, kv_lengths=kv_len if use_kv else None)

    def run(q, k, v, ct, ct_lse):
        out, lse2 = mosaic_forward(q, k, v, inputs, spec=spec, config=fwd, interpret=interpret)
        # The op's convention: the cotangent of a row's lse is 0 where the lse is -inf (no key seen).
        dlse = jnp.where(jnp.isneginf(lse2), 0.0, ct_lse)
        g = mosaic_backward(q, k, v, out, lse2, ct, dlse, spec=spec, config=bwd, inputs=inputs, interpret=interpret)
        return out, lse2 * np.log(2.0), g.dq, g.dk, g.dv

    got = (run if interpret else jax.jit(run))(q, k, v, ct, jnp.asarray(ct_lse, jnp.float32))
    want = _reference(q, k, v, ct, ct_lse, causal, q_len if use_q else None, kv_len if use_kv else None)
    tol = TOLERANCE[jnp.dtype(dtype)]
    for label, g, ref in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        g = np.asarray(g, np.float64)
        assert g.shape == ref.shape, label
        if label == "lse":  # -inf exactly where no key is seen, else close
            assert np.array_equal(np.isneginf(g), np.isneginf(ref)), "lse: -inf rows differ"
            g, ref = g[np.isfinite(ref)], ref[np.isfinite(ref)]
        assert np.isfinite(g).all(), f"{label}: not finite"
        err = rel_err(g, ref)
        assert err <= tol, f"{label}: relative error {err:.3e} > {tol:.0e} ({shape}, causal={causal}, {which})"


INTERPRET_CASES = {
    # Shape(name, batch, Tq, Tk, heads, kv heads, head dim): 3 batch rows, one per length kind.
    "d64_gqa2_turns_det": (Shape("l", 3, 200, 333, 2, 1, 64), False, MosaicForwardConfig(64, 64, 2), DETERMINISTIC),
    "d64_causal_overlap_persistent_fused": (
        Shape("l", 3, 333, 200, 2, 1, 64), True,
        MosaicForwardConfig(64, 64, 2, overlap=True, persistent=True), FUSED),
    "d128_causal_det": (Shape("l", 3, 150, 150, 2, 2, 128), True, MosaicForwardConfig(64, 64, 2), DETERMINISTIC),
    "d256_causal": (Shape("l", 3, 150, 140, 2, 1, 256), True, MosaicForwardConfig(64, 64, 2), DETERMINISTIC),
    "d256_full_gqa2": (Shape("l", 3, 200, 150, 4, 2, 256), False, MosaicForwardConfig(64, 64, 2), DETERMINISTIC),
    "d64_causal_rows128": (Shape("l", 3, 300, 200, 2, 1, 64), True, MosaicForwardConfig(64, 64, 2), ROWS128),
}


@pytest.mark.skipif(ON_GPU, reason="interpret mode")
@pytest.mark.parametrize("which", ["both", "q", "kv"])
@pytest.mark.parametrize("name", INTERPRET_CASES)
def test_interpret_lengths(name, which, seed):
    if which != "both" and not name.startswith("d64"):
        pytest.skip("one length at a time: covered at head_dim 64")
    shape, causal, fwd, bwd = INTERPRET_CASES[name]
    _check_lengths(shape, jnp.bfloat16, causal, seed, fwd, bwd, which, interpret=True)


GPU_CASES = {
    "d64_gqa4": Shape("l", 3, 1000, 777, 4, 1, 64),
    "d128_gqa4": Shape("l", 3, 777, 1000, 8, 2, 128),
    "d256": Shape("l", 3, 1000, 1000, 4, 4, 256),
}


@pytest.mark.gpu
@pytest.mark.parametrize("bwd", [DETERMINISTIC, FUSED, ROWS128], ids=["deterministic", "fused", "rows128"])
@pytest.mark.parametrize("overlap", [False, True], ids=["turns", "overlap"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", GPU_CASES)
def test_gpu_lengths(name, causal, overlap, bwd, seed):
    shape = GPU_CASES[name]
    if shape.head_dim == 256 and (bwd.deterministic is False or bwd.block_q != 64):
        pytest.skip("head_dim 256: the backward is deterministic in either mode, with 64-row query blocks")
    fwd = MosaicForwardConfig(block_kv=64 if shape.head_dim == 256 else 128, num_stages=2, overlap=overlap,
                              persistent=shape.head_dim == 64)
    _check_lengths(shape, jnp.bfloat16, causal, seed, fwd, bwd, "both", interpret=False)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_public_api_lengths(causal, seed):
    """``dot_product_attention(..., implementation="mosaic")`` with both lengths: the output and the gradients
    through the op's ``custom_vjp`` under a random cotangent (interpret mode on a CPU, compiled on a GPU)."""
    shape = Shape("l", 3, 1000, 777, 4, 2, 64) if ON_GPU else Shape("l", 3, 150, 140, 2, 1, 64)
    q, k, v, ct = random_qkv(shape, jnp.bfloat16, seed)
    q_len, kv_len = _lengths(shape)

    def f(q, k, v):
        return pf.dot_product_attention(q, k, v, is_causal=causal, query_seq_lengths=q_len,
                                        key_value_seq_lengths=kv_len, implementation="mosaic")

    out, vjp = jax.vjp(f, q, k, v)
    got = (out, *vjp(ct))
    # The output's cotangent alone (none on the log-sum-exp, which this API does not return).
    ref_out, _, *ref_grads = _reference(q, k, v, ct, np.zeros((shape.batch, shape.num_heads, shape.seq_q)),
                                        causal, q_len, kv_len)
    want = (ref_out, *ref_grads)
    for label, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        g = np.asarray(g, np.float64)
        assert g.shape == r.shape and np.isfinite(g).all(), label
        err = rel_err(g, r)
        assert err <= TOLERANCE[jnp.dtype(jnp.bfloat16)], f"{label}: relative error {err:.3e} ({shape}, causal={causal})"
