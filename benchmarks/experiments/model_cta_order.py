"""A model (no GPU) of the persistent causal forward's tile order: per-CTA work and the K/V read from HBM, by length
over every (batch row, head) pair against by length within groups of G pairs, with and without the snake
(``occupancy.persistent_schedule``, the order of ``forward.py``'s ``tile_coords``; NOTES 105).

    PYTHONPATH=. python3 benchmarks/experiments/model_cta_order.py [L2_MIB]

132 CTAs; a tile of rank ``r`` (0: a pair's longest, 128 rows, 128-key blocks) reads key blocks ``0..q_tiles-1-r``,
one per time step; the reads of all CTAs, in time order, go through an LRU cache of ``L2_MIB`` (default 50; the
H100's and H200's L2, which is two halves in fact). Crude: a block takes one step whatever else runs, Q and O are
left out. It prints the busiest CTA's work over the mean and the K/V bytes missed in the cache against those read.
"""
import collections
import sys

import numpy as np

from pallas_flash.backends.mosaic_gpu.occupancy import group_size, persistent_schedule

SMS = 132


def model(batch: int, heads: int, seq: int, head_dim: int, group: int | None, snake: bool, l2_bytes: int):
    q_tiles = -(-seq // 128)
    cta, rounds, pair, rank = persistent_schedule(batch * heads, q_tiles, group, SMS, snake)
    work, reads = np.zeros(SMS, np.int64), []
    for c, _, p, r in sorted(zip(cta, rounds, pair, rank), key=lambda x: (x[0], x[1])):  # each CTA's tiles in turn
        blocks = q_tiles - r
        reads += [(work[c] + b, p, b) for b in range(blocks)]
        work[c] += blocks
    block_bytes = 128 * head_dim * 2 * 2  # K and V, bf16
    cache, missed = collections.OrderedDict(), 0
    for _, p, b in sorted(reads):
        if (p, b) in cache:
            cache.move_to_end((p, b))
            continue
        missed += block_bytes
        cache[(p, b)] = None
        if len(cache) * block_bytes > l2_bytes:
            cache.popitem(last=False)
    return work.max() / work.mean(), missed / 2**20, len(reads) * block_bytes / 2**20


if __name__ == "__main__":
    l2 = int(float(sys.argv[1]) * 2**20) if len(sys.argv) > 1 else 50 * 2**20
    problems = [(16, 32, 1024, 64, "D=64 causal 1k"), (16, 12, 1024, 64, "GPT-2 T=1024"),
                (4, 12, 4096, 64, "GPT-2 T=4096"), (8, 32, 2048, 64, "D=64 causal 2k"),
                (16, 16, 1024, 128, "D=128 causal 1k")]
    for batch, heads, seq, head_dim, name in problems:
        for group in sorted({None} | {group_size(batch * heads, g) for g in (2, 4, 8, 16, 32)} - {1},
                            key=lambda g: g or 0):
            for snake in (False, True):
                imbalance, missed, read = model(batch, heads, seq, head_dim, group, snake, l2)
                print(f"{name:16s} groups of {str(group):4s} snake {snake:d}: busiest CTA {imbalance:.3f} x the "
                      f"mean, K/V from HBM {missed:5.0f} of {read:5.0f} MiB read", flush=True)
