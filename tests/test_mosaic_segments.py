"""The Mosaic GPU kernels with segment ids (``q_segment_ids``/``kv_segment_ids``), in interpret mode on a CPU.

A query row sees the keys of its own segment. The launcher gives each 64-row
query tile the range of key blocks whose ids overlap its own
(``segment_block_ranges``: exact for sorted ids, as packed documents have; a
superset otherwise), the memory warpgroup loads each key block's ids with its
K, and every streamed block is masked by id but a run of blocks whose keys
all have the tile's one id (forward and dQ kernel). Cases: packed documents not
aligned to blocks, unsorted ids, rows whose id no key has (O = 0, lse =
-inf), causal and not, Tq != Tk, GQA, both schedules, persistent or not;
output and log-sum-exp against float64. The D<=128 backward likewise: the
dK/dV kernel streams the query blocks whose ids overlap its keys' (their ids
with Q), the dQ kernel the key blocks as the forward; gradients under a
random cotangent, both dQ modes; and the D=256 role split's two kernels
(``backward_wide.py``), deterministic. The last test goes
through ``pallas_flash.dot_product_attention`` and its ``custom_vjp`` with
segment ids, a local window and per-batch lengths together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash as pf
from pallas_flash.backends.mosaic_gpu import MosaicBackwardConfig, MosaicForwardConfig
from pallas_flash.backends.mosaic_gpu.backward import mosaic_backward
from pallas_flash.backends.mosaic_gpu.common import segment_block_ranges
from pallas_flash.backends.mosaic_gpu.forward import mosaic_forward
from pallas_flash.reference import attention_reference
from pallas_flash.spec import AttentionInputs, AttentionSpec
from pallas_flash.testing.shapes import Shape
from tests.cases import random_qkv, reference_vjp_f64
from tests.conftest import ON_GPU, TOLERANCE, rel_err


def _packed(n: int, lengths) -> np.ndarray:
    """Sorted ids of documents of these lengths (the last one runs to ``n``)."""
    ids = np.repeat(np.arange(len(lengths)), lengths)[:n]
    return np.concatenate([ids, np.full(n - ids.size, len(lengths))]).astype(np.int32)


def _ids(kind: str, batch: int, seq_q: int, seq_k: int, seed: int):
    rng = np.random.default_rng(seed)
    if kind == "packed":  # the same documents on both sides (Tq == Tk)
        ids = np.stack([_packed(seq_q, rng.integers(20, 150, 8)) for _ in range(batch)])
        return ids, ids
    if kind == "unsorted":  # random ids from a few values; some query ids no key has
        return rng.integers(0, 4, (batch, seq_q)).astype(np.int32), rng.integers(1, 4, (batch, seq_k)).astype(np.int32)
    raise ValueError(kind)


CASES = {
    "packed_causal_gqa2": (Shape("s", 2, 300, 300, 4, 2, 64), True, "packed"),
    "packed_full_d128": (Shape("s", 1, 333, 333, 2, 1, 128), False, "packed"),
    "unsorted_tq<tk": (Shape("s", 2, 200, 333, 2, 1, 64), False, "unsorted"),
}


@pytest.mark.skipif(ON_GPU, reason="interpret mode")
@pytest.mark.parametrize("persistent", [False, True], ids=["cta_per_tile", "persistent"])
@pytest.mark.parametrize("overlap, compute_wgs", [(False, 2), (True, 2), (True, 3)],
                         ids=["turns", "overlap", "overlap_wgs3"])
@pytest.mark.parametrize("name", CASES)
def test_interpret_segments_forward(name, overlap, compute_wgs, persistent, seed):
    shape, causal, kind = CASES[name]
    q_seg, kv_seg = _ids(kind, shape.batch, shape.seq_q, shape.seq_k, seed)
    fwd = MosaicForwardConfig(block_kv=64, num_stages=2, overlap=overlap, persistent=persistent,
                              compute_wgs=compute_wgs)
    _check_forward(shape, causal, q_seg, kv_seg, fwd, seed)


@pytest.mark.parametrize("persistent", [False, True], ids=["cta_per_tile", "persistent"])
def test_segments_three_warpgroups_see_the_middle_tiles_blocks(persistent, seed):
    """A three-warpgroup CTA streams the key blocks of all three of its query tiles: here only the middle tile's
    id (5) is in the second key block, which the first and last tiles (id 0) never see. Reading the outer two
    tiles' ranges alone gave the middle rows O = 0 and lse = -inf. Interpret mode on the CPU, compiled on a GPU."""
    shape = Shape("s", 1, 192, 128, 3, 1, 64)
    q_seg = np.repeat([0, 5, 0], 64)[None].astype(np.int32)
    kv_seg = np.repeat([0, 5], 64)[None].astype(np.int32)
    fwd = MosaicForwardConfig(block_kv=64, num_stages=2, overlap=True, persistent=persistent, compute_wgs=3)
    _check_forward(shape, False, q_seg, kv_seg, fwd, seed)


def _check_forward(shape, causal, q_seg, kv_seg, fwd, seed):
    """The forward (interpret mode on the CPU, compiled on a GPU) against float64: values and lse, -inf where a row
    sees no key."""
    q, k, v, _ = random_qkv(shape, jnp.bfloat16, seed)
    q_seg, kv_seg = jnp.asarray(q_seg), jnp.asarray(kv_seg)
    spec = AttentionSpec(scale=1.0 / np.sqrt(shape.head_dim), causal=causal, has_segments=True)
    out, lse2 = mosaic_forward(q, k, v, AttentionInputs(q_segment_ids=q_seg, kv_segment_ids=kv_seg), spec=spec,
                               config=fwd, interpret=not ON_GPU)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x.astype(jnp.float32), np.float64)) for x in (q, k, v)]
        ref_out, ref_lse = attention_reference(*f64, is_causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                               return_lse=True)
        ref_out, ref_lse = np.asarray(ref_out), np.asarray(ref_lse)
    lse = np.asarray(lse2, np.float64) * np.log(2.0)
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)), "lse: -inf rows differ"
    seen = np.isfinite(ref_lse)
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), "out: not finite"
    tol = TOLERANCE[jnp.dtype(jnp.bfloat16)]
    assert rel_err(out, ref_out) <= tol, f"out: {rel_err(out, ref_out):.3e}"
    assert rel_err(lse[seen], ref_lse[seen]) <= tol, f"lse: {rel_err(lse[seen], ref_lse[seen]):.3e}"


def test_segment_block_ranges():
    """Sorted ids: exactly the blocks holding a tile's ids; a tile whose ids no key has: the empty range."""
    q_seg = jnp.asarray([[0] * 64 + [1] * 64 + [5] * 64], jnp.int32)  # tiles: id 0, id 1, id 5 (no key has 5)
    kv_seg = jnp.asarray([[0] * 100 + [1] * 50 + [2] * 106], jnp.int32)
    got = np.asarray(segment_block_ranges(q_seg, kv_seg, 64, 64, 3))
    # Blocks: [0-63] id 0; [64-127] ids 0,1; [128-191] ids 1,2; [192-255] id 2. Then the run of blocks of the
    # tile's one id: block 0 for tile 0, none (empty, at first) for the others.
    np.testing.assert_array_equal(got[0], [[0, 2, 0, 1], [1, 3, 1, 1], [4, 0, 4, 4]])
    # One id in blocks 0, 1, 3 and 4 but not 2: not one run, so none; a tile of two ids: none.
    kv_seg = jnp.asarray([[7] * 128 + [7] * 10 + [8] * 54 + [7] * 128], jnp.int32)
    q_seg = jnp.asarray([[7] * 64 + [7] * 32 + [8] * 32], jnp.int32)
    got = np.asarray(segment_block_ranges(q_seg, kv_seg, 64, 64, 2))
    np.testing.assert_array_equal(got[0], [[0, 5, 0, 0], [0, 5, 0, 0]])
    kv_seg = jnp.asarray([[7] * 200 + [8] * 56], jnp.int32)  # blocks 0-2 all id 7: one run
    np.testing.assert_array_equal(np.asarray(segment_block_ranges(q_seg, kv_seg, 64, 64, 2))[0],
                                  [[0, 4, 0, 3], [0, 4, 0, 0]])


@pytest.mark.parametrize(
    "head_dim, config",
    [
        (64, MosaicForwardConfig(block_kv=128, num_stages=2, overlap=False, persistent=True)),
        (128, MosaicForwardConfig(block_kv=128, num_stages=2, overlap=True, persistent=True)),
        (256, MosaicForwardConfig(block_kv=64, num_stages=2, overlap=True, persistent=False)),
    ],
    ids=["d64_turns_persistent", "d128_overlap_persistent", "d256_overlap"],
)
def test_segments_forward_lowers_for_cuda(head_dim, config):
    import re

    q = jnp.zeros((2, 300, 4, head_dim), jnp.bfloat16)
    k = jnp.zeros((2, 333, 2, head_dim), jnp.bfloat16)
    ids = AttentionInputs(q_segment_ids=jnp.zeros((2, 300), jnp.int32), kv_segment_ids=jnp.zeros((2, 333), jnp.int32))
    spec = AttentionSpec(scale=0.1, causal=True, has_segments=True)
    fn = jax.jit(lambda q, k, v, ids: mosaic_forward(q, k, v, ids, spec=spec, config=config))
    text = fn.trace(q, k, k, ids).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"stablehlo.custom_call @(mosaic_gpu\w*)", text)) == 1


BWD_CASES = {
    "packed_causal_gqa2_det": (Shape("s", 2, 300, 300, 4, 2, 64), True, "packed",
                               MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2)),
    "packed_causal_fused": (Shape("s", 1, 300, 300, 2, 1, 64), True, "packed",
                            MosaicBackwardConfig(num_stages=2, deterministic=False)),
    "packed_full_d128_rows128": (Shape("s", 1, 333, 333, 2, 1, 128), False, "packed",
                                 MosaicBackwardConfig(block_q=128, num_stages=2, dq_block_kv=128, dq_num_stages=2)),
    "unsorted_tq<tk_det": (Shape("s", 2, 200, 333, 2, 1, 64), False, "unsorted",
                           MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2)),
    # D=256: backward_wide.py's role split (64-row tiles on both sides)
    "packed_causal_d256_gqa2": (Shape("s", 1, 300, 300, 4, 2, 256), True, "packed",
                                MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2)),
    "unsorted_tq<tk_d256": (Shape("s", 1, 200, 333, 2, 1, 256), False, "unsorted",
                            MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2)),
}


@pytest.mark.skipif(ON_GPU, reason="interpret mode")
@pytest.mark.parametrize("name", BWD_CASES)
def test_interpret_segments_backward(name, seed):
    shape, causal, kind, bwd = BWD_CASES[name]
    q, k, v, ct = random_qkv(shape, jnp.bfloat16, seed)
    q_seg, kv_seg = (jnp.asarray(x) for x in _ids(kind, shape.batch, shape.seq_q, shape.seq_k, seed))
    spec = AttentionSpec(scale=1.0 / np.sqrt(shape.head_dim), causal=causal, has_segments=True)
    inputs = AttentionInputs(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    out, lse2 = mosaic_forward(q, k, v, inputs, spec=spec, config=MosaicForwardConfig(block_kv=64, num_stages=2),
                               interpret=True)
    ct_lse = np.random.default_rng(seed + 7).standard_normal(lse2.shape)
    dlse = jnp.where(jnp.isneginf(lse2), 0.0, jnp.asarray(ct_lse, jnp.float32))  # the op's convention
    g = mosaic_backward(q, k, v, out, lse2, ct, dlse, spec=spec, config=bwd, inputs=inputs, interpret=True)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x.astype(jnp.float32), np.float64)) for x in (q, k, v, ct)]

        def f(q, k, v):
            return attention_reference(q, k, v, is_causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                       return_lse=True)

        (_, ref_lse), vjp = jax.vjp(f, *f64[:3])
        want = vjp((f64[3], jnp.where(jnp.isfinite(ref_lse), jnp.asarray(ct_lse, jnp.float64), 0.0)))
    tol = TOLERANCE[jnp.dtype(jnp.bfloat16)]
    for label, got, ref in zip(("dq", "dk", "dv"), (g.dq, g.dk, g.dv), want):
        got, ref = np.asarray(got, np.float64), np.asarray(ref)
        assert got.shape == ref.shape and np.isfinite(got).all(), label
        assert rel_err(got, ref) <= tol, f"{label}: relative error {rel_err(got, ref):.3e}"


@pytest.mark.parametrize(
    "head_dim, config",
    [(64, MosaicBackwardConfig(block_q=128, num_stages=3, dq_block_kv=128, dq_num_stages=2)),
     (64, MosaicBackwardConfig(num_stages=2, deterministic=False)),
     (256, MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2))],
    ids=["d64_deterministic_rows128", "d64_fused", "d256"],
)
def test_segments_backward_lowers_for_cuda(head_dim, config):
    import re

    q = jnp.zeros((2, 300, 4, head_dim), jnp.bfloat16)
    k = jnp.zeros((2, 333, 2, head_dim), jnp.bfloat16)
    lse2 = jnp.zeros((2, 4, 300), jnp.float32)
    ids = AttentionInputs(q_segment_ids=jnp.zeros((2, 300), jnp.int32), kv_segment_ids=jnp.zeros((2, 333), jnp.int32))
    spec = AttentionSpec(scale=0.1, causal=True, has_segments=True)

    def backward(q, k, v, out, lse2, do, ids):
        return mosaic_backward(q, k, v, out, lse2, do, None, spec=spec, config=config, inputs=ids)[:3]

    text = jax.jit(backward).trace(q, k, k, q, lse2, q, ids).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"stablehlo.custom_call @(mosaic_gpu\w*)", text)) == (2 if config.deterministic else 1)


GPU_CASES = {
    "packed_causal_d64_gqa4": (Shape("s", 2, 4096, 4096, 8, 2, 64), True, "packed"),
    "packed_full_d128": (Shape("s", 2, 2000, 2000, 4, 4, 128), False, "packed"),
    "unsorted_tq<tk_d128": (Shape("s", 2, 1500, 1777, 4, 2, 128), False, "unsorted"),
    "packed_causal_d256_gqa2": (Shape("s", 2, 2000, 2000, 4, 2, 256), True, "packed"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["deterministic", "fused"])
@pytest.mark.parametrize("overlap", [False, True], ids=["turns", "overlap"])
@pytest.mark.parametrize("name", GPU_CASES)
def test_gpu_segments(name, overlap, fused, seed):
    """The compiled kernels: output and gradients against float64 (documents of 20-150 rows: many per block)."""
    shape, causal, kind = GPU_CASES[name]
    wide = shape.head_dim == 256
    if wide and fused:
        pytest.skip("head_dim 256: the backward is deterministic in either mode")
    q, k, v, ct = random_qkv(shape, jnp.bfloat16, seed)
    q_seg, kv_seg = (jnp.asarray(x) for x in _ids(kind, shape.batch, shape.seq_q, shape.seq_k, seed))
    spec = AttentionSpec(scale=1.0 / np.sqrt(shape.head_dim), causal=causal, has_segments=True)
    inputs = AttentionInputs(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    fwd = MosaicForwardConfig(block_kv=64 if wide else 128, num_stages=2, overlap=overlap, persistent=not wide)
    bwd = MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2, deterministic=not fused)

    @jax.jit
    def run(q, k, v, ct):
        out, lse2 = mosaic_forward(q, k, v, inputs, spec=spec, config=fwd)
        g = mosaic_backward(q, k, v, out, lse2, ct, None, spec=spec, config=bwd, inputs=inputs)
        return out, g.dq, g.dk, g.dv

    got = run(q, k, v, ct)
    want = reference_vjp_f64(q, k, v, ct, is_causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    tol = TOLERANCE[jnp.dtype(jnp.bfloat16)]
    for label, g, ref in zip(("out", "dq", "dk", "dv"), got, want):
        g, ref = np.asarray(g, np.float64), np.asarray(ref)
        assert np.isfinite(g).all() and rel_err(g, ref) <= tol, f"{label}: relative error {rel_err(g, ref):.3e}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_public_api_segments_window_and_lengths(causal, seed):
    """``dot_product_attention(..., implementation="mosaic")`` with packed documents, a local window and per-batch
    lengths at once, default configs: the output and the gradients through the ``custom_vjp`` under a random
    cotangent, against float64 (interpret mode on a CPU, compiled on a GPU)."""
    shape = Shape("p", 2, 1500, 1500, 4, 2, 128) if ON_GPU else Shape("p", 2, 200, 200, 2, 1, 64)
    q, k, v, ct = random_qkv(shape, jnp.bfloat16, seed)
    ids, _ = (jnp.asarray(x) for x in _ids("packed", shape.batch, shape.seq_q, shape.seq_k, seed))
    window = (shape.seq_q // 5, 0 if causal else shape.seq_q // 7)
    lengths = jnp.asarray([shape.seq_q, shape.seq_q * 2 // 3 + 1], jnp.int32)
    kwargs = dict(is_causal=causal, local_window_size=window, q_segment_ids=ids, kv_segment_ids=ids,
                  query_seq_lengths=lengths, key_value_seq_lengths=lengths)

    out, vjp = jax.vjp(lambda q, k, v: pf.dot_product_attention(q, k, v, implementation="mosaic", **kwargs), q, k, v)
    got = (out, *vjp(ct))
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x.astype(jnp.float32), np.float64)) for x in (q, k, v, ct)]
        ref_out, ref_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **kwargs), *f64[:3])
        want = [np.asarray(x) for x in (ref_out, *ref_vjp(f64[3]))]
    tol = TOLERANCE[jnp.dtype(jnp.bfloat16)]
    for label, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        g = np.asarray(g, np.float64)
        assert g.shape == r.shape and np.isfinite(g).all(), label
        assert rel_err(g, r) <= tol, f"{label}: relative error {rel_err(g, r):.3e} ({shape}, causal={causal})"


def test_reference_by_batch_row_and_kv_head_matches_the_whole_reference(seed):
    """``reference_vjp_f64`` (the GPU test's reference, one batch row and KV head at a time) equals the reference
    on the whole arrays: GQA 3, segment ids and lengths sliced with their batch rows."""
    shape = Shape("r", 2, 37, 45, 6, 2, 16)
    q, k, v, ct = random_qkv(shape, jnp.float32, seed)
    q_seg, kv_seg = (jnp.asarray(x) for x in _ids("unsorted", 2, 37, 45, seed))
    kwargs = dict(is_causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                  key_value_seq_lengths=jnp.asarray([45, 30], jnp.int32))
    got = reference_vjp_f64(q, k, v, ct, **kwargs)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, ct)]
        out, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **kwargs), *f64[:3])
        want = (out, *vjp(f64[3]))
    for label, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-12, atol=1e-12, err_msg=label)


def test_reference_by_batch_row_and_kv_head_refuses_arrays_with_a_head_axis():
    q, k, v, ct = random_qkv(Shape("r", 1, 8, 8, 2, 1, 16), jnp.float32, 0)
    with pytest.raises(TypeError, match="bias"):
        reference_vjp_f64(q, k, v, ct, bias=jnp.zeros((1, 2, 8, 8)))
