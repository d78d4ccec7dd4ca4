"""``decode_attention``: the split-K kernel and the jnp path against a float64 reference.

Each case draws a fresh cache (contiguous, or paged with shuffled page ids)
and ragged lengths (0, short, full); the newest ``Tq`` tokens sit at the end of
each sequence. On a CPU the kernel runs in Pallas interpret mode at tiny sizes,
the cases parametrised so that every head dim, dtype, Tq, GQA ratio, cache
kind and feature is covered once (not their product); ``gpu`` tests run the
compiled kernel at larger sizes and the automatic split choice.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_flash.backends.triton import decode as triton_decode
from pallas_flash.combine import combine
from pallas_flash.decode import decode_attention, decode_spec
from tests.conftest import TOLERANCE, rel_err


def reference(q, k, v, lengths, tables=None, *, scale=None, cap=None, left=None):
    """float64 NumPy: query ``t`` at ``length - Tq + t`` sees keys ``[max(0, p - left), p]`` of its own sequence."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Tq, N, H = q.shape
    if tables is not None:
        tables = np.asarray(tables)
        k = k[tables].reshape(B, -1, k.shape[2], H)
        v = v[tables].reshape(B, -1, v.shape[2], H)
    G = N // k.shape[2]
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(Tq):
            p = int(lengths[b]) - Tq + t
            if p < 0:
                continue
            lo = 0 if left is None else max(0, p - left)
            kk = np.repeat(k[b, lo:p + 1], G, axis=1)  # [keys, N, H]
            vv = np.repeat(v[b, lo:p + 1], G, axis=1)
            s = np.einsum("nh,knh->nk", q[b, t], kk) * scale
            if cap is not None:
                s = cap * np.tanh(s / cap)
            w = np.exp(s - s.max(axis=1, keepdims=True))
            w /= w.sum(axis=1, keepdims=True)
            out[b, t] = np.einsum("nk,knh->nh", w, vv)
    return out


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    tq: int
    heads: int
    kv_heads: int
    head_dim: int
    capacity: int  # keys per sequence (a multiple of page_size when paged)
    dtype: object
    page_size: int | None = None
    splits: int | None = None
    cap: float | None = None
    window: int | None = None
    scale: float | None = None  # None: the default 1/sqrt(head_dim)


def draw(case: Case, seed: int, lengths=None):
    """q, the caches (contiguous or paged), block tables (or None) and ragged lengths, in the case's dtype."""
    rng = np.random.default_rng(seed)
    B, S, K, H = case.batch, case.capacity, case.kv_heads, case.head_dim
    if lengths is None:  # an empty sequence, a full one, the rest ragged (at least Tq)
        lengths = rng.integers(case.tq, S + 1, B)
        lengths[0], lengths[-1] = S, (0 if B > 2 else lengths[-1])
    q = rng.standard_normal((B, case.tq, case.heads, H))
    k = rng.standard_normal((B, S, K, H))
    v = rng.standard_normal((B, S, K, H))
    tables = None
    if case.page_size is not None:
        per_seq = S // case.page_size
        spare = 3  # pages no sequence uses
        order = rng.permutation(B * per_seq + spare)
        tables = order[: B * per_seq].reshape(B, per_seq).astype(np.int32)
        k_pool = np.zeros((B * per_seq + spare, case.page_size, K, H))
        v_pool = np.zeros_like(k_pool)
        k_pool[tables.reshape(-1)] = k.reshape(B * per_seq, case.page_size, K, H)
        v_pool[tables.reshape(-1)] = v.reshape(B * per_seq, case.page_size, K, H)
        k, v = k_pool, v_pool
    cast = lambda x: jnp.asarray(x, case.dtype)
    return cast(q), cast(k), cast(v), None if tables is None else jnp.asarray(tables), jnp.asarray(lengths, jnp.int32)


def run(case: Case, q, k, v, tables, lengths, implementation="pallas", **kw):
    return decode_attention(q, k, v, lengths, block_tables=tables, scale=case.scale, logits_soft_cap=case.cap,
                            local_window_size=case.window, implementation=implementation,
                            num_splits=case.splits if implementation == "pallas" else None, **kw)


def ref_of(case: Case, q, k, v, tables, lengths):
    return reference(q, k, v, np.asarray(lengths), tables, scale=case.scale, cap=case.cap, left=case.window)


# Every head dim, dtype, Tq, GQA ratio (4:2, 6:2, MQA, MHA), cache kind, split count and feature (an explicit
# scale included) at least once.
CASES = {
    "contig_tq1_gqa42_d64_f32": Case(4, 1, 4, 2, 64, 70, jnp.float32, splits=3),
    "contig_tq2_gqa62_d80_bf16_scale": Case(3, 2, 6, 2, 80, 50, jnp.bfloat16, scale=0.3),
    "contig_tq4_mqa_d128_fp16_softcap": Case(2, 4, 4, 1, 128, 40, jnp.float16, splits=2, cap=2.0),
    "contig_tq2_mha_d64_f32_window": Case(3, 2, 2, 2, 64, 45, jnp.float32, splits=3, window=7),
    "paged16_tq1_gqa42_d256_bf16": Case(3, 1, 4, 2, 256, 64, jnp.bfloat16, page_size=16, splits=4),
    "paged32_tq4_gqa62_d64_f32_window": Case(3, 4, 6, 2, 64, 64, jnp.float32, page_size=32, splits=2, window=9),
    "paged16_tq2_mqa_d80_fp16_one_split": Case(3, 2, 4, 1, 80, 48, jnp.float16, page_size=16, splits=1),
    "paged16_tq1_gqa42_d128_f32_softcap_scale": Case(3, 1, 4, 2, 128, 48, jnp.float32, page_size=16, cap=3.0,
                                                     scale=0.05),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_float64_reference(name, seed):
    case = CASES[name]
    q, k, v, tables, lengths = draw(case, seed)
    ref = ref_of(case, q, k, v, tables, lengths)
    tol = TOLERANCE[jnp.dtype(case.dtype)]
    out = run(case, q, k, v, tables, lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < tol, (name, rel_err(out, ref))
    empty = np.asarray(lengths) == 0
    assert np.all(np.asarray(out, np.float32)[empty] == 0.0)  # an empty sequence gives zeros
    xla = run(case, q, k, v, tables, lengths, implementation="xla")
    assert rel_err(xla, ref) < tol, (name, rel_err(xla, ref))


def test_paged_equals_contiguous(seed):
    case = Case(3, 2, 4, 2, 64, 64, jnp.float32, splits=2)
    q, k, v, _, lengths = draw(case, seed)
    paged = dataclasses.replace(case, page_size=16)
    _, kp, vp, tables, _ = draw(paged, seed)  # the same draw, laid out in shuffled pages
    contiguous = run(case, q, k, v, None, lengths)
    np.testing.assert_allclose(run(paged, q, kp, vp, tables, lengths), contiguous, rtol=1e-6, atol=1e-6)


def test_split_counts_and_merges_agree(seed):
    """One split (the output written directly), several, more than there are blocks; the XLA merge."""
    case = Case(2, 2, 4, 2, 64, 60, jnp.float32)
    q, k, v, tables, lengths = draw(case, seed)
    ref = ref_of(case, q, k, v, tables, lengths)
    spec = decode_spec(q, k, v, lengths, None, scale=None, logits_soft_cap=None, local_window_size=None)
    for splits, merge in ((1, "pallas"), (3, "pallas"), (3, "xla"), (9, "pallas")):
        out = triton_decode.decode(spec, q, k, v, lengths, None, num_splits=splits, interpret=True, merge=merge)
        assert rel_err(out, ref) <= TOLERANCE[jnp.dtype(jnp.float32)], (splits, merge)


def test_merge_is_combine(seed):
    """The merge kernel computes ``combine``'s result on random partials, -inf (empty) parts included."""
    rng = np.random.default_rng(seed)
    B, K, S, rows, H = 2, 2, 5, 3, 80
    o = jnp.asarray(rng.standard_normal((B, K, S, rows, H)), jnp.float32)
    lse2 = rng.standard_normal((B, K, S, rows)) * 4
    lse2[0, 1, 2] = -np.inf
    lse2[1, 0, :, 1] = -np.inf  # a row no split saw
    o = o.at[1, 0, :, 1].set(0.0)
    lse2 = jnp.asarray(lse2, jnp.float32)
    merged = triton_decode.merge_partials(None, o, lse2, jnp.float32, config=triton_decode.DecodeConfig(),
                                          interpret=True)
    # combine takes [B', Tq', N', H] parts and natural-log lse [B', N', Tq']: rows as Tq', KV heads as N'.
    outs = [o[:, :, s].transpose(0, 2, 1, 3) for s in range(S)]
    lses = [lse2[:, :, s] * np.log(2.0) for s in range(S)]
    expected = combine(outs, lses)[0].transpose(0, 2, 1, 3)
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(merged)[1, 0, 1] == 0.0)
    np.testing.assert_allclose(triton_decode.merge_xla(o, lse2, jnp.float32), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_nan_within_length_propagates_and_garbage_past_it_does_not(implementation, paged, seed):
    case = Case(3, 1, 4, 2, 64, 48, jnp.float32, page_size=16 if paged else None, splits=2)
    lengths = np.array([48, 20, 33])
    q, k, v, tables, lengths = draw(case, seed, lengths=lengths)

    def poke(x, b, pos, value):  # write ``value`` at key ``pos`` of sequence ``b``
        if tables is None:
            return x.at[b, pos].set(value)
        return x.at[tables[b, pos // 16], pos % 16].set(value)

    # Past the lengths: NaN and inf in K and V must not reach any row.
    kg, vg = k, v
    for b, pos in ((1, 20), (1, 47), (2, 40)):
        kg, vg = poke(kg, b, pos, jnp.nan), poke(vg, b, pos, jnp.inf)
    out = run(case, q, kg, vg, tables, lengths, implementation)
    assert rel_err(out, ref_of(case, q, k, v, tables, lengths)) <= TOLERANCE[jnp.dtype(jnp.float32)]
    # Within sequence 1's length: its rows turn NaN, the other sequences' do not.
    out = np.asarray(run(case, q, k, poke(v, 1, 7, jnp.nan), tables, lengths, implementation))
    assert np.isnan(out[1]).all()
    assert np.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("splits, page_size", [(1, None), (3, 16)], ids=["one_split", "paged_three_splits"])
def test_under_enable_x64(splits, page_size, seed):
    """With jax_enable_x64 the kernel's indices stay int32 (``pl.num_programs`` is int64 there)."""
    case = Case(2, 2, 4, 2, 16, 48, jnp.float32, page_size=page_size, splits=splits, window=20)
    q, k, v, tables, lengths = draw(case, seed, lengths=np.array([48, 29]))
    with jax.enable_x64(True):
        out = run(case, q, k, v, tables, lengths)
    assert out.dtype == jnp.float32
    assert rel_err(out, ref_of(case, q, k, v, tables, lengths)) < TOLERANCE[jnp.dtype(jnp.float32)]


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16"])
def test_narrow_integer_lengths(implementation, dtype):
    """Lengths of a dtype narrower than the capacity: the clip's bound must not wrap (300 as uint8 is 44)."""
    q = jnp.zeros((1, 1, 1, 16))  # every logit 0: the output is the mean of the visible values
    k = jnp.ones((1, 300, 1, 16))
    v = jnp.broadcast_to(jnp.arange(300.0)[None, :, None, None], (1, 300, 1, 16))
    out = decode_attention(q, k, v, jnp.asarray([100], dtype), implementation=implementation)
    np.testing.assert_allclose(np.asarray(out), 49.5, rtol=1e-5)  # mean of 0..99


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
def test_traced_out_of_range_values(implementation, seed):
    """Under jit nothing raises: lengths clip to the capacity, rows before position 0 give zeros, bad pages are not seen."""
    case = Case(3, 2, 4, 2, 64, 48, jnp.float32, page_size=16, splits=2)
    q, k, v, tables, _ = draw(case, seed)
    # A last page of NaN, which no table names: a page id past the pool is clamped onto it before it is masked,
    # and its V times p = 0 must not reach a row (0 * NaN).
    k, v = (jnp.concatenate([x, jnp.full_like(x[:1], jnp.nan)]) for x in (k, v))
    f = jax.jit(lambda q, k, v, t, n: run(case, q, k, v, t, n, implementation))
    bad_tables = tables.at[2, 1].set(10_000)  # sequence 2's keys 16..31 lie on a page that does not exist
    out = np.asarray(f(q, k, v, bad_tables, jnp.asarray([60, 1, 40], jnp.int32)))
    ref = ref_of(case, q, k, v, tables, np.array([48, 1, 40]))
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-4, atol=1e-5)  # 60 clipped to the capacity 48
    assert np.all(out[1, 0] == 0.0)  # position -1 sees no key
    np.testing.assert_allclose(out[1, 1], ref[1, 1], rtol=1e-4, atol=1e-5)
    # Sequence 2 without keys 16..31: the reference over the keys that remain, in float64.
    keep = np.r_[0:16, 32:48]
    kk = np.asarray(k)[np.asarray(tables[2])].reshape(1, 48, 2, 64)[:, keep]
    vv = np.asarray(v)[np.asarray(tables[2])].reshape(1, 48, 2, 64)[:, keep]
    expected = reference(np.asarray(q[2:]), kk, vv, np.array([40 - 16]))
    np.testing.assert_allclose(out[2], expected[0], rtol=1e-4, atol=1e-5)


def _args(B=2, Tq=1, N=4, K=2, H=64, S=32, dtype=jnp.float32):
    return (jnp.zeros((B, Tq, N, H), dtype), jnp.zeros((B, S, K, H), dtype), jnp.zeros((B, S, K, H), dtype),
            jnp.full((B,), S, jnp.int32))


@pytest.mark.parametrize("change, error, match", [
    (lambda a: (a[0][0],) + a[1:], ValueError, "q must have rank 4"),
    (lambda a: (a[0].astype(jnp.bfloat16),) + a[1:], TypeError, "share one dtype"),
    (lambda a: (a[0].astype(jnp.int32),) + a[1:], TypeError, "q must have a floating dtype"),
    (lambda a: (a[0], a[1], a[2][:, :16]) + a[3:], ValueError, "same shape"),
    (lambda a: (a[0][..., :32],) + a[1:], ValueError, "same head_dim"),
    (lambda a: tuple(x[..., :0] for x in a[:3]) + a[3:], ValueError, r"head_dim must be at least 1, got q \(2, 1, 4"),
    (lambda a: (a[0][:, :, :3],) + a[1:], ValueError, r"multiple of the cache's KV heads"),
    (lambda a: (a[0][:1],) + a[1:], ValueError, "q's batch size"),
    (lambda a: (jnp.zeros((2, 33, 4, 64)),) + a[1:], ValueError, "more than the cache holds"),
    (lambda a: (jnp.zeros((2, 0, 4, 64)),) + a[1:], ValueError, "Tq >= 1"),
    (lambda a: a[:3] + (a[3][:1],), ValueError, "kv_lengths must have shape"),
    (lambda a: a[:3] + (a[3].astype(jnp.float32),), TypeError, "kv_lengths must be an integer"),
    (lambda a: a[:3] + (jnp.asarray([33, 4]),), ValueError, r"kv_lengths\[0\] = 33 is outside"),
    (lambda a: a[:3] + (jnp.asarray([4, -1]),), ValueError, r"kv_lengths\[1\] = -1 is outside"),
    (lambda a: (jnp.zeros((2, 3, 4, 64)),) + a[1:3] + (jnp.asarray([2, 0]),), ValueError, "below the 3 new tokens"),
])
def test_bad_input_raises(change, error, match):
    with pytest.raises(error, match=match):
        decode_attention(*change(_args()))


def test_bad_options_and_paging_raise():
    q, k, v, n = _args()
    pool = jnp.zeros((6, 16, 2, 64))
    tables = jnp.asarray([[0, 1], [2, 3]], jnp.int32)
    with pytest.raises(ValueError, match="implementation"):
        decode_attention(q, k, v, n, implementation="cudnn")
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, k, v, n, num_splits=0)
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="num_splits must be None or a positive int"):
            decode_attention(q, k, v, n, num_splits=bad)
    # Any integer, a NumPy one too.
    np.testing.assert_array_equal(decode_attention(q, k, v, n, num_splits=np.int64(2)),
                                  decode_attention(q, k, v, n, num_splits=2))
    with pytest.raises(ValueError, match="logits_soft_cap"):
        decode_attention(q, k, v, n, logits_soft_cap=-1.0)
    with pytest.raises(TypeError, match="local_window_size"):
        decode_attention(q, k, v, n, local_window_size="wide")
    with pytest.raises(TypeError, match="block_tables must be an integer"):
        decode_attention(q, pool, pool, n, block_tables=tables.astype(jnp.float32))
    with pytest.raises(ValueError, match="block_tables must have shape"):
        decode_attention(q, pool, pool, n, block_tables=tables[0])
    empty_pool = jnp.zeros((0, 16, 2, 64))
    for implementation in ("pallas", "xla"):
        with pytest.raises(ValueError, match=r"at least one page, got k_cache \(0, 16, 2, 64\)"):
            decode_attention(q, empty_pool, empty_pool, jnp.asarray([0, 0]), block_tables=tables,
                             implementation=implementation)
    with pytest.raises(ValueError, match=r"block_tables\[1, 1\] = 6 is not a page"):
        decode_attention(q, pool, pool, n, block_tables=tables.at[1, 1].set(6))
    # A bad id past the sequence's length is never read: fine.
    decode_attention(q, pool, pool, jnp.asarray([32, 16]), block_tables=tables.at[1, 1].set(-1), implementation="xla")
    with pytest.raises(NotImplementedError, match="page_size"):
        small = jnp.zeros((12, 8, 2, 64))
        decode_attention(q, small, small, n, block_tables=jnp.arange(8, dtype=jnp.int32).reshape(2, 4))
    with jax.enable_x64(True), pytest.raises(NotImplementedError, match="bfloat16, float16 or float32"):
        decode_attention(*_args(dtype=jnp.float64))
    with pytest.raises(NotImplementedError, match="head_dim"):
        decode_attention(*_args(H=512))


def test_split_choice_fills_the_gpu():
    def splits(B, K, S):
        spec = decode_spec(*_args(B=B, K=K, N=4 * K, S=S, H=16), None, scale=None, logits_soft_cap=None,
                           local_window_size=None)
        return triton_decode.choose_splits(spec, 64, triton_decode.DecodeConfig(), sm_count=132)

    assert 2 * 132 <= splits(1, 8, 131072) * 8 and splits(1, 8, 131072) <= 64  # one sequence over the whole GPU
    assert splits(32, 8, 1024) * 256 >= 256 and splits(32, 8, 1024) <= 4  # a full batch needs few
    assert splits(1, 8, 64) == 1  # never more splits than blocks
    assert splits(1, 8, 131072) >= splits(8, 8, 131072) >= splits(32, 8, 131072)


# --- GPU: the compiled kernel at larger sizes ------------------------------------------------------

GPU_CASES = {
    "contig_tq1_32x8_d128_bf16": Case(4, 1, 32, 8, 128, 3000, jnp.bfloat16),
    "paged64_tq1_32x8_d128_bf16": Case(4, 1, 32, 8, 128, 3072, jnp.bfloat16, page_size=64),
    "paged128_tq3_32x8_d128_fp16": Case(3, 3, 32, 8, 128, 2048, jnp.float16, page_size=128),
    "contig_tq4_mqa_d80_f32_window": Case(3, 4, 8, 1, 80, 1500, jnp.float32, window=300),
    "contig_tq2_gqa62_d256_bf16_softcap": Case(2, 2, 6, 2, 256, 2100, jnp.bfloat16, cap=30.0),
    "paged16_tq1_mha_d64_fp16": Case(5, 1, 8, 8, 64, 1024, jnp.float16, page_size=16),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_CASES)
def test_gpu_matches_float64_reference(name, seed):
    case = GPU_CASES[name]
    q, k, v, tables, lengths = draw(case, seed)
    ref = ref_of(case, q, k, v, tables, lengths)
    out = jax.jit(lambda *a: run(case, *a))(q, k, v, tables, lengths)
    assert rel_err(out, ref) < TOLERANCE[jnp.dtype(case.dtype)], rel_err(out, ref)


@pytest.mark.gpu
def test_gpu_long_ragged_auto_splits(seed):
    """One long and one short sequence, the automatic split count (many splits, most empty for the short one)."""
    case = Case(2, 1, 16, 4, 128, 40_000, jnp.bfloat16)
    q, k, v, tables, lengths = draw(case, seed, lengths=np.array([39_999, 70]))
    ref = ref_of(case, q, k, v, tables, lengths)
    assert rel_err(jax.jit(lambda *a: run(case, *a))(q, k, v, tables, lengths), ref) < TOLERANCE[jnp.dtype(jnp.bfloat16)]


# --- the Triton lowering, verified on a CPU (interpret mode never builds it) ------------------------

try:
    from jax._src.pallas.triton import lowering as _lowering
    from jax._src.pallas.triton import pallas_call_registration as _registration

    _HOOKS = hasattr(_registration, "gpu_info_lib") and hasattr(_lowering, "lower_jaxpr_to_triton_module")
except ImportError:  # pragma: no cover - another JAX release
    _HOOKS = False


@pytest.mark.skipif(not _HOOKS, reason="this JAX release moved the Pallas Triton lowering hooks")
@pytest.mark.parametrize("name", ["contig_tq1_gqa42_d64_f32", "contig_tq4_mqa_d128_fp16_softcap",
                                  "paged32_tq4_gqa62_d64_f32_window", "paged16_tq2_mqa_d80_fp16_one_split",
                                  "paged16_tq1_gqa42_d256_bf16"])
def test_kernels_lower_to_valid_triton(name, monkeypatch):
    """The split and merge kernels lower for sm_90 and pass the MLIR verifier (as test_triton_ir does for training)."""
    import types

    modules = []
    original = _lowering.lower_jaxpr_to_triton_module
    monkeypatch.setattr(_registration.gpu_info_lib, "get_gpu_info", lambda: types.SimpleNamespace(compute_capability="9.0"))
    monkeypatch.setattr(_registration.lowering, "lower_jaxpr_to_triton_module",
                        lambda *a, **k: modules.append(original(*a, **k)) or modules[-1])
    case = CASES[name]
    q, k, v, tables, lengths = draw(case, 0)
    fn = lambda *a: run(case, *a, interpret=False)
    jax.jit(fn).trace(q, k, v, tables, lengths).lower(lowering_platforms=("cuda",))
    assert len(modules) == (1 if case.splits == 1 else 2)
    for m in modules:
        m.module.operation.verify()
