"""The benchmark problems: one attention call each, and the suites that list them.

A ``Problem`` is a named ``Shape`` (``pallas_flash.testing.shapes``), a dtype,
and optionally a left window, packed documents (segment ids) or a logits
soft-cap. Suites: ``attention`` (``grid_problems``: the paper grid per dtype
and GQA) and ``masks`` (``mask_problems``: windows, packed documents, soft-cap,
and the plain causal calls they are compared with). ``benchmarks.harness``
runs them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pallas_flash.testing.shapes import Shape, paper_grid

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclasses.dataclass(frozen=True)
class Problem:
    shape: Shape
    dtype: str = "bf16"
    suite: str = "attention"
    window: int | None = None  # left window (w, 0)
    doc_lens: tuple[int, ...] | None = None  # packed documents
    soft_cap: float | None = None
    seq_lens: tuple[int, ...] | None = None  # a padded batch: each row's valid query and key length

    @property
    def name(self) -> str:
        return self.shape.name

    @property
    def gqa(self) -> int:
        return self.shape.num_heads // self.shape.num_kv_heads

    @property
    def masked(self) -> bool:
        return any(x is not None for x in (self.window, self.doc_lens, self.soft_cap, self.seq_lens))

    @property
    def window_arg(self) -> tuple[int, int] | None:
        return None if self.window is None else (self.window, 0)

    def visible_pairs(self) -> float:
        """Exact count of visible (query, key) pairs per (batch, head) (a padded batch: the mean over its rows); the
        window applies within each document and each padded row."""
        s = self.shape
        if self.seq_lens is not None:
            return sum(self._pairs(n, n) for n in self.seq_lens) / len(self.seq_lens)
        if self.doc_lens is not None:
            return sum(self._pairs(n, n) for n in self.doc_lens)
        return self._pairs(s.seq_q, s.seq_k)

    def _pairs(self, seq_q: int, seq_k: int) -> int:
        """Visible pairs of ``seq_q`` queries over ``seq_k`` keys, top-left aligned: query ``i`` sees keys up to
        ``i`` (causal, or a window ``(w, 0)``) and from ``i - w`` (a window)."""
        i = np.arange(seq_q)
        causal = self.shape.causal or self.window is not None  # a window (w, 0) sees no key right of the query
        hi = np.minimum(i + 1, seq_k) if causal else np.full(seq_q, seq_k)
        lo = np.maximum(i - self.window, 0) if self.window is not None else 0
        return int(np.maximum(hi - lo, 0).sum())

    def flops(self, pass_: str) -> float:
        """``Shape.flops`` (the standard count) for the grid; the visible pairs counted exactly for masks."""
        if self.suite != "masks":
            return self.shape.flops(pass_)
        fwd = 4.0 * self.shape.batch * self.shape.num_heads * self.visible_pairs() * self.shape.head_dim
        return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[pass_]

    def setup(self) -> str:
        s = self.shape
        parts = [f"B={s.batch}", f"T={s.seq_q}"] + (["causal"] if s.causal else [])
        if self.window is not None:
            parts.append(f"window ({self.window}, 0)")
        if self.doc_lens is not None:
            parts.append(f"{len(self.doc_lens)} docs {min(self.doc_lens)}-{max(self.doc_lens)}")
        if self.soft_cap is not None:
            parts.append(f"soft-cap {self.soft_cap:g}")
        if self.seq_lens is not None:
            parts.append(f"padded rows, lengths {min(self.seq_lens)}-{max(self.seq_lens)}")
        return ", ".join(parts)

    def segment_ids(self):
        if self.doc_lens is None:
            return None
        ids = np.repeat(np.arange(len(self.doc_lens), dtype=np.int32), self.doc_lens)
        return np.broadcast_to(ids, (self.shape.batch, self.shape.seq_q))

    def fields(self) -> dict:
        """The columns a record of this problem starts with."""
        s = self.shape
        out = dict(suite=self.suite, name=s.name, dtype=self.dtype, gqa=self.gqa, batch=s.batch, seq_q=s.seq_q,
                   seq_k=s.seq_k, heads=s.num_heads, kv_heads=s.num_kv_heads, head_dim=s.head_dim, causal=s.causal)
        if self.suite == "masks":
            out.update(setup=self.setup(), visible=self.visible_pairs() / (s.seq_q * s.seq_k))
        return out


def grid_problems(dtypes, gqas, head_dims, seq_lens, causal, tokens: int, hidden: int) -> list[Problem]:
    """The attention suite: ``paper_grid`` per dtype and GQA, in run order."""
    return [Problem(s, dt) for dt in dtypes for g in gqas for s in paper_grid(head_dims, seq_lens, causal, tokens, hidden, g)]


def packed_doc_lengths(total: int, lo: int, hi: int, seed: int = 0) -> tuple[int, ...]:
    """Random document lengths in [lo, hi] filling ``total`` exactly (the last one kept >= lo)."""
    rng, lens, left = np.random.default_rng(seed), [], total
    while left > 0:
        n = int(rng.integers(lo, hi + 1))
        lens.append(left if left - n < lo else n)  # a too-short remainder joins the last document
        left -= lens[-1]
    return tuple(lens)


def mask_problems(small: bool = False, dtype: str = "bf16") -> dict[str, Problem]:
    """The masks suite by name; ``small``: tiny sizes for a CPU run in interpret mode."""

    def p(name, b, t, **kw):
        n, d = (2, 32) if small else (16, 128)
        return Problem(Shape(name, b, t, t, n, n, d, True), dtype, "masks", **kw)

    if small:
        probs = [p("causal", 1, 256), p("window16", 1, 256, window=16), p("window64", 1, 256, window=64),
                 p("softcap50", 1, 256, soft_cap=50.0), p("packed_docs", 1, 256, doc_lens=packed_doc_lengths(256, 16, 64)),
                 p("padded", 2, 256, seq_lens=(256, 100))]
    else:
        t = 16384
        probs = [p("causal_16k", 1, t), p("window256_16k", 1, t, window=256), p("window4k_16k", 1, t, window=4096),
                 p("softcap50_4k", 4, 4096, soft_cap=50.0), p("causal_4k", 4, 4096),
                 p("padded_4k", 4, 4096, seq_lens=padded_lengths(4, 1024, 4096)),
                 # Last: its cudnn_packed row goes through a private JAX API.
                 p("packed_docs_16k", 1, t, doc_lens=packed_doc_lengths(t, 1024, 4096))]
    return {q.name: q for q in probs}


def padded_lengths(batch: int, lo: int, hi: int, seed: int = 0) -> tuple[int, ...]:
    """Random valid lengths in [lo, hi] for the rows of a padded batch (the longest row's length is ``hi``)."""
    lens = np.random.default_rng(seed).integers(lo, hi + 1, batch)
    lens[0] = hi
    return tuple(int(n) for n in lens)


# Speed-up lines in the masks report: (window problem, causal baseline).
WINDOW_SPEEDUPS = (("window256_16k", "causal_16k"), ("window16", "causal"))
