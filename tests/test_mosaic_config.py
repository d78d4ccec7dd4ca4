"""The Mosaic GPU backend's configs (validation, the shared-memory budget) and what it refuses (``supports``:
``NotImplementedError`` naming what is missing, and the fallback to Triton it allows). CPU only; the kernels
themselves are ``test_mosaic_gpu.py``'s.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash import backends
from pallas_flash.backends.mosaic_gpu import MosaicBackend, MosaicBackwardConfig, MosaicConfig, MosaicForwardConfig
from pallas_flash.backends.mosaic_gpu.config import (
    HEAD_DIMS,
    MAX_SMEM_BYTES,
    backward_smem_bytes,
    default_config,
    smem_bytes,
    spare_ds_fits,
)
from pallas_flash.backends.triton.config import BackwardConfig
from pallas_flash.reference import attention_reference
from pallas_flash.testing.shapes import Shape
from tests.conftest import TOLERANCE, rel_err
from tests.test_mosaic_gpu import DTYPES, FUSED, FUSED_ROWS128, _qkv

# A Triton backward config: the wrong type for the Mosaic backend's backward.
SMALL_BWD = BackwardConfig(16, 16, 16, 16, 4, 1, 4, 1)


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
        (dict(compute_wgs=4, overlap=True), ValueError, "compute_wgs=4 must be 2 or 3"),
        (dict(compute_wgs=3), ValueError, "compute_wgs=3 needs overlap=True"),
        (dict(compute_wgs=3.0, overlap=True), TypeError, "compute_wgs=3.0 must be an int"),
    ],
)
def test_forward_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        MosaicForwardConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(block_q=96), ValueError, r"block_q=96 must be one of \(64, 128\)"),
        (dict(dq_block_kv=256), ValueError, "dq_block_kv=256 must be 64 or 128"),
        (dict(num_stages=0), ValueError, r"num_stages=0 must be in \[1, 4\]"),
        (dict(dq_num_stages=5), ValueError, r"dq_num_stages=5 must be in \[1, 4\]"),
        (dict(num_stages=2.0), TypeError, "num_stages=2.0 must be an int"),
        (dict(deterministic=1), TypeError, "deterministic=1 must be a bool"),
    ],
)
def test_backward_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        MosaicBackwardConfig(**kwargs)


def test_config_types_are_checked():
    with pytest.raises(TypeError, match="MosaicConfig.fwd must be a MosaicForwardConfig"):
        MosaicConfig(fwd=pf.ForwardConfig())
    with pytest.raises(TypeError, match="MosaicConfig.bwd must be a MosaicBackwardConfig, got BackwardConfig"):
        MosaicConfig(bwd=SMALL_BWD)
    q, k, v = _qkv(Shape("c", 1, 64, 64, 2, 1, 64))
    with pytest.raises(TypeError, match="config must be a .*MosaicConfig for the 'mosaic' backend"):
        pf.dot_product_attention(q, k, v, implementation="mosaic", config=pf.FlashConfig())


def test_shared_memory_budget():
    """Tiles over the budget are refused before any lowering; every default config fits."""
    big = MosaicForwardConfig(block_kv=256, num_stages=4)
    assert smem_bytes(64, 256, 4, 256, jnp.bfloat16) > MAX_SMEM_BYTES
    with pytest.raises(ValueError, match="shared memory at head_dim=256 .*smaller block_kv, fewer num_stages"):
        big.check_fits(256, jnp.bfloat16)
    # A persistent kernel's second Q buffer: fits at D=128 with two 128-key stages, not at D=256.
    MosaicForwardConfig(block_kv=128, num_stages=2, persistent=True).check_fits(128, jnp.bfloat16)
    with pytest.raises(ValueError, match="persistent=False"):
        MosaicForwardConfig(block_kv=64, num_stages=2, persistent=True).check_fits(256, jnp.bfloat16)
    q, k, v = _qkv(Shape("c", 1, 64, 64, 2, 1, 256))
    with pytest.raises(ValueError, match="shared memory"):
        pf.dot_product_attention(q, k, v, implementation="mosaic", config=MosaicConfig(fwd=big))
    deep = MosaicBackwardConfig(num_stages=3, deterministic=False)  # fused dQ at D=128: K, V, 3 x (Q, dO), dS, dQ > 223 KiB
    assert backward_smem_bytes(deep, 128, jnp.bfloat16)[0] > MAX_SMEM_BYTES
    with pytest.raises(ValueError, match="shared memory in the dK/dV kernel at head_dim=128"):
        deep.check_fits(128, jnp.bfloat16)
    deep.check_fits(64, jnp.bfloat16)
    MosaicBackwardConfig(num_stages=3, deterministic=True).check_fits(128, jnp.bfloat16)  # no dS/dQ buffers
    # D=256 (backward_wide.py): K, V, 2 x (Q, dO) and two P tiles fit; a third stage does not, nor 128-key dQ blocks.
    MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2).check_fits(256, jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory in the dK/dV kernel at head_dim=256"):
        MosaicBackwardConfig(num_stages=3, dq_num_stages=2).check_fits(256, jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory in the dQ kernel at head_dim=256"):
        MosaicBackwardConfig(num_stages=2, dq_block_kv=128, dq_num_stages=1).check_fits(256, jnp.bfloat16)
    # 128-row query blocks: three stages fit at D=64, two at D=128, none at D=256 (its kernels take 64 rows).
    MosaicBackwardConfig(block_q=128, num_stages=3).check_fits(64, jnp.bfloat16)
    MosaicBackwardConfig(block_q=128, num_stages=2).check_fits(128, jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory in the dK/dV kernel at head_dim=128"):
        MosaicBackwardConfig(block_q=128, num_stages=3).check_fits(128, jnp.bfloat16)
    # The fused dQ with 128-row steps (two dS^T buffers of 128 x 128): two stages fit at D=64, three do not; at
    # D=128 not even one.
    FUSED_ROWS128.check_fits(64, jnp.bfloat16)
    assert not spare_ds_fits(FUSED_ROWS128, 64, jnp.bfloat16)  # the first dQ product under a condition
    assert spare_ds_fits(dataclasses.replace(FUSED_ROWS128, num_stages=1), 64, jnp.bfloat16)
    assert all(spare_ds_fits(FUSED, d, jnp.bfloat16) for d in (64, 128))  # every 64-row config keeps the spare
    with pytest.raises(ValueError, match="shared memory in the dK/dV kernel at head_dim=64"):
        MosaicBackwardConfig(block_q=128, num_stages=3, deterministic=False).check_fits(64, jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory in the dK/dV kernel at head_dim=128"):
        MosaicBackwardConfig(block_q=128, num_stages=1, deterministic=False).check_fits(128, jnp.bfloat16)
    with pytest.raises(ValueError, match="at head_dim=256 the backward takes block_q=64"):
        MosaicBackwardConfig(block_q=128, num_stages=1, dq_num_stages=2).check_fits(256, jnp.bfloat16)
    for head_dim in HEAD_DIMS:
        for dtype in DTYPES:
            for causal in (False, True):
                cfg = default_config(head_dim=head_dim, dtype=dtype, causal=causal, seq_q=4096, seq_k=4096)
                cfg.fwd.check_fits(head_dim, dtype)
                cfg.bwd.check_fits(head_dim, dtype)
                dataclasses.replace(cfg.bwd, deterministic=True).check_fits(head_dim, dtype)


# --- what the backend refuses --------------------------------------------------------------


def test_registered_as_a_kernel_backend():
    assert "mosaic" in backends.names()
    backend = backends.get("mosaic")
    assert isinstance(backend, MosaicBackend) and isinstance(backend, backends.KernelBackend)
    assert hash(backend) == hash(MosaicBackend())


REFUSED = {
    "mask": (dict(mask=np.tril(np.ones((40, 40), bool))[None, None]), "a mask"),
    "bias": (dict(bias=np.zeros((1, 1, 40, 40), np.float32)), "a bias"),
    "alibi": (dict(alibi_slopes=np.full((4,), 0.1, np.float32)), "ALiBi slopes"),
    "soft_cap": (dict(logits_soft_cap=30.0), "a logits soft-cap"),
    "dropout": (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "dropout"),
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


@pytest.mark.parametrize("scale", [-0.125, 0.0])
def test_refuses_a_scale_that_is_not_positive_and_the_default_falls_back(scale, seed):
    """The Mosaic kernels mask logits to -inf before the scale, so a scale <= 0 turned every masked block (causal, a
    ragged tail) into NaN. They refuse it; the default takes the Triton kernels, right against float64."""
    shape = Shape("s", 1, 65, 65, 2, 1, 64)
    q, k, v = _qkv(shape, jnp.bfloat16, seed)
    with pytest.raises(NotImplementedError, match=f"positive scale, got scale={scale}"):
        pf.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="mosaic")
    out = pf.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=("mosaic", "triton"))
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x.astype(jnp.float32), np.float64)) for x in (q, k, v)]
        want = np.asarray(attention_reference(*f64, scale=scale, is_causal=True))
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert rel_err(np.asarray(out, np.float64), want) <= TOLERANCE[jnp.dtype(jnp.bfloat16)]


def test_falls_back_to_triton_for_what_it_refuses(seed):
    shape = Shape("f", 1, 40, 40, 2, 1, 64)
    q, k, v = _qkv(shape, jnp.bfloat16, seed)
    kw = dict(is_causal=True, local_window_size=(8, 0), logits_soft_cap=5.0)  # Mosaic has no soft-cap (a window it has)
    with pytest.raises(NotImplementedError):
        pf.dot_product_attention(q, k, v, implementation="mosaic", **kw)
    ours = pf.dot_product_attention(q, k, v, implementation=("mosaic", "triton"), **kw)
    triton = pf.dot_product_attention(q, k, v, implementation="triton", **kw)
    assert np.array_equal(np.asarray(ours), np.asarray(triton))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="interpret mode's host threads: CPU only")
def test_interpret_mode_refuses_more_warpgroups_than_host_threads(monkeypatch):
    """Mosaic GPU's interpreter runs each warpgroup as a computation that the CPU client may put on its thread
    pool; one more than the pool holds can hang (2 CPUs, 1 CPU device: 3 warpgroups, at times), so the launcher
    refuses it, naming the counts, and the backend's default config on a host without a GPU keeps to two compute
    warpgroups where three would not fit."""
    from pallas_flash.backends.mosaic_gpu import common
    from pallas_flash.spec import AttentionSpec

    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1})
    assert common.interpret_warpgroups() == max(2, len(jax.devices("cpu")))
    q, k, v = _qkv(Shape("w", 1, 4096, 4096, 2, 2, 64), jnp.bfloat16, 0)
    spec = AttentionSpec(scale=0.125, causal=False)
    three = MosaicForwardConfig(block_kv=128, num_stages=2, overlap=True, persistent=True, compute_wgs=3)
    for host, want in ((3, 2), (4, 3)):
        monkeypatch.setattr(common, "interpret_warpgroups", lambda host=host: host)
        assert backends.get("mosaic").default_config(q, k, spec).fwd.compute_wgs == want  # the heuristic's 3 at 4k
        assert common.launch_params(True, "k", 2)["num_threads"] == 3
        assert common.launch_params(False, "k", 3)["num_threads"] == 4  # compiled: no host threads involved
    monkeypatch.setattr(common, "interpret_warpgroups", lambda: 3)
    with pytest.raises(NotImplementedError, match="pallas_flash_mosaic_fwd runs 4 warpgroups.*only 3 at once"):
        pf.dot_product_attention(q[:, :200], k[:, :200], v[:, :200], implementation="mosaic",
                                 config=MosaicConfig(fwd=three), interpret=True)


_ONE_DEVICE_BACKWARD = """
import os, sys
os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:2]))  # a 2-CPU host, as the runner that hung
import jax, jax.numpy as jnp, numpy as np
import pallas_flash as pf
assert jax.device_count() == 1, jax.devices()
rng = np.random.default_rng(0)
q, k, v, ct = (jnp.asarray(rng.standard_normal(s), jnp.float16) for s in ((2, 24, 2, 64), (2, 36, 1, 64),
                                                                         (2, 36, 1, 64), (2, 24, 2, 64)))
seg_q = jnp.asarray(np.sort(rng.integers(0, 3, (2, 24)), axis=1), jnp.int32)
seg_k = jnp.asarray(np.sort(rng.integers(0, 3, (2, 36)), axis=1), jnp.int32)
f = lambda q, k, v: pf.dot_product_attention(q, k, v, q_segment_ids=seg_q, kv_segment_ids=seg_k,
                                             implementation="mosaic")
try:
    out, vjp = jax.vjp(f, q, k, v)
    jax.block_until_ready(vjp(ct))
except NotImplementedError as e:
    print("REFUSED", e)
else:
    print("RAN")
"""


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="interpret mode's host threads: CPU only")
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="pins the subprocess to 2 CPUs")
def test_interpret_mode_on_one_cpu_device_refuses_or_runs_never_hangs():
    """With one CPU device on 2 CPUs (no ``--xla_force_host_platform_device_count``), the backward with segment
    ids hung in the dQ kernel in 4 of 6 runs when 3 warpgroups were judged to fit: the interpreter put all three
    on the CPU client's 2-thread pool. A subprocess with a timeout, so that a hang fails instead of stalling."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    try:
        run = subprocess.run([sys.executable, "-c", _ONE_DEVICE_BACKWARD], env=env, capture_output=True, text=True,
                             timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("Mosaic interpret mode hung with one CPU device on 2 CPUs")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "REFUSED" in run.stdout and "runs 3 warpgroups" in run.stdout, run.stdout
