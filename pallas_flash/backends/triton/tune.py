"""The Triton backend's tuning space and search (driven by ``python -m pallas_flash.tuning``).

The search is coordinate-wise: the forward config alone (timing the forward),
then the dK/dV kernel's block shape and launch parameters with the dQ kernel
fixed, then the dQ kernel's with the best dK/dV (timing the backward alone).
Results are keyed by ``config.config_key`` and stored in the user cache
(``config.user_cache_path()``) or printed in the shipped tables' format.
"""

from __future__ import annotations

import dataclasses

from pallas_flash.api import flash_attention
from pallas_flash.backends.triton.config import FlashConfig, ForwardConfig, heuristic_config, padded_head_dim
from pallas_flash.tuning.search import Problem, backward_time, fastest, forward_time

# Candidates, (block_q, block_k, num_warps, num_stages) each: the ones that
# won somewhere on an H100 plus their neighbours (see benchmarks/NOTES.md).
FWD_SPACE = [
    (128, 128, 8, 3),
    (128, 128, 8, 2),
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (64, 128, 4, 3),
]
DKDV_SPACE = [  # the dK/dV kernel's
    (32, 64, 4, 3),
    (64, 128, 8, 3),
    (32, 128, 4, 3),
    (64, 64, 4, 3),
    (64, 128, 8, 2),
]
DQ_SPACE = [  # the dQ kernel's
    (128, 64, 8, 3),
    (128, 32, 4, 3),
    (64, 64, 4, 3),
    (128, 128, 8, 2),
    (64, 32, 4, 3),
]
# Head dim 256 (padded): every tile holds twice the bytes, so none of the spaces above fits in an
# H100/H200's 227 KiB of shared memory at 3 stages; smaller blocks and 2 stages.
WIDE_FWD_SPACE = [(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2)]
WIDE_DKDV_SPACE = [(32, 64, 4, 2), (32, 32, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2), (16, 64, 4, 2)]
WIDE_DQ_SPACE = [(64, 32, 4, 2), (64, 64, 4, 2), (32, 64, 4, 2), (128, 32, 8, 2), (32, 32, 4, 2)]


def spaces(head_dim: int) -> tuple[list, list, list]:
    """The (forward, dK/dV, dQ) candidates for a head dim."""
    if padded_head_dim(head_dim) > 128:
        return WIDE_FWD_SPACE, WIDE_DKDV_SPACE, WIDE_DQ_SPACE
    return FWD_SPACE, DKDV_SPACE, DQ_SPACE


def _attention(p: Problem, cfg: FlashConfig):
    return lambda q, k, v: flash_attention(q, k, v, causal=p.causal, config=cfg)


def _fwd_time(p: Problem, cfg: FlashConfig, xs) -> float:
    return forward_time(_attention(p, cfg), xs)


def _bwd_time(p: Problem, cfg: FlashConfig, xs) -> float:
    return backward_time(_attention(p, cfg), xs)


def tune_problem(p: Problem, log=print) -> tuple[FlashConfig, dict]:
    """The fastest forward and backward configs for one problem."""
    xs = p.inputs()
    # the heuristic, not ``default_config``: a broken or stale tuned entry, which the error for it tells the user to
    # retune, must not stop the retuning
    base = heuristic_config(p.head_dim, p.dtype)
    fwd_space, dkdv_space, dq_space = spaces(p.head_dim)
    fwd_cands = [dataclasses.replace(base, fwd=ForwardConfig(*c)) for c in fwd_space]
    best_fwd, t_fwd = fastest(fwd_cands, lambda c: _fwd_time(p, c, xs), log)

    def with_dkdv(c):
        return FlashConfig(best_fwd.fwd, dataclasses.replace(base.bwd, block_q_dkv=c[0], block_k_dkv=c[1], num_warps_dkv=c[2], num_stages_dkv=c[3]))

    best_dkdv, _ = fastest([with_dkdv(c) for c in dkdv_space], lambda c: _bwd_time(p, c, xs), log)

    def with_dq(c):
        return FlashConfig(best_fwd.fwd, dataclasses.replace(best_dkdv.bwd, block_q_dq=c[0], block_k_dq=c[1], num_warps_dq=c[2], num_stages_dq=c[3]))

    best, t_bwd = fastest([with_dq(c) for c in dq_space], lambda c: _bwd_time(p, c, xs), log)
    return best, {"fwd_ms": t_fwd * 1e3, "bwd_ms": t_bwd * 1e3}
