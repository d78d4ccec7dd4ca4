"""The Mosaic GPU backend's tuning space and search (``python -m pallas_flash.tuning --backend mosaic``).

The search is coordinate-wise: the forward config alone (timing the forward,
with the default backward), then the backward config with the best forward
(timing the backward alone). Each is ``search.screen_then_confirm``: every
candidate timed briefly, then the fastest few and the heuristic's pick
(``config.heuristic_config``, its forward for the problem's grid:
``config.grid_forward``) in interleaved rounds; the
heuristic's pick stays unless beaten by more than the margin. Each space
holds only the candidates whose tiles fit in shared memory for the problem's
head dim and dtype (``check_fits``); a candidate that still fails to compile
is skipped with a log line. At head
dim 256 (``backward_wide.py``, deterministic in either mode) the fused-dQ
candidates are left out: they would run the same kernels. Results are keyed by
``config.config_key`` and stored in the user cache (``config.user_cache_path()``)
or printed as a table.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax.numpy as jnp

from pallas_flash.api import dot_product_attention
from pallas_flash.backends.mosaic_gpu.config import (
    BACKWARD_BLOCK_Q,
    WIDE_HEAD_DIMS,
    MosaicBackwardConfig,
    MosaicConfig,
    MosaicForwardConfig,
    deterministic_requested,
    grid_forward,
    heuristic_config,
)
from pallas_flash.tuning.search import Problem, Search, backward_timer, forward_timer, screen_then_confirm

__all__ = [
    "BWD_SPACE", "FWD_SPACE", "Problem", "Search", "backward_candidates", "forward_candidates", "tune_problem",
]

# Forward candidates, (block_kv, num_stages, overlap, persistent, compute_wgs) each, before the shared-memory filter:
# two compute warpgroups, and three (overlapped; with 160 registers each, key blocks up to 128).
FWD_SPACE = [
    *((*c, 2) for c in itertools.product((64, 128, 192, 256), (2, 3, 4), (False, True), (False, True))),
    *((kv, s, True, p, 3) for kv, s, p in itertools.product((64, 128), (2, 3, 4), (False, True))),
]
# Backward candidates, (block_q, num_stages, dq_block_kv, dq_num_stages, deterministic) each, before the
# filter: the deterministic mode (separate dQ kernel) over its query block and its dQ kernel's blocks, and
# the fused dQ mode (no dQ kernel: its dq_* fields are unused and left at their defaults; 128-row query blocks fit
# only at D=64, with up to two stages).
_DQ_DEFAULTS = (MosaicBackwardConfig.dq_block_kv, MosaicBackwardConfig.dq_num_stages)
BWD_SPACE = [
    *(
        (block_q, stages, dq_block_kv, dq_stages, True)
        for block_q, stages, dq_block_kv, dq_stages in itertools.product(BACKWARD_BLOCK_Q, (1, 2, 3), (64, 128), (2, 3))
    ),
    *((block_q, stages, *_DQ_DEFAULTS, False) for block_q, stages in itertools.product(BACKWARD_BLOCK_Q, (1, 2))),
]


def _fitting(configs: list, head_dim: int, dtype: Any, what: str) -> list:
    fits = []
    for cfg in configs:
        try:
            cfg.check_fits(head_dim, dtype)
        except ValueError:
            continue
        fits.append(cfg)
    if not fits:
        where = f"head_dim={head_dim} ({jnp.dtype(dtype).name})"
        raise ValueError(f"no {what} config of the tuning space fits in shared memory at {where}")
    return fits


def forward_candidates(head_dim: int, dtype: Any) -> list[MosaicForwardConfig]:
    """``FWD_SPACE`` as configs, those whose tiles fit for this head dim and dtype."""
    configs = [MosaicForwardConfig(block_kv=block_kv, num_stages=stages, overlap=overlap, persistent=persistent,
                                   compute_wgs=wgs)
               for block_kv, stages, overlap, persistent, wgs in FWD_SPACE]
    return _fitting(configs, head_dim, dtype, "forward")


def backward_candidates(
    head_dim: int, dtype: Any, *, nondeterministic: bool | None = None
) -> list[MosaicBackwardConfig]:
    """``BWD_SPACE`` as configs, those whose tiles fit for this head dim and dtype; the fused-dQ (run-to-run
    nondeterministic) ones with ``nondeterministic``, which defaults to ``not deterministic_requested()``, as the
    default configs do (never at head dim 256, where they would run the deterministic kernels). A tuned fused
    entry is made deterministic at lookup when determinism is requested later (``default_config``)."""
    if nondeterministic is None:
        nondeterministic = not deterministic_requested()
    fused_ok = nondeterministic and head_dim not in WIDE_HEAD_DIMS
    configs = [
        MosaicBackwardConfig(block_q=block_q, num_stages=stages, dq_block_kv=dq_block_kv, dq_num_stages=dq_stages,
                             deterministic=det)
        for block_q, stages, dq_block_kv, dq_stages, det in BWD_SPACE
        if det or fused_ok
    ]
    return _fitting(configs, head_dim, dtype, "backward")


def _attention(p: Problem, cfg: MosaicConfig):
    return lambda q, k, v: dot_product_attention(q, k, v, is_causal=p.causal, implementation="mosaic", config=cfg)


def _fwd_timer(p: Problem, cfg: MosaicConfig, xs):
    return forward_timer(_attention(p, cfg), xs)


def _bwd_timer(p: Problem, cfg: MosaicConfig, xs):
    return backward_timer(_attention(p, cfg), xs)


def tune_problem(
    p: Problem, log=print, *, nondeterministic: bool | None = None, search: Search = Search()
) -> tuple[MosaicConfig, dict]:
    """The fastest forward and backward configs for one problem, their times (``fwd_ms``, ``bwd_ms``: medians over
    the confirming rounds) and what each search timed (``fwd_search``, ``bwd_search``: ``screen_then_confirm``'s
    records). ``nondeterministic``: whether the backward searches the fused-dQ mode too (see
    ``backward_candidates``); the baseline backward is the heuristic's for the same choice."""
    if nondeterministic is None:
        nondeterministic = not deterministic_requested()
    xs = p.inputs()
    base = heuristic_config(head_dim=p.head_dim, dtype=p.dtype, causal=p.causal, seq_q=p.seq, seq_k=p.seq,
                            deterministic=None if nondeterministic else True)
    # what an untuned call of this shape runs (``default_config``): the forward for the problem's grid
    base = dataclasses.replace(base, fwd=grid_forward(base.fwd, causal=p.causal, seq_q=p.seq,
                                                      batch_heads=p.batch * p.heads, head_dim=p.head_dim))
    fwd_cands = [dataclasses.replace(base, fwd=fwd) for fwd in forward_candidates(p.head_dim, p.dtype)]
    best_fwd, t_fwd, fwd_record = screen_then_confirm(
        fwd_cands, lambda c: _fwd_timer(p, c, xs), log, baseline=base, search=search)
    bwd_cands = [dataclasses.replace(best_fwd, bwd=bwd)
                 for bwd in backward_candidates(p.head_dim, p.dtype, nondeterministic=nondeterministic)]
    best, t_bwd, bwd_record = screen_then_confirm(
        bwd_cands, lambda c: _bwd_timer(p, c, xs), log, baseline=dataclasses.replace(best_fwd, bwd=base.bwd),
        search=search)
    return best, {"fwd_ms": t_fwd * 1e3, "bwd_ms": t_bwd * 1e3, "fwd_search": fwd_record, "bwd_search": bwd_record}
