"""Attention features as test cases: ``Case`` says which a call uses, ``build`` draws the arrays, ``check`` compares.

Shared by the kernel tests (``test_features``, ``test_dropout``, ``test_combine``)
and the Triton lowering check (``test_triton_ir``). On a CPU the kernels run in
Pallas interpret mode with forced 16-row blocks (``SMALL_BLOCKS``), so every
case crosses several query and key blocks (skipped, masked and unmasked ones);
on a GPU the same cases run at longer sequences with the shipped block configs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import pallas_flash as pf
from pallas_flash import dropout as pf_dropout
from pallas_flash.reference import attention_reference
from pallas_flash.testing.shapes import Shape
from tests.conftest import ON_GPU, TOLERANCE, rel_err

# On a CPU the cases are small, so the interpret-mode suite forces 16-row
# blocks: every case then crosses several query and key blocks, ragged tails,
# diagonal and fully visible blocks. On a GPU the shipped defaults run.
SMALL_BLOCKS = pf.FlashConfig(
    pf.ForwardConfig(block_q=16, block_k=16, num_warps=4, num_stages=1),
    pf.BackwardConfig(16, 16, 16, 16, 4, 1, 4, 1),
)
CONFIG = None if ON_GPU else SMALL_BLOCKS

# One self-attention and one cross-attention shape (Tq != Tk, ragged tails), GQA.
if ON_GPU:
    SELF = Shape("self", 2, 700, 700, 4, 2, 64)
    CROSS = Shape("cross", 2, 333, 517, 6, 2, 80)
else:
    SELF = Shape("self", 2, 40, 40, 4, 2, 16)
    CROSS = Shape("cross", 2, 37, 45, 6, 2, 24)


@dataclasses.dataclass(frozen=True)
class Case:
    """Which features a call uses; ``build`` draws the arrays for a shape."""

    causal: bool = False
    window: tuple[int, int] | None = None
    q_lengths: bool = False
    kv_lengths: bool = False
    segments: str | None = None  # "packed" (sorted, shared by q and kv when Tq == Tk), "long" or "random"
    mask: tuple[int, int, int, int] | str | None = None  # 1 = full dim, 0 = broadcast; or "late"
    bias: tuple[int, int, int, int] | None = None
    bias_grad: bool = True
    alibi: str | None = None  # "n" or "bn"
    alibi_grad: bool = False
    soft_cap: float | None = None
    dropout: float = 0.0


def packed_ids(rng, batch: int, t: int, max_doc: int):
    ids = np.zeros((batch, t), np.int32)
    for b in range(batch):
        pos, doc = 0, 0
        while pos < t:
            n = int(rng.integers(1, max_doc + 1))
            ids[b, pos : pos + n] = doc
            pos, doc = pos + n, doc + 1
    return ids


def build(case: Case, shape: Shape, seed: int):
    """``(kernel kwargs, reference kwargs, differentiable extras)`` for one case."""
    rng = np.random.default_rng(seed + 1)
    B, Tq, N, _ = shape.q_shape
    Tk = shape.seq_k
    kw, ref, diff = {}, {}, {}
    both = {}
    if case.causal:
        both["is_causal"] = True
    if case.window is not None:
        both["local_window_size"] = case.window
    if case.q_lengths:
        lens = rng.integers(0, Tq + 1, size=B)
        lens[0] = max(lens[0], Tq // 2)  # at least one long row set
        both["query_seq_lengths"] = jnp.asarray(lens, jnp.int32)
    if case.kv_lengths:
        lens = rng.integers(1, Tk + 1, size=B)
        lens[0] = max(lens[0], Tk // 2)  # (one visible key makes dq exactly 0: no relative error)
        if B > 1:
            lens[-1] = 0  # a batch whose queries see no key at all
        both["key_value_seq_lengths"] = jnp.asarray(lens, jnp.int32)
    if case.segments == "long":  # two documents: whole blocks inside one run unmasked
        q_ids = (np.arange(Tq)[None, :] >= (4 * Tq) // 5).astype(np.int32).repeat(B, 0)
        kv_ids = (np.arange(Tk)[None, :] >= (4 * Tk) // 5).astype(np.int32).repeat(B, 0)
        both["q_segment_ids"], both["kv_segment_ids"] = jnp.asarray(q_ids), jnp.asarray(kv_ids)
    if case.segments == "packed":
        max_doc = max(3, (2 * Tq) // 3)
        q_ids = packed_ids(rng, B, Tq, max_doc)
        kv_ids = q_ids if Tq == Tk else packed_ids(rng, B, Tk, max_doc)
        both["q_segment_ids"], both["kv_segment_ids"] = jnp.asarray(q_ids), jnp.asarray(kv_ids)
    elif case.segments == "random":
        both["q_segment_ids"] = jnp.asarray(rng.integers(0, 3, (B, Tq)), jnp.int32)
        both["kv_segment_ids"] = jnp.asarray(rng.integers(0, 3, (B, Tk)), jnp.int32)
    full = (B, N, Tq, Tk)
    if case.mask == "late":  # each row sees keys j >= start_i only: leading blocks fully masked
        start = rng.integers(0, Tk, size=(B, 1, Tq, 1))
        both["mask"] = jnp.asarray(np.arange(Tk)[None, None, None, :] >= start)
    elif case.mask is not None:
        mshape = tuple(n if on else 1 for n, on in zip(full, case.mask))
        m = rng.random(mshape) > 0.25
        both["mask"] = jnp.asarray(m)
    if case.bias is not None:
        bshape = tuple(n if on else 1 for n, on in zip(full, case.bias))
        b = jnp.asarray(rng.standard_normal(bshape), jnp.float32)
        (diff if case.bias_grad else both)["bias"] = b
    if case.alibi is not None:
        s = rng.uniform(0.02, 0.3, (N,) if case.alibi == "n" else (B, N))
        (diff if case.alibi_grad else both)["alibi_slopes"] = jnp.asarray(s, jnp.float32)
    if case.soft_cap is not None:
        both["logits_soft_cap"] = case.soft_cap
    kw.update(both)
    ref.update(both)
    if case.dropout > 0:
        key = jax.random.key(seed)
        kw.update(dropout_rate=case.dropout, dropout_rng=key)
        seed_words = pf_dropout.seed_from_key(key)
        ref.update(
            dropout_rate=case.dropout,
            dropout_mask=pf_dropout.full_keep_mask(seed_words, B, N, Tq, Tk, rate=case.dropout),
        )
    return kw, ref, diff


# Non-finite entries for the reliability tests: name -> (which of q, k, v; the value put in one entry).
POISONS = {
    "nan_in_k": ("k", np.nan),
    "nan_in_q": ("q", np.nan),
    "nan_in_v": ("v", np.nan),
    "inf_in_k": ("k", np.inf),
}


def random_qkv(shape: Shape, dtype, seed: int):
    rng = np.random.default_rng(seed)

    def draw(s):
        return jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype)

    return draw(shape.q_shape), draw(shape.kv_shape), draw(shape.kv_shape), draw(shape.q_shape)


def reference_vjp_f64(q, k, v, ct, **reference_kwargs):
    """``(out, dq, dk, dv)`` of ``attention_reference`` in float64 under the cotangent ``ct``, one batch row and
    one KV head (with its query heads) at a time: a whole ``[B, N, Tq, Tk]`` float64 reference at the GPU
    suite's 4k shapes holds about 10 GB, which eight pytest workers sharing one GPU ran out of.
    Array keyword arguments may only be the per-batch-row ones (segment ids, lengths: sliced with the batch row);
    a mask, bias or ALiBi slopes has a head axis this does not slice."""
    per_row = {"q_segment_ids", "kv_segment_ids", "query_seq_lengths", "key_value_seq_lengths"}
    arrays = {name for name, x in reference_kwargs.items() if getattr(x, "ndim", 0)}
    if arrays - per_row:
        raise TypeError(f"reference_vjp_f64 slices only {sorted(per_row)}; got arrays {sorted(arrays - per_row)}")
    batch, _, num_heads, _ = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    out, dq = np.empty(q.shape, np.float64), np.empty(q.shape, np.float64)
    dk, dv = np.empty(k.shape, np.float64), np.empty(k.shape, np.float64)
    with jax.enable_x64(True):
        for b in range(batch):
            row_kwargs = {name: x[b:b + 1] if name in arrays and x.shape[0] == batch else x
                          for name, x in reference_kwargs.items()}
            for h in range(num_kv_heads):
                q_part = (slice(b, b + 1), slice(None), slice(h * group, (h + 1) * group))  # the group's query heads
                kv_part = (slice(b, b + 1), slice(None), slice(h, h + 1))
                q64, k64, v64, ct64 = (jnp.asarray(np.asarray(x[part].astype(jnp.float32), np.float64))
                                       for x, part in ((q, q_part), (k, kv_part), (v, kv_part), (ct, q_part)))
                o, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **row_kwargs), q64, k64, v64)
                out[q_part], (dq[q_part], dk[kv_part], dv[kv_part]) = o, vjp(ct64)
    return out, dq, dk, dv


def kernel_fn(kw, diff_names, **extra):
    def fn(q, k, v, *d):
        return pf.dot_product_attention(
            q, k, v, implementation="pallas", config=CONFIG, **kw, **dict(zip(diff_names, d)), **extra
        )

    return fn


def check(case: Case, shape: Shape, dtype, seed: int, **extra):
    """Output and every gradient (dq, dk, dv, and dbias / dslopes when differentiated) vs the reference."""
    kw, ref_kw, diff = build(case, shape, seed)
    q, k, v, ct = random_qkv(shape, dtype, seed)
    names = list(diff)
    out, vjp = jax.vjp(kernel_fn(kw, names, **extra), q, k, v, *diff.values())
    grads = vjp(ct)
    assert out.shape == q.shape and out.dtype == q.dtype
    for g, x in zip(grads, (q, k, v, *diff.values())):
        assert g.shape == x.shape and g.dtype == x.dtype

    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, *diff.values())]

        def ref_fn(q, k, v, *d):
            return attention_reference(q, k, v, **ref_kw, **dict(zip(names, d)))

        ref_out, ref_vjp = jax.vjp(ref_fn, *f64)
        ref_grads = [np.asarray(g) for g in ref_vjp(jnp.asarray(np.asarray(ct, np.float64)))]
        ref_out = np.asarray(ref_out)

    tol = TOLERANCE[jnp.dtype(dtype)]
    labels = ["out", "dq", "dk", "dv", *(f"d{n}" for n in names)]
    # A gradient that is exactly zero (window (0, 0): one visible key per row, so dS = 0 and dQ = dK = 0) has no
    # scale of its own: the kernel's rounding noise (dP - delta cancelling) is measured against the call's largest
    # q/k/v gradient instead of as an absolute norm.
    grad_scale = max(float(np.linalg.norm(g)) for g in ref_grads[:3])
    half = jnp.dtype(dtype).itemsize == 2
    for label, got, want in zip(labels, (out, *grads), (ref_out, *ref_grads)):
        if half and label in ("dq", "dk") and grad_scale > 0:
            # In 16 bits dQ and dK carry the rounding of O to the input dtype through delta = rowsum(dO * O), as
            # cuDNN's do (README, precision limits: a share of the gradient norm). Where dS cancels, dQ and dK are
            # small beside dV and that share is a large part of them: measured against the largest gradient then.
            err = np.linalg.norm(np.asarray(got, np.float64) - want) / max(float(np.linalg.norm(want)), grad_scale)
        elif half and label == "dbias":
            # dbias is dS = P * (dP - delta) summed over the bias's broadcast axes: in 16 bits it carries delta's
            # rounding (O rounded to the input dtype) as dQ and dK do, and where the two terms cancel that is a
            # large share of it. Measured against the terms' magnitudes (``_bias_grad_scale``).
            denom = max(float(np.linalg.norm(want)), _bias_grad_scale(shape, ref_kw, dict(zip(names, f64[3:])),
                                                                       f64[:3], ct, ref_out, np.shape(want)))
            err = np.linalg.norm(np.asarray(got, np.float64) - want) / (denom if denom > 0 else 1.0)
        elif label == "dalibi_slopes":
            # In 16 bits (and where the reference's dS vanishes: every row sees one key) d slopes is measured
            # against the terms P dP and P delta whose difference is dS, as dbias is (``_slope_grad_scale``).
            scale = _slope_grad_scale(shape, ref_kw, dict(zip(names, f64[3:])), f64[:3], ct,
                                      out64=ref_out if half else None)
            if scale == 0 and not half:
                scale = _slope_grad_scale(shape, ref_kw, dict(zip(names, f64[3:])), f64[:3], ct, out64=ref_out)
            err = np.linalg.norm(np.asarray(got, np.float64) - want) / (scale if scale > 0 else 1.0)
        elif label != "out" and not np.any(want) and grad_scale > 0:
            err = rel_err(got, want) / grad_scale  # rel_err is the absolute norm for an all-zero reference
        else:
            err = rel_err(got, want)
        assert err <= tol, f"{label}: relative error {err:.3e} > {tol:.0e} ({case}, {jnp.dtype(dtype).name}, seed={seed})"
    return out, grads


def _reference_ds(shape: Shape, ref_kw, diff64, qkv64, ct):
    """dS of the float64 reference under ``ct`` (the gradient of a zero ``[B, N, Tq, Tk]`` probe added to the
    logits, over any bias), with the probed reference ``with_probe(probe, lse=False)`` and the zero probe."""
    B, Tq, N, _ = shape.q_shape
    kw = {**ref_kw, **diff64}
    base = kw.pop("bias", None)
    with jax.enable_x64(True):

        def with_probe(probe, lse=False):
            bias = probe if base is None else jnp.asarray(base, jnp.float64) + probe
            return attention_reference(*qkv64, bias=bias, return_lse=lse, **kw)

        zero = jnp.zeros((B, N, Tq, shape.seq_k), jnp.float64)
        _, vjp = jax.vjp(with_probe, zero)
        (ds,) = vjp(jnp.asarray(np.asarray(ct, np.float64)))
    return np.asarray(ds), with_probe, zero


def _bias_grad_scale(shape: Shape, ref_kw, diff64, qkv64, ct, out64, bias_shape) -> float:
    """The norm of |P dP| + |P delta| summed over the bias's broadcast axes: the terms whose difference is dbias.

    Each logit's gradient is dS = P * dP - P * delta with delta = rowsum(dO * O). A difference of terms each
    accurate to a relative ``tol`` is accurate to ``tol`` times the sum of their magnitudes, which is the
    denominator (as ``_slope_grad_scale`` argues for ALiBi). From the float64 reference: dS as the gradient of a
    zero bias added to the logits under the cotangent, P as the gradient of the rows' summed log-sum-exp.
    """
    terms = _reference_ds_terms(shape, ref_kw, diff64, qkv64, ct, out64)
    axes = tuple(i for i, n in enumerate(bias_shape) if n == 1 and terms.shape[i] != 1)
    return float(np.linalg.norm(terms.sum(axis=axes, keepdims=True)))


def _reference_ds_terms(shape: Shape, ref_kw, diff64, qkv64, ct, out64):
    """``|P dP| + |P delta|`` ``[B, N, Tq, Tk]`` of the float64 reference: the magnitudes of the two terms whose
    difference is dS. dS as in ``_reference_ds``, P as the gradient of the rows' summed log-sum-exp."""
    ds, with_probe, zero = _reference_ds(shape, ref_kw, diff64, qkv64, ct)
    with jax.enable_x64(True):

        def summed_lse(probe):  # rows that see no key (lse = -inf) add nothing
            lse = with_probe(probe, lse=True)[1]
            return jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        p = np.nan_to_num(np.asarray(jax.grad(summed_lse)(zero)))
    delta = np.einsum("bind,bind->bni", np.asarray(ct, np.float64), np.asarray(out64))[..., None]  # [B, N, Tq, 1]
    return np.abs(ds + p * delta) + np.abs(p * delta)


def _slope_grad_scale(shape: Shape, ref_kw, diff64, qkv64, ct, out64=None) -> float:
    """The norm of sum |dS[b, n, i, j] * (j - i)|: the terms whose signed sum is d slope.

    The slope gradient adds up every logit gradient dS times its distance;
    those terms largely cancel, so the sum can be far smaller than the terms
    and an error relative to the sum alone measures that cancellation, not the
    kernel. A sum of terms each accurate to a relative ``tol`` is accurate to
    ``tol`` times the sum of their magnitudes, so that is the denominator.
    dS comes from the float64 reference, as the gradient of a zero bias added
    to the logits. Given the reference output ``out64``, |dS| is replaced by
    |P dP| + |P delta| (``_reference_ds_terms``): dS itself is a difference that
    cancels (to exactly 0 where a row sees one key), and in 16 bits delta
    carries the rounding of O, as for dbias.
    """
    if out64 is None:
        ds = _reference_ds(shape, ref_kw, diff64, qkv64, ct)[0]
    else:
        ds = _reference_ds_terms(shape, ref_kw, diff64, qkv64, ct, out64)
    Tq, Tk = shape.seq_q, shape.seq_k
    dist = np.abs(np.arange(Tk)[None, :] - np.arange(Tq)[:, None])  # [Tq, Tk]
    terms = (np.abs(np.asarray(ds)) * dist).sum(axis=(2, 3))  # [B, N]
    if np.ndim(diff64["alibi_slopes"]) == 1:  # [N] slopes: one sum over the batch too
        terms = terms.sum(axis=0)
    return float(np.linalg.norm(terms))


ALONE = {
    "q_lengths": Case(q_lengths=True),
    "kv_lengths": Case(kv_lengths=True),
    "lengths_causal": Case(causal=True, q_lengths=True, kv_lengths=True),
    "segments_packed_causal": Case(causal=True, segments="packed"),
    "segments_random": Case(segments="random"),
    "segments_long_docs": Case(segments="long"),
    "segments_long_docs_causal_lengths": Case(causal=True, segments="long", kv_lengths=True),
    "window_sym": Case(window=(5, 5)),
    "window_left_right": Case(window=(9, 2)),
    "window_causal": Case(causal=True, window=(6, 0)),
    "window_zero": Case(window=(0, 0)),
    "mask_full": Case(mask=(1, 1, 1, 1)),
    "mask_b1qk_causal": Case(causal=True, mask=(1, 0, 1, 1)),
    "mask_1n1k": Case(mask=(0, 1, 0, 1)),
    "mask_11q1": Case(mask=(0, 0, 1, 0)),
    "mask_late_start": Case(mask="late"),
    "mask_late_start_bias": Case(mask="late", bias=(1, 1, 1, 1)),
    "bias_full": Case(bias=(1, 1, 1, 1)),
    "bias_1n1k_causal": Case(causal=True, bias=(0, 1, 0, 1)),
    "bias_b1qk_const": Case(bias=(1, 0, 1, 1), bias_grad=False),
    "alibi_n_causal": Case(causal=True, alibi="n", alibi_grad=True),
    "alibi_bn": Case(alibi="bn"),
    "soft_cap": Case(soft_cap=2.0),
    "soft_cap_causal": Case(causal=True, soft_cap=5.0),
    "dropout": Case(dropout=0.3),
    "dropout_causal": Case(causal=True, dropout=0.15),
}


# Every case on the self-attention shape; the cross-attention shape (Tq != Tk,
# ragged tails on both sides) runs the ones where Tq != Tk changes the ranges.
ON_CROSS = (
    "lengths_causal",
    "segments_packed_causal",
    "segments_long_docs",
    "window_left_right",
    "mask_1n1k",
    "mask_late_start",
    "bias_1n1k_causal",
    "alibi_bn",
    "soft_cap",
    "dropout",
)


COMBINED = {
    # The combination: causal + segments + window + GQA + soft-cap.
    "causal_segments_window_softcap": Case(causal=True, segments="packed", window=(7, 0), soft_cap=3.0),
    "lengths_window_segments": Case(window=(9, 4), q_lengths=True, kv_lengths=True, segments="random"),
    "mask_bias_alibi_causal": Case(causal=True, mask=(1, 0, 1, 1), bias=(0, 1, 1, 1), alibi="bn", alibi_grad=True),
    "everything": Case(
        causal=True,
        window=(11, 0),
        q_lengths=True,
        kv_lengths=True,
        segments="packed",
        mask=(1, 1, 1, 1),
        bias=(1, 1, 1, 1),
        alibi="n",
        alibi_grad=True,
        soft_cap=4.0,
        dropout=0.2,
    ),
}
