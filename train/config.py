"""Configuration of a training run: ``TrainConfig``, the presets, the command line.

Also what depends on the platform: the attention backend ``auto`` picks, the
compute dtype, and the peak FLOP/s that MFU divides by.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax

from models import gpt2

ATTENTION_CHOICES = ("auto", "pallas", "triton", "mosaic", "xla", "cudnn")

#: Dense bf16 peak FLOP/s by a substring of ``device.device_kind``, the first match wins (so the PCIe and NVL
#: H100s and the NVL H200, with lower clocks or fewer SMs than the SXM parts, come before "H200" and "H100").
#: NVIDIA's data sheets.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM, and GH200
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. ``RUN_DEFAULTS`` fills in what the command line leaves out."""

    config: str = "tiny"  # model preset, see models.gpt2.PRESETS
    attention: str = "auto"  # auto | pallas | triton | mosaic | xla | cudnn (pallas_flash backends by name)
    seq_len: int = 128
    batch_size: int = 16  # global sequences per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    context_parallel: int = 1  # devices each sequence is sharded over (ring attention), see train.parallel
    steps: int = 600  # optimizer steps
    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 50  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW, on matrices/embeddings only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global-norm clipping
    dtype: str = "auto"  # compute dtype: auto = bfloat16 on GPU, float32 on CPU
    data: str | None = None  # None = the stdlib default, see train.data
    vocab_size: int | None = None  # for .bin token files (default 50304)
    out: str = "out/tiny"
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 200
    seed: int = 0
    sample_tokens: int = 200


#: Per-preset defaults for the fields the command line did not set.
RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        seq_len=128, batch_size=16, grad_accum=1, steps=600, lr=2e-3, warmup=50,
        eval_every=100, checkpoint_every=200, log_every=10,
    ),
    "gpt2": dict(
        seq_len=1024, batch_size=16, grad_accum=1, steps=2000, lr=6e-4, warmup=100,
        eval_every=250, checkpoint_every=500, log_every=10,
    ),
    "gpt2-medium": dict(
        seq_len=1024, batch_size=8, grad_accum=2, steps=2000, lr=3e-4, warmup=100,
        eval_every=250, checkpoint_every=500, log_every=10,
    ),
}

#: What ``--resume`` may change; everything else must match the checkpoint.
RESUMABLE_OVERRIDES = frozenset(
    {"steps", "attention", "eval_every", "eval_batches", "log_every", "checkpoint_every",
     "sample_tokens", "out", "context_parallel"}
)


def _checked(parse: Callable[[str], Any], test: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: ``parse`` the text, then the value must pass ``test`` ("must be a ``what``")."""

    def convert(text: str):
        value = parse(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be a {what}, got {text}")
        return value

    convert.__name__ = what  # argparse's message for text that does not parse: "invalid <what> value"
    return convert


_positive_int = _checked(int, lambda v: v > 0, "positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, "non-negative integer")
# jax.random.key takes 32 bits: key(2**32) is key(0), and 2**64 fails after the run folder is written.
SEED_LIMIT = 2**32
_seed = _checked(int, lambda v: 0 <= v < SEED_LIMIT, "non-negative integer below 2**32")
# Finite: an infinite or NaN learning rate, decay or clip turns the loss into NaN.
_positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "positive finite number")
_non_negative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "non-negative finite number")
# An unset shell variable gives "": --out would fall back to the default run folder, --data to the working directory.
_path = _checked(str, lambda v: bool(v.strip()), "non-empty path")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train GPT-2 with pallas_flash attention (see the docstring of train/__init__.py).",
        argument_default=argparse.SUPPRESS,  # only explicit flags override defaults
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # else --step 70 would be taken as --steps 70
    )
    p.add_argument("--config", choices=sorted(gpt2.PRESETS),
                   help="model preset (default: gpt2 with a GPU, tiny without)")
    p.add_argument("--attention", choices=ATTENTION_CHOICES,
                   help="attention backend; auto = pallas on GPU, xla on CPU (default: auto); pallas = the pallas_flash "
                        "kernels (per pass the fastest for this GPU), triton/mosaic = one of their backends")
    p.add_argument("--seq-len", type=_positive_int, help="tokens per sequence (tiny 128, gpt2 1024)")
    p.add_argument("--batch-size", type=_positive_int,
                   help="global sequences per micro-step, divisible by the device count (tiny 16, gpt2 16)")
    p.add_argument("--grad-accum", type=_positive_int, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--context-parallel", type=_positive_int, metavar="N",
                   help="shard each sequence over N devices (ring attention, zigzag order; the mesh is "
                   "devices // N data x N seq); --seq-len must divide by 2N; needs the Pallas kernels (default 1)")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps in total (tiny 600, gpt2 2000)")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate (tiny 2e-3, gpt2 6e-4)")
    p.add_argument("--warmup", type=_non_negative_int,
                   help="warm-up steps (default: min(preset's, steps // 10); tiny 50, gpt2 100)")
    p.add_argument("--weight-decay", type=_non_negative_float, help="AdamW weight decay (default 0.1)")
    p.add_argument("--grad-clip", type=_positive_float, help="global-norm clip (default 1.0)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"),
                   help="compute dtype; auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--data", type=_path, help="text file/folder (bytes) or folder with train.bin/val.bin "
                   "(uint16 tokens); default: the Python stdlib's sources")
    p.add_argument("--vocab-size", type=_positive_int, help="vocabulary of .bin token data (default 50304)")
    p.add_argument("--out", type=_path, help="run folder for metrics and checkpoints (default out/<config>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--eval-every", type=_non_negative_int, help="steps between evaluations, 0 = only at the end")
    p.add_argument("--eval-batches", type=_positive_int, help="validation batches per evaluation (default 8)")
    p.add_argument("--log-every", type=_positive_int, help="steps between metric records (default 10)")
    p.add_argument("--checkpoint-every", type=_non_negative_int,
                   help="steps between checkpoints, 0 = only at the end (tiny 200, gpt2 500)")
    p.add_argument("--seed", type=_seed, help="initialisation, data order and dropout seed (default 0)")
    p.add_argument("--sample-tokens", type=_non_negative_int, help="length of the final text sample (default 200)")
    p.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host data parallel)")
    return p


def make_config(overrides: dict[str, Any], *, has_gpu: bool) -> TrainConfig:
    """Fill the fields the command line left out from the preset's defaults."""
    preset = overrides.get("config", "gpt2" if has_gpu else "tiny")
    fields = dict(RUN_DEFAULTS[preset])
    fields["config"] = preset
    fields["out"] = str(pathlib.Path("out") / preset)
    if "warmup" not in overrides:
        fields["warmup"] = min(fields["warmup"], overrides.get("steps", fields["steps"]) // 10)
    fields.update(overrides)
    cfg = TrainConfig(**fields)
    validate_config(cfg)
    return cfg


def validate_config(cfg: TrainConfig) -> None:
    """What the parser's types do not check (and all of it for ``TrainConfig``s made in code)."""
    for field in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip"):
        value = getattr(cfg, field)
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            name = "--" + field.replace("_", "-") if field in ("lr", "weight_decay", "grad_clip") else field
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not cfg.lr > 0 or not cfg.grad_clip > 0:
        raise ValueError(f"--lr and --grad-clip must be positive, got {cfg.lr} and {cfg.grad_clip}")
    if cfg.config not in gpt2.PRESETS:
        raise ValueError(f"--config must be one of {sorted(gpt2.PRESETS)}, got {cfg.config!r}")
    if cfg.attention not in ATTENTION_CHOICES:
        raise ValueError(f"--attention must be one of {ATTENTION_CHOICES}, got {cfg.attention!r}")
    if isinstance(cfg.context_parallel, bool) or not isinstance(cfg.context_parallel, int) or cfg.context_parallel < 1:
        raise ValueError(f"--context-parallel must be a positive integer, got {cfg.context_parallel!r}")
    if cfg.context_parallel > 1 and cfg.attention in ("xla", "cudnn"):
        raise ValueError(
            f"--context-parallel {cfg.context_parallel} runs ring attention on the Pallas kernels; "
            f"--attention {cfg.attention} cannot (use auto or pallas)")
    if cfg.warmup >= cfg.steps:
        raise ValueError(f"--warmup ({cfg.warmup}) must be smaller than --steps ({cfg.steps})")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < SEED_LIMIT:
        raise ValueError(f"--seed must be a non-negative integer below 2**32, got {cfg.seed!r}")


def peak_flops(device: jax.Device) -> float | None:
    """Dense bf16 peak of one device, or None (CPU, unknown GPU)."""
    if device.platform != "gpu":
        return None
    for name, flops in PEAK_BF16_FLOPS:
        if name in device.device_kind:
            return flops
    return None


def check_attention(attention: str, platform: str) -> None:
    """``--attention cudnn`` needs a GPU (the others run anywhere; pallas slowly off a GPU)."""
    if attention == "cudnn" and platform != "gpu":
        raise ValueError(
            f"--attention cudnn needs an NVIDIA GPU, and JAX sees only {platform} devices; "
            f"use --attention auto or xla"
        )


def resolve_attention(requested: str, platform: str, context_parallel: int = 1) -> tuple[str, str]:
    """(backend, why) for ``--attention``."""
    if requested != "auto":
        return requested, "requested"
    if platform == "gpu":
        return "pallas", "auto: GPU found"
    if context_parallel > 1:
        return "pallas", "auto: context parallelism runs ring attention on the Pallas kernels (interpret mode: slow)"
    return "xla", "auto: no GPU, and the Pallas kernels would run in slow interpret mode"


def overrides_from_checkpoint(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The saved run's config with the few fields ``--resume`` may change."""
    for name, value in given.items():
        if name not in RESUMABLE_OVERRIDES and saved.get(name) != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} {value!r} differs from the checkpoint's {saved.get(name)!r}; a resumed "
                f"run keeps its configuration except {sorted(RESUMABLE_OVERRIDES)}"
            )
    merged = dict(saved)
    merged.update({k: v for k, v in given.items() if k in RESUMABLE_OVERRIDES})
    return merged


def resumed_config(saved: dict[str, Any], given: dict[str, Any]) -> TrainConfig:
    """The config of a resumed run: the checkpoint's ``saved`` one with ``given``'s overrides."""
    cfg = TrainConfig(**overrides_from_checkpoint(saved, given))
    validate_config(cfg)
    return cfg


def resolve_dtype(requested: str, platform: str) -> str:
    """The compute dtype for ``--dtype``: ``auto`` = bfloat16 on GPU, float32 on CPU."""
    if requested != "auto":
        return requested
    return "bfloat16" if platform == "gpu" else "float32"


def check_resumed_dtype(requested: str, saved: str | None, platform: str) -> None:
    """``--dtype auto`` resolves on the platform at hand: a resumed run must still compute in the checkpoint's
    dtype (``saved``, its model config's; a CPU run resumed on a GPU would switch float32 to bfloat16)."""
    dtype = resolve_dtype(requested, platform)
    if saved is not None and dtype != saved:
        raise ValueError(f"--dtype {requested} is {dtype} on {platform}, but the checkpoint was trained in {saved}; "
                         f"a resumed run keeps its dtype: resume it where --dtype {requested} is {saved}")


def model_config(cfg: TrainConfig, *, vocab_size: int, attention: str, dtype: str) -> gpt2.GPTConfig:
    """The preset's model, with the data's vocabulary and room for ``cfg.seq_len`` positions."""
    base = gpt2.get_config(cfg.config)
    return dataclasses.replace(
        base,
        vocab_size=vocab_size,
        block_size=max(base.block_size, cfg.seq_len),
        attention=attention,
        dtype=dtype,
    )
