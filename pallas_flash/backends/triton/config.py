"""The Triton backend's block configs: the one place they live.

Each pass has one small frozen config (block sizes, warps, pipelining stages).
``default_config`` picks one per shape and GPU: the user's tuned table
(``python -m pallas_flash.tuning --backend triton``, in the user cache
directory), then the shipped table for this GPU (``tables/*.json``, tuned with
that command's ``--print-json``), then a heuristic. Tuning only ever happens
in that explicit command, never inside a user's ``jit``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from typing import Any

import jax

__all__ = [
    "ForwardConfig",
    "BackwardConfig",
    "FlashConfig",
    "default_config",
    "user_cache_path",
]


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _check_blocks(**blocks: int) -> None:
    for name, value in blocks.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name}={value!r} must be an int")
        if not _is_pow2(value) or value < 16:
            raise ValueError(f"{name}={value} must be a power of two >= 16")


def _check_launch(**fields: int) -> None:
    """``num_warps*`` and ``num_stages*`` fields, by their names."""
    for name, value in fields.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name}={value!r} must be an int")
        if name.startswith("num_warps") and value not in (1, 2, 4, 8, 16):
            raise ValueError(f"{name}={value} must be one of 1, 2, 4, 8, 16")
        if name.startswith("num_stages") and not 1 <= value <= 8:
            raise ValueError(f"{name}={value} must be in [1, 8]")


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """Forward pass: one program per (query block, batch, head)."""

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        _check_blocks(block_q=self.block_q, block_k=self.block_k)
        _check_launch(num_warps=self.num_warps, num_stages=self.num_stages)


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """Backward pass.

    The dK/dV kernel runs one program per (key block of ``block_k_dkv`` rows,
    batch, KV head) and loops over query blocks of ``block_q_dkv``; the dQ
    kernel runs one program per (query block of ``block_q_dq``, batch, head)
    and loops over key blocks of ``block_k_dq``.
    """

    block_q_dkv: int = 64
    block_k_dkv: int = 128
    block_q_dq: int = 128
    block_k_dq: int = 64
    num_warps_dkv: int = 8
    num_stages_dkv: int = 2
    num_warps_dq: int = 8
    num_stages_dq: int = 2

    def __post_init__(self):
        _check_blocks(
            block_q_dkv=self.block_q_dkv,
            block_k_dkv=self.block_k_dkv,
            block_q_dq=self.block_q_dq,
            block_k_dq=self.block_k_dq,
        )
        _check_launch(num_warps_dkv=self.num_warps_dkv, num_stages_dkv=self.num_stages_dkv,
                      num_warps_dq=self.num_warps_dq, num_stages_dq=self.num_stages_dq)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Forward and backward configs together, as ``flash_attention`` takes them."""

    fwd: ForwardConfig = ForwardConfig()
    bwd: BackwardConfig = BackwardConfig()

    def __post_init__(self):
        for name, value, want in (("fwd", self.fwd, ForwardConfig), ("bwd", self.bwd, BackwardConfig)):
            if not isinstance(value, want):
                raise TypeError(f"FlashConfig.{name} must be a {want.__name__}, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {"fwd": dataclasses.asdict(self.fwd), "bwd": dataclasses.asdict(self.bwd)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlashConfig":
        return cls(fwd=ForwardConfig(**d["fwd"]), bwd=BackwardConfig(**d["bwd"]))


def seq_bucket(n: int) -> int:
    """Sequence-length bucket used as a lookup key: the next power of two, 512 to 32768."""
    b = 512
    while b < n and b < 32768:
        b *= 2
    return b


def padded_head_dim(d: int) -> int:
    """The head dim the kernels' tiles use: the next power of two, at least 16 (also the table key)."""
    p = 16
    while p < d:
        p *= 2
    return p


# Shipped tables, tuned with ``python -m pallas_flash.tuning --backend triton --print-json``: the
# first whose name occurs in the GPU's device_kind applies. Keys: ``config_key``.
_SHIPPED_TABLES = {"H100": "h100.json", "H200": "h200.json"}
_TABLES_DIR = pathlib.Path(__file__).parent / "tables"


def heuristic_config(head_dim: int, dtype: Any) -> FlashConfig:
    """For GPUs and shapes no table covers, and the tuner's starting point (no table read): the H100 winners by head
    dim, smaller tiles where they would not fit."""
    d = padded_head_dim(head_dim)
    itemsize = jax.numpy.dtype(dtype).itemsize
    if itemsize >= 4 or d > 128:
        # fp32 operands or 256-wide heads double the shared memory of every tile.
        fwd = ForwardConfig(block_q=64, block_k=32, num_warps=4, num_stages=2)
        bwd = BackwardConfig(32, 64, 64, 32, 4, 2, 4, 2)
    elif d <= 64:
        fwd = ForwardConfig(block_q=128, block_k=64, num_warps=4, num_stages=3)
        bwd = BackwardConfig(64, 64, 128, 64, 4, 3, 8, 3)
    else:
        fwd = ForwardConfig(block_q=128, block_k=128, num_warps=8, num_stages=3)
        bwd = BackwardConfig(64, 128, 128, 64, 8, 3, 8, 3)
    return FlashConfig(fwd, bwd)


def user_cache_path() -> pathlib.Path:
    """Where ``python -m pallas_flash.tuning --backend triton`` stores configs tuned on this machine."""
    root = os.environ.get("PALLAS_FLASH_CACHE_DIR")
    if root:
        return pathlib.Path(root) / "tuned.json"
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return pathlib.Path(xdg) / "pallas_flash" / "tuned.json"


def config_key(head_dim: int, dtype: Any, causal: bool, seq_q: int) -> str:
    """The lookup key of one tuned config: padded head dim, dtype, causal, sequence bucket."""
    return f"d{padded_head_dim(head_dim)}|{jax.numpy.dtype(dtype).name}|causal={bool(causal)}|n{seq_bucket(seq_q)}"


def read_table_file(path: pathlib.Path, gpu: str | None = None) -> dict[str, Any]:
    """The JSON object of a tuned table (``{config_key: config dict}``) or, with ``gpu``, of a tuned cache
    (``{gpu name: {config_key: config dict}}``, whose ``gpu`` section must be an object too); ``{}`` for a missing
    file. ``ValueError`` (``"<path> is not ..."``) for a file that is not one (truncated, hand-edited)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or (gpu is not None and not isinstance(data.get(gpu, {}), dict)):
        what = "{gpu name: {config key: config}}" if gpu is not None else "{config key: config}"
        raise ValueError(f"{path} is not a JSON object of {what}"
                         + (f" (its entry for {gpu!r} or the file itself is not an object)" if gpu is not None else ""))
    return data


@functools.cache
def read_user_table(path: pathlib.Path, gpu: str) -> dict[str, dict[str, Any]]:
    """This GPU's entries of a tuned cache (``read_table_file``; this backend's or the Mosaic backend's); a missing
    file has none. Read once per process. A file that is not such a JSON object raises ``ValueError`` naming it:
    its tuned configs would otherwise be dropped without a word, as an invalid entry would not be
    (``default_config``)."""
    try:
        return read_table_file(path, gpu).get(gpu, {})
    except ValueError as e:
        raise ValueError(f"the tuned cache {e}; fix or delete that file (`python -m pallas_flash.tuning` writes it "
                         "anew)") from None


@functools.cache
def _shipped_table(gpu: str) -> dict[str, dict[str, Any]]:
    for name, file in _SHIPPED_TABLES.items():
        if name in gpu:
            path = _TABLES_DIR / file
            return json.loads(path.read_text()) if path.exists() else {}
    return {}


def lookup(table: dict[str, dict[str, Any]], head_dim: int, dtype: Any, causal: bool, seq_q: int,
           *, nearest: bool = True) -> tuple[str, dict[str, Any]] | None:
    """``(key, entry)``: the exact key, else (``nearest``) the nearest sequence bucket's; fp16 uses bf16's entries
    (same tile bytes). The key is the one found, so an error about the entry can name what the file holds."""
    dtypes = [jax.numpy.dtype(dtype).name]
    if dtypes[0] == "float16":
        dtypes.append("bfloat16")
    for dt in dtypes:
        key = config_key(head_dim, dt, causal, seq_q)
        if table.get(key) is not None:
            return key, table[key]
        if not nearest:
            continue
        prefix = key.rsplit("|", 1)[0] + "|n"
        buckets = {k: k[len(prefix):] for k in table if k.startswith(prefix)}  # a hand-edited "n1k" is no bucket
        near = sorted(
            (abs(math.log2(int(n) / seq_bucket(seq_q))), k) for k, n in buckets.items() if n.isdigit() and int(n) > 0
        )
        if near:
            return near[0][1], table[near[0][1]]
    return None


def gpu_name() -> str:
    """The name of the first GPU (``""`` when there is none)."""
    try:
        devs = jax.devices("gpu")
    except RuntimeError:
        return ""
    return devs[0].device_kind if devs else ""


def gpu_capability() -> str:
    """The first GPU's compute capability (``"9.0"``; ``""`` when there is none)."""
    try:
        devs = jax.devices("gpu")
    except RuntimeError:
        return ""
    return str(getattr(devs[0], "compute_capability", "")) if devs else ""


def default_config(
    *, head_dim: int, dtype: Any, causal: bool, seq_q: int, seq_k: int, gpu: str | None = None
) -> FlashConfig:
    """The block config used when the caller passes none.

    Order: the user's tuned cache for this GPU (``python -m pallas_flash.tuning``),
    then the shipped table for this GPU, then a heuristic by head dim and dtype.
    Tables are read once per process; nothing is tuned here.
    """
    gpu = gpu_name() if gpu is None else gpu
    if gpu:
        for source, table in (("the tuned cache " + str(user_cache_path()), read_user_table(user_cache_path(), gpu)),
                              ("the shipped table", _shipped_table(gpu))):
            found = lookup(table, head_dim, dtype, causal, seq_q)
            if found is None:
                continue
            key, entry = found
            try:
                return FlashConfig.from_dict(entry)
            except (KeyError, TypeError, ValueError) as e:  # a stale or hand-edited entry: to be fixed, not ignored
                raise ValueError(
                    f"{source} holds an invalid Triton config for {gpu!r} at {key} (looked up for "
                    f"{config_key(head_dim, dtype, causal, seq_q)}; {type(e).__name__}: {e}); rerun "
                    "`python -m pallas_flash.tuning` or delete that file") from None
    return heuristic_config(head_dim, dtype)
