"""The Mosaic GPU backend's configs: the forward and backward kernels' blocks and pipeline depths, validated.

``MosaicConfig`` holds the forward's config and the backward's (one
``MosaicBackwardConfig`` for both backward designs: ``backward.py``'s row split
at head dims 64 and 128, ``backward_wide.py``'s role split at 256).

``default_config`` reads the user's tuned cache for this GPU first
(``python -m pallas_flash.tuning --backend mosaic``, stored in
``user_cache_path()``, beside the Triton backend's), then the shipped table
for this GPU (``tables/<gpu>.json``, made by the same command with ``--out``),
then falls back to the heuristics below (``heuristic_config``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from pallas_flash.backends.mosaic_gpu.occupancy import SMALL_GRID_CTAS_PER_SM, SMALL_GRID_FORWARD, forward_ctas_per_sm
from pallas_flash.backends.mosaic_gpu.determinism import deterministic_requested
from pallas_flash.backends.mosaic_gpu.tables import SHIPPED_TABLES, TABLES_DIR, shipped_table, user_cache_path
from pallas_flash.backends.triton import config as triton_config
from pallas_flash.backends.triton.config import config_key, gpu_name, seq_bucket

__all__ = [
    "MosaicForwardConfig", "MosaicBackwardConfig", "MosaicConfig", "default_config", "heuristic_config",
    "shipped_table", "SHIPPED_TABLES", "TABLES_DIR", "default_backward", "deterministic_requested",
    "user_cache_path", "config_key", "gpu_name", "smem_bytes", "backward_smem_bytes", "spare_ds_fits", "HEAD_DIMS",
    "WIDE_HEAD_DIMS", "MAX_SMEM_BYTES", "FUSED_DQ_MIN_SEQ", "fused_dq_pays", "FUSED_DQ_LOSES", "grid_forward",
]

HEAD_DIMS = (64, 128, 256)
# Head dims whose backward runs ``backward_wide.py``'s kernels: a warpgroup's dK and dV accumulators for
# 64 keys (2 x 64 x 256 float32) would need 256 registers per thread, so the warpgroups split by role.
WIDE_HEAD_DIMS = (256,)
# Shared memory a CTA may use on sm_90 (227 KiB), less what the kernel keeps beside its tiles
# (barriers, the log-sum-exp staging buffers, Mosaic's own reserve).
MAX_SMEM_BYTES = 227 * 1024 - 4 * 1024
# Rows of one compute warpgroup's query tile: one wgmma M dimension (64) per warpgroup.
BLOCK_Q = 64
# Keys of one compute warpgroup in the backward's dK/dV kernel (the M of its wgmmas), and the rows of
# one CTA of either backward kernel (two compute warpgroups).
BLOCK_KV = 64
# Query rows per step of the backward's dK/dV kernel: 128 halves its Q/dO loads' and barriers' count per row
# (H200, D=64 deterministic, bwd alone: +1-5% at N=1k-16k). At D=128 it fits with two stages but is 13-21% slower
# (16k: 397 vs 466 TFLOP/s non-causal, 349 vs 444 causal): two 64 x 128 float32 score tiles beside the dK/dV accumulators.
BACKWARD_BLOCK_Q = (64, 128)
TILE = 2 * BLOCK_KV


def smem_bytes(block_q: int, block_kv: int, num_stages: int, head_dim: int, dtype: Any, q_buffers: int = 1,
               compute_wgs: int = 2) -> int:
    """Shared memory of the forward's tiles: ``q_buffers`` query tiles per compute warpgroup and the K/V ring."""
    item = jnp.dtype(dtype).itemsize
    return item * head_dim * (compute_wgs * q_buffers * block_q + 2 * num_stages * block_kv)


@dataclasses.dataclass(frozen=True)
class MosaicForwardConfig:
    """Forward kernel: a CTA of two compute warpgroups (``block_q`` query rows each) and one memory warpgroup.

    ``block_kv``: keys per pipeline step (the N of the QK^T wgmma, the K of PV);
    ``num_stages``: K/V blocks in flight in the shared-memory ring;
    ``overlap``: FlashAttention-3's intra-warpgroup overlap (a block's softmax
    runs while the previous block's ``P V`` is on the tensor cores) on top of
    the two warpgroups taking turns; ``False``: each block's products and
    softmax in sequence within a warpgroup;
    ``persistent``: one CTA per SM walking its share of the query tiles, the
    K/V ring running on across them and the next tile's Q loading during this
    one (a second Q buffer per warpgroup); ``False``: one CTA per tile.
    ``compute_wgs``: compute warpgroups per CTA, 2 or 3 (FlashAttention-3's
    choice at D <= 64, where the softmax bounds a block: while one warpgroup
    runs its softmax the other two keep the tensor cores busy). Three take the
    overlapped schedule (the token goes round them) and 160 registers each.
    """

    block_q: int = BLOCK_Q
    block_kv: int = 128
    num_stages: int = 2
    overlap: bool = False
    persistent: bool = False
    compute_wgs: int = 2

    @property
    def q_buffers(self) -> int:
        return 2 if self.persistent else 1

    def __post_init__(self):
        for name in ("block_q", "block_kv", "num_stages", "compute_wgs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"MosaicForwardConfig.{name}={value!r} must be an int")
        if self.block_q != BLOCK_Q:
            raise ValueError(f"MosaicForwardConfig.block_q={self.block_q} must be {BLOCK_Q} (one wgmma M per warpgroup)")
        if self.block_kv not in (64, 128, 192, 256):
            raise ValueError(f"MosaicForwardConfig.block_kv={self.block_kv} must be one of 64, 128, 192, 256")
        for name in ("overlap", "persistent"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MosaicForwardConfig.{name}={getattr(self, name)!r} must be a bool")
        if not 2 <= self.num_stages <= 6:
            raise ValueError(f"MosaicForwardConfig.num_stages={self.num_stages} must be in [2, 6]")
        if self.compute_wgs not in (2, 3):
            raise ValueError(f"MosaicForwardConfig.compute_wgs={self.compute_wgs} must be 2 or 3")
        if self.compute_wgs == 3 and not self.overlap:
            raise ValueError("MosaicForwardConfig.compute_wgs=3 needs overlap=True: taking turns is a schedule for "
                             "two warpgroups")

    def check_fits(self, head_dim: int, dtype: Any) -> None:
        """``ValueError`` when the tiles of this config would not fit in one CTA's shared memory."""
        need = smem_bytes(self.block_q, self.block_kv, self.num_stages, head_dim, dtype, self.q_buffers,
                          self.compute_wgs)
        if need > MAX_SMEM_BYTES:
            raise ValueError(
                f"{self} needs {need} bytes of shared memory at head_dim={head_dim} ({jnp.dtype(dtype).name}), "
                f"more than the {MAX_SMEM_BYTES} available: use a smaller block_kv, fewer num_stages or persistent=False"
            )


def backward_smem_bytes(config: MosaicBackwardConfig, head_dim: int, dtype: Any) -> tuple[int, int]:
    """Shared memory of the backward's tiles: ``(dK/dV kernel, dQ kernel)`` (the dQ kernel's is 0 when dQ is fused)."""
    item = jnp.dtype(dtype).itemsize
    bq, stages = config.block_q, config.num_stages
    if head_dim in WIDE_HEAD_DIMS:  # backward_wide.py: 64-row CTAs, two P tiles, always a separate dQ kernel
        dkdv = item * head_dim * (2 * BLOCK_KV + 2 * stages * bq) + 8 * stages * bq + item * 2 * BLOCK_KV * bq
        bkv = config.dq_block_kv
        dq = item * head_dim * (2 * BLOCK_Q + 2 * config.dq_num_stages * bkv) + 8 * BLOCK_Q + item * 2 * BLOCK_Q * bkv
        return dkdv, dq
    # K and V of the CTA's 128 keys, the Q/dO ring and its lse/delta rows.
    dkdv = item * head_dim * (2 * TILE + 2 * stages * bq) + 8 * stages * bq
    if not config.deterministic:  # two dS^T buffers (in turn), the two warpgroups' float32 dQ halves
        dkdv += item * 2 * TILE * bq + 4 * bq * head_dim
        return dkdv, 0
    # Q and dO of the two warpgroups' 64 rows, the K/V ring, lse/delta rows.
    dq = item * head_dim * (2 * TILE + 2 * config.dq_num_stages * config.dq_block_kv) + 8 * TILE
    return dkdv, dq


def spare_ds_fits(config: MosaicBackwardConfig, head_dim: int, dtype: Any) -> bool:
    """Whether the fused dK/dV kernel can keep a third dS^T buffer, never written, for its first step's dQ
    product (dropped) beside the tiles ``backward_smem_bytes`` counts: every 64-row config, and 128 rows with one
    stage; not 128 rows with two (D=64), whose first product then runs under a condition (``backward_dkdv.py``)."""
    dkdv, _ = backward_smem_bytes(config, head_dim, dtype)
    return dkdv + jnp.dtype(dtype).itemsize * TILE * config.block_q <= MAX_SMEM_BYTES


@dataclasses.dataclass(frozen=True)
class MosaicBackwardConfig:
    """Backward kernels (see ``backward.py``).

    dK/dV kernel: a CTA of two compute warpgroups (64 keys each) and one
    memory warpgroup; ``block_q``: query rows per pipeline step, 64 or 128 (S^T and dP^T
    are 64 x ``block_q`` per warpgroup; with the fused dQ, 128 fits only at D=64); ``num_stages``:
    Q/dO blocks in flight. ``deterministic``: ``True`` computes ``dQ`` in a
    separate kernel (bit-identical reruns; 7 matrix products per block pair),
    whose CTA of two compute warpgroups (64 query rows each) streams
    ``dq_block_kv`` keys per step, ``dq_num_stages`` K/V blocks in flight;
    ``False`` adds ``dQ`` into a float32 buffer by TMA reductions from the
    dK/dV kernel (5 products per block pair; the order of the additions, so the
    last bits of ``dQ``, may vary run to run). A config built by hand is
    deterministic unless it says otherwise; ``default_config`` picks the faster
    mode per call (``fused_dq_pays``) unless ``deterministic_requested()``.
    At head dim 256 (``backward_wide.py``) both kernels are deterministic whatever
    ``deterministic`` says, and ``num_stages``/``dq_num_stages`` are at most 2 (shared memory).
    """

    block_q: int = BLOCK_Q
    num_stages: int = 2
    dq_block_kv: int = 64
    dq_num_stages: int = 3
    deterministic: bool = True

    def __post_init__(self):
        for name in ("block_q", "num_stages", "dq_block_kv", "dq_num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"MosaicBackwardConfig.{name}={value!r} must be an int")
        if not isinstance(self.deterministic, bool):
            raise TypeError(f"MosaicBackwardConfig.deterministic={self.deterministic!r} must be a bool")
        if self.block_q not in BACKWARD_BLOCK_Q:
            raise ValueError(f"MosaicBackwardConfig.block_q={self.block_q} must be one of {BACKWARD_BLOCK_Q}")
        if self.dq_block_kv not in (64, 128):
            raise ValueError(f"MosaicBackwardConfig.dq_block_kv={self.dq_block_kv} must be 64 or 128")
        for name in ("num_stages", "dq_num_stages"):
            if not 1 <= getattr(self, name) <= 4:
                raise ValueError(f"MosaicBackwardConfig.{name}={getattr(self, name)} must be in [1, 4]")

    def check_fits(self, head_dim: int, dtype: Any) -> None:
        """``ValueError`` when a kernel's tiles would not fit in one CTA's shared memory (or, at head dim 256,
        ``block_q`` is not the wide kernels' 64 rows)."""
        if head_dim in WIDE_HEAD_DIMS and self.block_q != BLOCK_Q:
            raise ValueError(f"{self}: at head_dim={head_dim} the backward takes block_q={BLOCK_Q}")
        for kernel, need in zip(("dK/dV", "dQ"), backward_smem_bytes(self, head_dim, dtype)):
            if need > MAX_SMEM_BYTES:
                raise ValueError(
                    f"{self} needs {need} bytes of shared memory in the {kernel} kernel at head_dim={head_dim} "
                    f"({jnp.dtype(dtype).name}), more than the {MAX_SMEM_BYTES} available: use fewer stages"
                )


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """The Mosaic backend's config: its forward and backward kernels'."""

    fwd: MosaicForwardConfig = MosaicForwardConfig()
    bwd: MosaicBackwardConfig = MosaicBackwardConfig()

    def __post_init__(self):
        if not isinstance(self.fwd, MosaicForwardConfig):
            raise TypeError(f"MosaicConfig.fwd must be a MosaicForwardConfig, got {type(self.fwd).__name__}")
        if not isinstance(self.bwd, MosaicBackwardConfig):
            raise TypeError(f"MosaicConfig.bwd must be a MosaicBackwardConfig, got {type(self.bwd).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"fwd": ..., "bwd": ...}``, each the config's fields."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in _PARTS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MosaicConfig:
        """The inverse of ``to_dict`` (``TypeError``/``ValueError`` naming the part for a malformed dict)."""
        if not isinstance(d, dict):
            raise TypeError(f"MosaicConfig.from_dict needs a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_PARTS))
        missing = [name for name in _PARTS if name not in d]
        if unknown or missing:
            raise ValueError(
                f"MosaicConfig.from_dict needs the keys {list(_PARTS)}: missing {missing}, unknown {unknown}"
            )
        return cls(**{name: _part_from_dict(part, name, d[name]) for name, part in _PARTS.items()})


# The parts of a ``MosaicConfig`` by field name, as ``to_dict`` writes them.
_PARTS = {"fwd": MosaicForwardConfig, "bwd": MosaicBackwardConfig}


def _part_from_dict(part: type, name: str, fields: Any):
    if not isinstance(fields, dict):
        raise TypeError(f"MosaicConfig.from_dict: {name!r} must be a dict of {part.__name__} fields, got {fields!r}")
    known = {f.name for f in dataclasses.fields(part)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"MosaicConfig.from_dict: {name!r} has fields {unknown} that {part.__name__} does not have")
    return part(**fields)


# Key lengths from which the D<=64 forward's heuristic takes three compute warpgroups (``_default_forward``).
THREE_WARPGROUPS_MIN_KEYS = 4096
THREE_WARPGROUPS_MIN_KEYS_CAUSAL = 4096


def _two_warpgroup_d64_forward(causal: bool, seq_k: int) -> MosaicForwardConfig:
    block_kv, stages = (128, 3) if causal and seq_k <= 2048 else (256, 2)
    return MosaicForwardConfig(block_kv=block_kv, num_stages=stages, persistent=True)


def _default_forward(head_dim: int, dtype: Any, causal: bool, seq_k: int) -> MosaicForwardConfig:
    """The forward's heuristic, from sweeps on an H200 (bf16, B*N = 16k tokens, N = 1k/4k/16k, 2026-12-01).

    - D=64: persistent, 256-key blocks in two stages (causal over <= 2k keys: 128-key blocks in three);
      no overlap, which was 5-25% slower at every point (the softmax, not the tensor cores, bounds a
      block). Persistent over one CTA per tile: 332 -> 407 TFLOP/s at N=1k non-causal, 422 -> 443 at 4k,
      438 -> 465 at 16k; causal 239 -> 304 at 1k (128 x 3), 332 -> 387 at 4k, 429 -> 437 at 16k.
      Long keys take three compute warpgroups (NOTES 63; H200, 2026-12-03, against the two-warpgroup default
      in the same rounds): non-causal from 4k keys, persistent (4k: 444 vs 436 TFLOP/s, 16k: 475 vs 448; 1k:
      381 vs 394), causal from 4k keys, one CTA per tile (16k: 433 vs 415; 4k: 361 vs 351 over 7 rounds,
      NOTES 64; 2k: 310 vs 323; 1k: 217 vs 289).
    - D=128 non-causal: overlap, persistent (1k: 522 vs 506; 4k: 623 vs 593; 16k: 610 vs 613).
    - D=128 causal: one CTA per tile (persistent: 536 vs 581-625 at 16k, its tiles' order costing L2 reuse),
      overlap but over <= 1k keys (16k: 625 vs 592; 4k: 549 vs 509; 1k: 345 vs 379).
    - D=256: overlap (4k: 629-674 vs 589-602 non-causal, 546 vs 523 causal), 64-key blocks, one CTA per tile
      (a second Q buffer does not fit).

    On the H200 the shipped table (``tables/h200.json``, tuned 2026-12-04, NOTES 65 and 68) supersedes these at its
    buckets (N 1k/4k/16k, D 64/128; D=256 at 4k). Where they disagree the table holds the later measurement, in
    interleaved rounds against this heuristic's pick: D=64 causal 16k 256 x 3 one CTA per tile (434 vs 426
    TFLOP/s); D=128 non-causal 16k one CTA per tile (587 vs 573), causal 4k taking turns (a tie, 477 vs 477).
    Three of the tuner's picks lost in 7 rounds in their own process and went back to these rules (NOTES 68).
    Lengths between the buckets keep the rules above. A causal three-warpgroup pick over a small grid gives way to a
    persistent two-warpgroup forward in ``default_config`` (``occupancy.py``: the rules above were timed at 32 heads).
    """
    if head_dim <= 64:
        if seq_k >= (THREE_WARPGROUPS_MIN_KEYS_CAUSAL if causal else THREE_WARPGROUPS_MIN_KEYS):
            return MosaicForwardConfig(block_kv=128, num_stages=2, overlap=True, persistent=not causal, compute_wgs=3)
        return _two_warpgroup_d64_forward(causal, seq_k)
    overlap = not (causal and seq_k <= 1024)
    persistent = not causal
    for block_kv, stages in ((128, 3), (128, 2), (64, 2)):
        for persist in dict.fromkeys((persistent, False)):
            cfg = MosaicForwardConfig(block_kv=block_kv, num_stages=stages, overlap=overlap, persistent=persist)
            if smem_bytes(cfg.block_q, block_kv, stages, head_dim, dtype, cfg.q_buffers) <= MAX_SMEM_BYTES:
                return cfg
    return MosaicForwardConfig(block_kv=64, num_stages=2, overlap=overlap)


# From these lengths on (query and key length both), by (head dim, causal), the default backward adds dQ by TMA
# reduce-add from the dK/dV kernel (``deterministic=False``): 5 matrix products per block pair against 7, worth more
# than the reductions' cost only at long lengths; a pair not listed never does. H200, bf16, B*N = 16k tokens,
# forward+backward TFLOP/s, deterministic against fused:
# - D=128 (``results/nvidia-h200/2026-12-03-dq-mode-sweep.md``): N=16k 491/513 non-causal and 480/509 causal, 8k
#   485/482 and 447/460, 4k 469/469 and 405/418, 2k 446/445 and 353/353 (8k non-causal again, 8 interleaved
#   rounds: 463/464, ``2026-12-03-thresholds.log``).
# - D=64 non-causal, the fused mode with 128-row steps (``2026-12-03-rows128.log``, backward alone, 3 interleaved
#   rounds, deterministic/fused with 64-row steps/fused with 128-row steps/cuDNN): 1k 305/305/338/298, 4k
#   347/371/412/389, 16k 360/396/453/427. (With 64-row steps it had paid from 4k: ``2026-12-03-thresholds.log``.)
# - D=64 causal: never (below).
FUSED_DQ_MIN_SEQ = {(128, False): 8192, (128, True): 8192, (64, False): 1024}
# Where the fused dQ loses even at long lengths (``fused_dq_pays``), H200, bf16, 2026-12-03
# (``results/nvidia-h200/2026-12-03-{headline,masks,gqa}-d23057d.md``, ``2026-12-03-d64-dq-modes.log``), deterministic
# against fused TFLOP/s: D=64 causal, backward alone, N=4k 335/315, 8k 365/348, 16k 380/380 (non-causal 16k
# 378/408); GQA 32:8, D=128, 8k causal, forward+backward 454/425; at 16k causal D=128 with a window of 256 keys
# 184/133, of 4096 keys 440/361, packed documents (segment ids) 338/276. Padding (lengths) is unmeasured and goes
# with them (a guess: the same per-block bookkeeping of bounds as the others). Position offsets (ring attention's
# chunks, causal across two chunks) keep the length rule: they only move the causal diagonal.
FUSED_DQ_LOSES = frozenset({"window", "segments", "lengths"})


def _plain_mha(kv_groups: int, features: frozenset[str]) -> bool:
    """One query head per K/V head and none of ``FUSED_DQ_LOSES``: the calls where the fused dQ can pay, and the
    only ones the tuner times."""
    return kv_groups == 1 and not features & FUSED_DQ_LOSES


def fused_dq_pays(
    head_dim: int, seq_q: int, seq_k: int, *, causal: bool, kv_groups: int = 1,
    features: frozenset[str] = frozenset(),
) -> bool:
    """Whether the default backward fuses dQ into the dK/dV kernel (TMA reduce-add; not deterministic): both lengths
    at least ``FUSED_DQ_MIN_SEQ[head_dim, causal]`` (head dim 128; 64 without the causal mask), one query head per
    K/V head (``kv_groups`` = query heads / K/V heads) and none of ``FUSED_DQ_LOSES`` in ``features``."""
    min_seq = FUSED_DQ_MIN_SEQ.get((head_dim, bool(causal)))
    return (
        min_seq is not None
        and min(seq_q, seq_k) >= min_seq
        and _plain_mha(kv_groups, features)
    )


def default_backward(
    head_dim: int, dtype: Any, seq_q: int, seq_k: int, *, causal: bool = False, kv_groups: int = 1,
    features: frozenset[str] = frozenset(), deterministic: bool | None = None,
) -> MosaicBackwardConfig:
    """The backward's heuristic config. ``deterministic``: ``None`` picks the mode, the fused dQ where
    ``fused_dq_pays`` for the call (``causal``, ``kv_groups``, ``features``) unless ``deterministic_requested()``;
    ``True``/``False`` force it (at head dim 256 it is always deterministic).

    - The fused mode: two stages; 64-row steps at D=128 (three stages or 128 rows do not fit), 128 at D=64 (H200,
      non-causal, bwd alone: +11-14% over 64 rows at N=1k-16k; causal level, 304/307 at 4k).
    - The deterministic mode (see ``MosaicBackwardConfig``), D=128: two Q/dO stages, dQ kernel 64 keys x 3 stages
      (H200, N=4k: 498 TFLOP/s fwd+bwd vs 441 with three Q/dO stages, 470 with 64 x 2 and 472 with 128 x 2 dQ
      blocks). D=64: 128 query rows x three Q/dO stages (bwd alone, 2026-12-01: N=16k 379/380 TFLOP/s
      non-causal/causal vs 366/360 with 64 rows, 4k 362/334 vs 356/319, 1k 309/234 vs 301/222), dQ kernel
      128 keys x 2 stages (361/334 TFLOP/s fwd+bwd vs 338/319 with 64 x 3).
    - D=256: two stages in both kernels, 64-key dQ blocks (the most that fit).
    """
    if head_dim in WIDE_HEAD_DIMS:
        return MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=2, deterministic=True)
    if deterministic is None:
        deterministic = deterministic_requested() or not fused_dq_pays(
            head_dim, seq_q, seq_k, causal=causal, kv_groups=kv_groups, features=features)
    if not deterministic:
        return MosaicBackwardConfig(block_q=128 if head_dim <= 64 else BLOCK_Q, num_stages=2, deterministic=False)
    if head_dim <= 64:
        return MosaicBackwardConfig(block_q=128, num_stages=3, dq_block_kv=128, dq_num_stages=2, deterministic=True)
    return MosaicBackwardConfig(num_stages=2, dq_block_kv=64, dq_num_stages=3, deterministic=True)


def _checked(entry: dict, head_dim: int, dtype: Any, what: str, hint: str = "") -> MosaicConfig:
    """``entry`` as a ``MosaicConfig`` whose tiles fit; else ``ValueError``: ``{what} is invalid (why){hint}``."""
    try:
        cfg = MosaicConfig.from_dict(entry)
        cfg.fwd.check_fits(head_dim, dtype)
        cfg.bwd.check_fits(head_dim, dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is invalid ({e}){hint}") from e
    return cfg


def _bucket_entry(table: dict, head_dim: int, dtype: Any, causal: bool, seq_q: int, seq_k: int):
    """``(key, entry)`` of a tuned table for this call, or None: only at a tuned bucket, and only when both lengths
    fall in it (tables are timed at Tq = Tk = the bucket); fp16 takes bf16's entries (the same tile bytes). Other
    lengths take the heuristics: a 16k entry's fused dQ at 512 keys would change the backward's mode, not only its
    speed. An entry holds for its whole bucket (N/2 < length <= N), so its mode does too: the H200's and H100's
    D=64 non-causal 1k entries fuse dQ from 513 keys, where the heuristic (``FUSED_DQ_MIN_SEQ``) starts at 1k."""
    if seq_bucket(seq_q) != seq_bucket(seq_k):
        return None
    return triton_config.lookup(table, head_dim, dtype, causal, seq_q, nearest=False)


def _user_entry(head_dim: int, dtype: Any, causal: bool, seq_q: int, seq_k: int, gpu: str) -> MosaicConfig | None:
    """The user cache's config for this call (``_bucket_entry``'s rule, as the shipped table's), validated.

    An entry that does not make a ``MosaicConfig`` whose tiles fit raises ``ValueError`` naming the file and
    key: a stale or hand-edited cache should be fixed (or deleted), not silently ignored.
    """
    path = user_cache_path()
    found = _bucket_entry(triton_config.read_user_table(path, gpu), head_dim, dtype, causal, seq_q, seq_k)
    if found is None:
        return None
    key, entry = found
    return _checked(entry, head_dim, dtype, f"the tuned Mosaic config for {gpu!r}, {key} in {path}",
                    "; rerun `python -m pallas_flash.tuning --backend mosaic` or delete that file")


def _shipped_entry(head_dim: int, dtype: Any, causal: bool, seq_q: int, seq_k: int, gpu: str) -> MosaicConfig | None:
    """The shipped entry for this call (``_bucket_entry``'s rule). An entry that does not make a fitting
    ``MosaicConfig`` raises ``ValueError`` (a packaging mistake; the tests read every entry)."""
    found = _bucket_entry(shipped_table(gpu), head_dim, dtype, causal, seq_q, seq_k)
    if found is None:
        return None
    key, entry = found
    return _checked(entry, head_dim, dtype, f"the shipped Mosaic table for {gpu!r}, entry {key}")


# Features under which a row may see no key, or a key block needs its own bounds (``AttentionSpec.features`` keys).
# With any of them the D=128 forward takes turns instead of overlapping: the window's extra masked loop made
# ptxas serialize the overlap's wgmmas (C7513) and spill (H200, D=128, 16k causal, 2026-12-02: window 4096
# 512 TFLOP/s taking turns vs 360 overlapped; packed documents 339 vs 303; a padded batch 429 vs 411).
TURN_TAKING_FEATURES = frozenset({"window", "lengths", "segments"})
# Segment ids at D=64: 128-key blocks in three stages. Masking a 256-key block by id spilled 432 bytes of
# registers (H200, packed documents, 16k causal, 2026-12-02: 124 TFLOP/s with 256 x 2, 235 with 128 x 3).
SEGMENTS_D64_FORWARD = dict(block_kv=128, num_stages=3)


def grid_forward(fwd: MosaicForwardConfig, *, causal: bool, seq_q: int, batch_heads: int | None,
                 head_dim: int = 64) -> MosaicForwardConfig:
    """``fwd``, or ``occupancy.SMALL_GRID_FORWARD`` where ``fwd`` is a causal three-warpgroup forward with one CTA per
    tile whose grid gives each SM fewer than ``SMALL_GRID_CTAS_PER_SM`` CTAs (``batch_heads``: batch x query heads;
    ``None``: not known, ``fwd``). At head dims up to 64 only: the rule and its forward were measured there (at
    D=128 its 128-key blocks in three stages do not fit, and the small grids showed no tail, NOTES 71)."""
    if (head_dim <= 64 and causal and fwd.compute_wgs == 3 and not fwd.persistent and batch_heads is not None
            and forward_ctas_per_sm(batch_heads, seq_q, fwd.compute_wgs * fwd.block_q) < SMALL_GRID_CTAS_PER_SM):
        return MosaicForwardConfig(**SMALL_GRID_FORWARD)
    return fwd


def heuristic_config(
    *, head_dim: int, dtype: Any, causal: bool, seq_q: int, seq_k: int, features: frozenset[str] = frozenset(),
    kv_groups: int = 1, deterministic: bool | None = None,
) -> MosaicConfig:
    """The heuristics' config, before the features' adjustments: ``_default_forward`` and ``default_backward``
    (``deterministic`` as there: ``None`` picks the backward's mode)."""
    bwd = default_backward(head_dim, dtype, seq_q, seq_k, causal=causal, kv_groups=kv_groups, features=features,
                           deterministic=deterministic)
    return MosaicConfig(fwd=_default_forward(head_dim, dtype, causal, seq_k), bwd=bwd)


def default_config(
    *, head_dim: int, dtype: Any, causal: bool, seq_q: int, seq_k: int, gpu: str | None = None,
    features: frozenset[str] = frozenset(), kv_groups: int = 1, batch_heads: int | None = None,
) -> MosaicConfig:
    """The config used when the caller passes none.

    The user's tuned cache for this GPU (``user_cache_path()``; ``gpu`` defaults to ``gpu_name()``), else the
    shipped table's entry (each at its bucket only, both lengths in it: ``_bucket_entry``), else the forward's
    (head dim, dtype, mask and, for the overlap, the key length) and backward's (``default_backward``) heuristics.
    The backward is deterministic under ``deterministic_requested()`` and where ``fused_dq_pays`` says no; where a
    tuned fused entry (timed on plain MHA) meets the first, GQA (``kv_groups`` > 1) or one of ``FUSED_DQ_LOSES``,
    the heuristic's deterministic backward replaces it (the fused entry's blocks say nothing of the dQ kernel's).
    ``features`` (the call's ``AttentionSpec.features`` keys; the tuner times plain and causal MHA calls only):
    with one of ``TURN_TAKING_FEATURES`` the D=128 forward takes turns, and with segment ids the D=64 forward
    takes ``SEGMENTS_D64_FORWARD`` blocks, tuned or not; with any feature a three-warpgroup forward (timed
    without them) gives way to the two-warpgroup heuristic. ``batch_heads`` (batch x query heads; ``None``: not
    known): a causal three-warpgroup forward with one CTA per tile whose grid gives each SM fewer than
    ``SMALL_GRID_CTAS_PER_SM`` CTAs takes ``occupancy.SMALL_GRID_FORWARD``.
    """
    gpu = gpu_name() if gpu is None else gpu
    config = None
    if gpu:
        config = _user_entry(head_dim, dtype, causal, seq_q, seq_k, gpu)
        if config is None:
            config = _shipped_entry(head_dim, dtype, causal, seq_q, seq_k, gpu)
    if config is None:
        config = heuristic_config(head_dim=head_dim, dtype=dtype, causal=causal, seq_q=seq_q, seq_k=seq_k,
                                  features=features, kv_groups=kv_groups)
    elif not config.bwd.deterministic and (deterministic_requested() or not _plain_mha(kv_groups, features)):
        bwd = default_backward(head_dim, dtype, seq_q, seq_k, causal=causal, deterministic=True)
        config = dataclasses.replace(config, bwd=bwd)
    if config.fwd.compute_wgs == 3 and features:
        # three warpgroups were timed on plain and causal calls only: the measured two-warpgroup forward (a tuned
        # cache may hold a D=128 one: then the D=128 heuristic's, which has two)
        two = _two_warpgroup_d64_forward(causal, seq_k) if head_dim <= 64 else _default_forward(
            head_dim, dtype, causal, seq_k)
        config = dataclasses.replace(config, fwd=two)
    if head_dim == 128 and config.fwd.overlap and features & TURN_TAKING_FEATURES:
        config = dataclasses.replace(config, fwd=dataclasses.replace(config.fwd, overlap=False))
    config = dataclasses.replace(config, fwd=grid_forward(config.fwd, causal=causal, seq_q=seq_q,
                                                          batch_heads=batch_heads, head_dim=head_dim))
    if head_dim <= 64 and "segments" in features and config.fwd.block_kv > SEGMENTS_D64_FORWARD["block_kv"]:
        config = dataclasses.replace(config, fwd=dataclasses.replace(config.fwd, **SEGMENTS_D64_FORWARD))
    return config
