"""Block skipping: a block that holds no visible element is outside the range the kernels loop over.

``kv_block_range`` (forward, dQ), ``q_block_range`` (dK/dV) and
``segment_block_ranges`` against masks built element by element: blocks
outside the range hold no visible element, the ranges are tight, and the
unmasked middle is fully visible.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_flash.backends.triton import blocks
from pallas_flash.reference import visibility_mask
from pallas_flash.spec import AttentionSpec
from tests.cases import packed_ids

WINDOW_SPECS = [
    dict(causal=True),
    dict(window=(5, 0), causal=True),
    dict(window=(20, 3)),
    dict(window=(0, 0)),
    dict(window=(3, 40)),
    dict(),
    # Position offsets: a block of a longer sequence (keys before, after or overlapping the queries).
    dict(causal=True, q_offset=37),
    dict(causal=True, k_offset=29),
    dict(causal=True, q_offset=100, k_offset=64),
    dict(window=(7, 2), q_offset=21, k_offset=5),
    dict(window=(4, 30), k_offset=40, causal=False),
]


@pytest.mark.parametrize("spec_kw", WINDOW_SPECS, ids=str)
@pytest.mark.parametrize("seq_q, seq_k", [(70, 70), (45, 83), (83, 45)])
def test_block_ranges_skip_every_invisible_block(spec_kw, seq_q, seq_k):
    """Forward/dQ and dK/dV block ranges: blocks outside hold no visible element, are tight, and the unmasked middle is fully visible."""
    spec = AttentionSpec(scale=1.0, **spec_kw)
    rng = np.random.default_rng(seq_q * 7 + seq_k)
    for block_q, block_k in ((16, 16), (16, 32), (32, 16)):
        for kv_len in (None, int(rng.integers(0, seq_k + 1))):
            for q_len in (None, int(rng.integers(0, seq_q + 1))):
                vis = np.asarray(
                    visibility_mask(
                        seq_q,
                        seq_k,
                        batch=1,
                        causal=spec.causal,
                        local_window_size=spec.window,
                        query_seq_lengths=None if q_len is None else [q_len],
                        key_value_seq_lengths=None if kv_len is None else [kv_len],
                        q_offset=spec.q_offset,
                        k_offset=spec.k_offset,
                    )
                )[0, 0]
                structural = np.asarray(
                    visibility_mask(
                        seq_q, seq_k, batch=1, causal=spec.causal, local_window_size=spec.window,
                        q_offset=spec.q_offset, k_offset=spec.k_offset,
                    )
                )[0, 0]
                _check_kv_ranges(spec, vis, structural, block_q, block_k, q_len, kv_len)
                _check_q_ranges(spec, vis, structural, block_q, block_k, q_len, kv_len)


def _as_int(x):
    return int(np.asarray(x))


def _check_kv_ranges(spec, vis, structural, bq, bk, q_len, kv_len):
    seq_q, seq_k = vis.shape
    nk = -(-seq_k // bk)
    for q0 in range(0, seq_q, bq):
        lo, flo, fhi, hi = (
            _as_int(x)
            for x in blocks.kv_block_range(
                q0,
                spec=spec,
                block_q=bq,
                block_k=bk,
                seq_k=seq_k,
                kv_len=None if kv_len is None else jnp.int32(kv_len),
                q_len=None if q_len is None else jnp.int32(q_len),
                seq_q=seq_q,
            )
        )
        any_vis = [vis[q0 : q0 + bq, kb * bk : (kb + 1) * bk].any() for kb in range(nk)]
        for kb in range(nk):
            if not lo <= kb < hi:
                assert not any_vis[kb], (q0, kb, lo, hi)
        needed = [kb for kb in range(nk) if any_vis[kb]]
        if needed:  # tight: the first and last loaded blocks hold visible elements
            assert lo == needed[0] and hi == needed[-1] + 1, (q0, lo, hi, needed)
        else:
            assert hi == lo
        if seq_k >= bk:
            for kb in range(flo, fhi):  # the unmasked loop: every element visible, no ragged tail
                c0, c1 = kb * bk, (kb + 1) * bk
                assert c1 <= seq_k and (kv_len is None or c1 <= kv_len)
                r1 = min(q0 + bq, seq_q if q_len is None else q_len)  # rows past q_len are never stored
                assert structural[q0:r1, c0:c1].all(), (q0, kb)


def _check_q_ranges(spec, vis, structural, bq, bk, q_len, kv_len):
    seq_q, seq_k = vis.shape
    nq = -(-seq_q // bq)
    for k0 in range(0, seq_k, bk):
        lo, flo, fhi, hi = (
            _as_int(x)
            for x in blocks.q_block_range(
                k0,
                spec=spec,
                block_q=bq,
                block_k=bk,
                seq_q=seq_q,
                q_len=None if q_len is None else jnp.int32(q_len),
                kv_len=None if kv_len is None else jnp.int32(kv_len),
                seq_k=seq_k,
            )
        )
        if kv_len is not None and k0 + bk > kv_len:  # the kernel masks the straddling block everywhere
            flo = fhi = lo
        any_vis = [vis[qb * bq : (qb + 1) * bq, k0 : k0 + bk].any() for qb in range(nq)]
        for qb in range(nq):
            if not lo <= qb < hi:
                assert not any_vis[qb], (k0, qb, lo, hi)
        needed = [qb for qb in range(nq) if any_vis[qb]]
        if needed:
            assert lo == needed[0] and hi == needed[-1] + 1, (k0, lo, hi, needed)
        else:
            assert hi == lo
        if seq_q >= bq:
            for qb in range(flo, fhi):
                r0, r1 = qb * bq, (qb + 1) * bq
                assert r1 <= seq_q
                c1 = min(k0 + bk, seq_k if kv_len is None else kv_len)
                assert structural[r0:r1, k0:c1].all(), (k0, qb)


@pytest.mark.parametrize("kind", ["packed", "random"])
def test_segment_block_ranges_skip_other_documents(kind):
    """Query blocks loop only over key blocks of their own documents (and vice versa); blocks
    inside one document on both sides run without the segment mask."""
    rng = np.random.default_rng(0)
    t = 200
    ids = packed_ids(rng, 2, t, 40) if kind == "packed" else rng.integers(0, 3, (2, t)).astype(np.int32)
    jids = jnp.asarray(ids)
    for bq, bk in ((16, 16), (32, 16), (16, 64)):
        for over, (b_self, b_other) in (("kv", (bq, bk)), ("q", (bk, bq))):
            lo, hi, flo, fhi = (np.asarray(x) for x in blocks.segment_block_ranges(jids, jids, bq, bk, over=over))
            n_other = -(-t // b_other)
            for b in range(2):
                same = ids[b][:, None] == ids[b][None, :]
                for i in range(lo.shape[1]):
                    rows = slice(i * b_self, (i + 1) * b_self)

                    def tile(j):
                        cols = slice(j * b_other, (j + 1) * b_other)
                        return same[rows, cols] if over == "kv" else same[cols, rows]

                    shared = [j for j in range(n_other) if tile(j).any()]
                    for j in range(n_other):
                        if not lo[b, i] <= j < hi[b, i]:
                            assert not tile(j).any()
                    if kind == "packed":
                        assert lo[b, i] == shared[0] and hi[b, i] == shared[-1] + 1
                    assert lo[b, i] <= flo[b, i] <= fhi[b, i] <= hi[b, i]
                    for j in range(flo[b, i], fhi[b, i]):
                        assert tile(j).all(), (over, b, i, j)
                    if kind == "packed":  # every block wholly inside the block's own document is unmasked
                        full = [j for j in range(n_other) if tile(j).all() and len(set(ids[b][rows])) == 1]
                        assert list(range(flo[b, i], fhi[b, i])) == full
