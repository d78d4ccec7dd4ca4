"""Named attention shapes, shared by the tests, the tuner and the benchmarks.

A ``Shape`` is one attention problem in the ``[B, T, N, H]`` layout. The test
suites run the small sets (``CPU_CASES`` in Pallas interpret mode, ``GPU_CASES``
on a GPU); the benchmarks run ``paper_grid`` (the FlashAttention-2 paper's
sweep: B*T = 16k tokens, hidden 2048) and its variants.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq_q: int
    seq_k: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool = False

    @property
    def q_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.seq_q, self.num_heads, self.head_dim)

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.seq_k, self.num_kv_heads, self.head_dim)

    def flops(self, pass_: str = "fwd") -> float:
        """Standard FLOP count: 4*B*N*Tq*Tk*D forward, x0.5 causal, x2.5 backward.

        For causal with Tq != Tk the visible fraction is counted exactly.
        """
        pairs = self.seq_q * self.seq_k
        if self.causal:
            if self.seq_q == self.seq_k:
                pairs = pairs / 2
            else:  # top-left aligned tril(Tq, Tk): row i sees min(i + 1, Tk) keys
                pairs = sum(min(i + 1, self.seq_k) for i in range(self.seq_q))
        fwd = 4.0 * self.batch * self.num_heads * pairs * self.head_dim
        return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[pass_]

    def __str__(self) -> str:
        return self.name


def _s(name, b, tq, tk, n, k, d, causal=False) -> Shape:
    return Shape(name, b, tq, tk, n, k, d, causal)


# Small odd shapes for the CPU interpret-mode suite: ragged tails, Tq != Tk,
# GQA/MQA, non-power-of-two head dims. Each is also run causal.
CPU_CASES: tuple[Shape, ...] = (
    _s("tiny", 1, 16, 16, 1, 1, 16),
    _s("ragged", 2, 37, 37, 2, 2, 32),
    _s("tq_lt_tk", 1, 19, 45, 2, 1, 24),
    _s("tq_gt_tk", 1, 50, 23, 4, 2, 16),
    _s("gqa4_d80", 1, 33, 33, 4, 1, 80),
    _s("mqa_d96", 2, 20, 29, 3, 1, 96),
    _s("one_token", 1, 1, 7, 2, 2, 16),
    _s("d256", 1, 24, 24, 1, 1, 256),
)

# The same kinds of odd shapes at sizes that cross many blocks, for the GPU.
GPU_CASES: tuple[Shape, ...] = (
    _s("ragged", 2, 1000, 1000, 4, 4, 64),
    _s("tq_lt_tk", 2, 300, 777, 4, 2, 128),
    _s("tq_gt_tk", 1, 1025, 513, 8, 2, 64),
    _s("gqa4_d80", 2, 513, 513, 8, 2, 80),
    _s("mqa_d96", 1, 700, 900, 6, 1, 96),
    _s("d256", 1, 384, 384, 2, 2, 256),
    _s("d16_long", 1, 2049, 2049, 2, 1, 16),
    _s("one_token", 3, 1, 129, 4, 4, 128),
)


def paper_grid(
    head_dims=(64, 128),
    seq_lens=(1024, 4096, 16384),
    causal=(False, True),
    tokens: int = 16384,
    hidden: int = 2048,
    gqa: int = 1,
) -> list[Shape]:
    """The FlashAttention-2 paper's sweep: batch*seq = ``tokens``, heads = hidden // D."""
    out = []
    for d in head_dims:
        n = hidden // d
        for t in seq_lens:
            b = max(1, tokens // t)
            for c in causal:
                tag = f"d{d}_n{t // 1024}k{'_causal' if c else ''}{f'_gqa{gqa}' if gqa > 1 else ''}"
                out.append(Shape(tag, b, t, t, n, n // gqa, d, c))
    return out
