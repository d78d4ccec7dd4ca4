"""Train GPT-2 (``models.gpt2``) with pallas_flash attention: ``python -m train``.

With no arguments it picks a run that fits the machine:

* no GPU: the ``tiny`` model (2 layers, width 128) on 128-byte windows of the
  Python standard library's sources, 600 steps of 16 sequences, with XLA
  attention (the Pallas kernels would run in the slow interpret mode), float32
  compute (bf16 matmuls are emulated, twice as slow, on a CPU). One to two
  minutes on two CPU cores (validation loss ~1.97 nats/byte).
* a GPU: the ``gpt2`` 124M body (byte vocabulary) at T=1024, batch 16,
  2000 steps, Pallas attention, bf16 compute.

``--help`` lists the overrides. Everything lands in ``--out`` (default
``out/<config>``): ``metrics.jsonl`` (one JSON object per logged step:
``step, loss, lr, tokens_per_s, mfu, grad_norm``; one per evaluation: ``step,
val_loss``), ``config.json`` and Orbax checkpoints in ``checkpoints/`` (every
``--checkpoint-every`` steps and at the end). ``--resume`` continues the run in
``--out`` from its latest checkpoint: same step, optimizer state, data
position and RNG, so a killed run loses at most the steps since its last
checkpoint; ``--steps`` may be raised to train longer. At the end it prints a
short sample from the model.

Batch sizes are global: ``--batch-size`` sequences per micro-step over all
devices, ``--grad-accum`` micro-steps per optimizer step (accumulated inside
the one jitted step), so an optimizer step sees
``batch_size * grad_accum * seq_len`` tokens.

Several devices: the batch axis is sharded over every device (a 1-D
``jax.sharding.Mesh`` named ``data``; parameters and optimizer state are
replicated; XLA inserts the gradient all-reduce). ``--batch-size`` must divide
by the device count. To test on a CPU::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m train ...

Several hosts: start the same command on every host with the coordinator
given through the environment, e.g.::

    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<i> \\
        python -m train --multihost ...

``--multihost`` calls ``jax.distributed.initialize()`` first (which also
reads SLURM / Cloud TPU settings by itself). Each process then loads only its
own rows of every global batch (the batches are a function of (seed, step),
so hosts agree without talking), and ``--out`` must be a folder every host
can write (Orbax writes one checkpoint cooperatively). Only process 0 writes
metrics and prints.

MFU is ``tokens/s * (6 N + 12 L T D) / (peak * devices)``, N the parameters
without the position table, peak the dense bf16 tensor-core rate of the device
(H100/H200 989 TFLOP/s, A100 312 TFLOP/s); it is ``null`` on a CPU or an
unknown device.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models import gpt2
from train import data as data_lib
from train.checkpoint import Checkpointer

ATTENTION_CHOICES = ("auto", "pallas", "xla", "cudnn")

#: Dense bf16 peak FLOP/s by a substring of ``device.device_kind``.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. ``RUN_DEFAULTS`` fills in what the command line leaves out."""

    config: str = "tiny"  # model preset, see models.gpt2.PRESETS
    attention: str = "auto"  # auto | pallas | xla | cudnn
    seq_len: int = 128
    batch_size: int = 16  # global sequences per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
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
     "sample_tokens", "out"}
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train GPT-2 with pallas_flash attention (see the module docstring).",
        argument_default=argparse.SUPPRESS,  # only explicit flags override defaults
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", choices=sorted(gpt2.PRESETS),
                   help="model preset (default: gpt2 with a GPU, tiny without)")
    p.add_argument("--attention", choices=ATTENTION_CHOICES,
                   help="attention backend; auto = pallas on GPU, xla on CPU (default: auto)")
    p.add_argument("--seq-len", type=_positive_int, help="tokens per sequence (tiny 128, gpt2 1024)")
    p.add_argument("--batch-size", type=_positive_int,
                   help="global sequences per micro-step, divisible by the device count (tiny 16, gpt2 16)")
    p.add_argument("--grad-accum", type=_positive_int, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps in total (tiny 600, gpt2 2000)")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate (tiny 2e-3, gpt2 6e-4)")
    p.add_argument("--warmup", type=_non_negative_int,
                   help="warm-up steps (default: min(preset's, steps // 10); tiny 50, gpt2 100)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    p.add_argument("--grad-clip", type=_positive_float, help="global-norm clip (default 1.0)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"),
                   help="compute dtype; auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--data", help="text file/folder (bytes) or folder with train.bin/val.bin "
                   "(uint16 tokens); default: the Python stdlib's sources")
    p.add_argument("--vocab-size", type=_positive_int, help="vocabulary of .bin token data (default 50304)")
    p.add_argument("--out", help="run folder for metrics and checkpoints (default out/<config>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--eval-every", type=_non_negative_int, help="steps between evaluations, 0 = only at the end")
    p.add_argument("--eval-batches", type=_positive_int, help="validation batches per evaluation (default 8)")
    p.add_argument("--log-every", type=_positive_int, help="steps between metric records (default 10)")
    p.add_argument("--checkpoint-every", type=_non_negative_int,
                   help="steps between checkpoints, 0 = only at the end (tiny 200, gpt2 500)")
    p.add_argument("--seed", type=_non_negative_int, help="initialisation, data order and dropout seed (default 0)")
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
    if cfg.config not in gpt2.PRESETS:
        raise ValueError(f"--config must be one of {sorted(gpt2.PRESETS)}, got {cfg.config!r}")
    if cfg.attention not in ATTENTION_CHOICES:
        raise ValueError(f"--attention must be one of {ATTENTION_CHOICES}, got {cfg.attention!r}")
    if cfg.warmup >= cfg.steps:
        raise ValueError(f"--warmup ({cfg.warmup}) must be smaller than --steps ({cfg.steps})")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")


def peak_flops(device: jax.Device) -> float | None:
    """Dense bf16 peak of one device, or None (CPU, unknown GPU)."""
    if device.platform != "gpu":
        return None
    for name, flops in PEAK_BF16_FLOPS:
        if name in device.device_kind:
            return flops
    return None


def resolve_attention(requested: str, platform: str) -> tuple[str, str]:
    """(backend, why) for ``--attention``."""
    if requested != "auto":
        return requested, "requested"
    if platform == "gpu":
        return "pallas", "auto: GPU found"
    return "xla", "auto: no GPU, and the Pallas kernels would run in slow interpret mode"


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up, cosine decay and global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup,
        decay_steps=cfg.steps,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )

    def decay_mask(params):  # decay matrices and embeddings, not biases or norms
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def init_train_state(mcfg: gpt2.GPTConfig, tx: optax.GradientTransformation, key: jax.Array):
    """Fresh ``(params, opt_state)``; jit it with ``key`` as an argument.

    The key is an argument, not a constant: with no inputs XLA would try to
    constant-fold the whole random initialisation (minutes of compile at 124M).
    The params are plain nested dicts, not ``nnx.State``: they flatten in C++,
    which cuts the host's pytree work per train-step call (flatten the inputs,
    unflatten the outputs) from about 4.6 to 0.4 ms on the 590 arrays of GPT-2
    124M and its AdamW state (one CPU core; ``benchmarks/NOTES.md`` entry 11).
    """
    params = nnx.to_pure_dict(nnx.state(gpt2.GPT(mcfg, rngs=nnx.Rngs(key)), nnx.Param))
    return params, tx.init(params)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, grad_accum: int,
                    schedule: optax.Schedule | None = None):
    """``(train_step, loss_fn)``, pure functions of the parameter state, to be jitted.

    ``params`` is the model's ``nnx.Param`` state, as an ``nnx.State`` or as
    its plain-dict form (``nnx.to_pure_dict``, what ``main`` uses).
    ``loss_fn(params, x, y, dropout_rng)``: mean next-token cross-entropy of
    ``x, y [B, T]``. ``train_step(params, opt_state, x, y, step, base_key)``
    takes ``x, y [grad_accum, B, T]``, averages the gradient over the
    micro-batches (a ``lax.scan``, so one compiled step does the whole
    accumulation) and applies one optimizer update; it returns the new
    ``params, opt_state`` and ``{"loss", "grad_norm"}``, plus ``"lr"`` (this
    step's learning rate) when ``schedule`` is given.
    """

    def loss_fn(params, x, y, dropout_rng):
        model = nnx.merge(graphdef, params)
        logits = model(x, dropout_rng=dropout_rng)  # [B, T, V] in the compute dtype
        return gpt2.cross_entropy(logits, y).mean()

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(params, opt_state, x, y, step, base_key):
        key = jax.random.fold_in(base_key, step)  # dropout randomness of this step
        if grad_accum == 1:
            loss, grads = grad_fn(params, x[0], y[0], key)
        else:
            def micro(carry, inputs):
                loss_sum, grad_sum = carry
                xi, yi, i = inputs  # [B, T], [B, T], micro-step index
                loss, grads = grad_fn(params, xi, yi, jax.random.fold_in(key, i))
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss, grads), _ = jax.lax.scan(
                micro, (jnp.zeros((), jnp.float32), zeros), (x, y, jnp.arange(grad_accum))
            )
            loss = loss / grad_accum
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if schedule is not None:  # read on the host without a second computation
            metrics["lr"] = schedule(step)
        return params, opt_state, metrics

    return train_step, loss_fn


class MetricsLog:
    """``metrics.jsonl``: appended across resumes, rewound to the resumed step."""

    def __init__(self, path: pathlib.Path, *, enabled: bool, resume_step: int | None):
        self.path = path
        self.enabled = enabled
        if enabled and resume_step is not None and path.exists():
            # Records past the checkpoint were not kept by the resumed state:
            # drop them so the file reads as one run.
            keep = [
                line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _overrides_from_checkpoint(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run training; returns a summary (final step, losses, folder)."""
    args = vars(build_parser().parse_args(argv))
    resume = args.pop("resume", False)
    if args.pop("multihost", False):
        jax.distributed.initialize()
    is_main = jax.process_index() == 0

    def say(*parts):
        if is_main:
            print(*parts, flush=True)

    platform = jax.default_backend()
    has_gpu = platform == "gpu"

    # ---- configuration (fresh, or the checkpoint's on --resume) ----
    out = pathlib.Path(args.get("out") or make_config(args, has_gpu=has_gpu).out)
    ckpt = Checkpointer(out / "checkpoints")
    resume_step = ckpt.latest_step()
    if resume:
        if resume_step is None:
            raise ValueError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        saved = ckpt.restore_meta(resume_step)["train_config"]
        cfg = TrainConfig(**_overrides_from_checkpoint(saved, {**args, "out": str(out)}))
        validate_config(cfg)
    else:
        if resume_step is not None:
            raise ValueError(
                f"{out} already holds a run (checkpoint at step {resume_step}): pass --resume to "
                f"continue it, or choose another --out"
            )
        cfg = make_config({**args, "out": str(out)}, has_gpu=has_gpu)
        resume_step = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    attention, why = resolve_attention(cfg.attention, platform)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if has_gpu else "float32")
    say(f"attention: {attention} ({why})")

    # ---- devices: data parallel over every device ----
    devices = jax.devices()
    n_dev, n_proc = len(devices), jax.process_count()
    if cfg.batch_size % n_dev:
        raise ValueError(
            f"--batch-size {cfg.batch_size} must be divisible by the number of devices ({n_dev}) "
            f"for data-parallel training"
        )
    mesh = Mesh(np.array(devices), ("data",))
    replicated = NamedSharding(mesh, P())
    train_sharding = NamedSharding(mesh, P(None, "data", None))  # [A, B, T]
    eval_sharding = NamedSharding(mesh, P("data", None))  # [B, T]
    per_proc = cfg.batch_size // n_proc
    rows = slice(jax.process_index() * per_proc, (jax.process_index() + 1) * per_proc)

    # ---- data and model ----
    data = data_lib.load_data(cfg.data, vocab_size=cfg.vocab_size)
    base = gpt2.get_config(cfg.config)
    mcfg = dataclasses.replace(
        base,
        vocab_size=data.vocab_size,
        block_size=max(base.block_size, cfg.seq_len),
        attention=attention,
        dtype=dtype,
    )
    n_params = gpt2.param_count(mcfg)
    fpt = gpt2.flops_per_token(mcfg, cfg.seq_len)
    peak = peak_flops(devices[0])
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    say(f"data: {data.description}; train {len(data.train):,} / val {len(data.val):,} tokens")
    say(
        f"model: {cfg.config} ({n_params / 1e6:.2f}M parameters, vocab {mcfg.vocab_size}, "
        f"{dtype} compute), T={cfg.seq_len}, {tokens_per_step:,} tokens/step on "
        f"{n_dev} {devices[0].device_kind} device(s)"
    )
    sampler = data_lib.BatchSampler(
        data.train, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, seed=cfg.seed,
    )
    val_batches = data_lib.eval_batches(
        data.val, seq_len=min(cfg.seq_len, len(data.val) - 1), batch_size=cfg.batch_size,
        n_batches=cfg.eval_batches, rows=rows,
    )

    tx, schedule = make_optimizer(cfg)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: gpt2.GPT(mcfg, rngs=nnx.Rngs(0))))

    init_state = functools.partial(init_train_state, mcfg, tx)

    # ---- the jitted steps ----
    train_step, loss_fn = make_train_step(graphdef, tx, cfg.grad_accum, schedule)
    train_step = jax.jit(
        train_step, donate_argnums=(0, 1), out_shardings=(replicated, replicated, replicated)
    )

    @jax.jit
    def eval_loss(params, x, y):
        return loss_fn(params, x, y, None)

    def evaluate(params) -> float:
        losses = [
            eval_loss(params, *(jax.make_array_from_process_local_data(eval_sharding, a) for a in b))
            for b in val_batches
        ]
        return float(jnp.mean(jnp.stack(losses)))

    # ---- state: fresh or restored ----
    if resume_step is not None:
        abstract = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
            jax.eval_shape(init_state, jax.random.key(cfg.seed)),
        )
        (params, opt_state), meta = ckpt.restore(abstract, resume_step)
        start = int(meta["step"])
        sampler.position = int(meta["data_position"])
        base_key = jax.random.wrap_key_data(np.asarray(meta["rng_key"], dtype=np.uint32))
        say(f"resumed from {out / 'checkpoints'} at step {start}")
    else:
        params, opt_state = jax.jit(init_state, out_shardings=replicated)(jax.random.key(cfg.seed))
        start = 0
        base_key = jax.random.key(cfg.seed)
    base_key = jax.device_put(base_key, replicated)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=is_main, resume_step=resume_step)

    def save(step: int) -> None:
        meta = {
            "step": step,
            "data_position": sampler.position,
            "rng_key": np.asarray(jax.random.key_data(base_key)).tolist(),
            "tokens_seen": step * tokens_per_step,
            "train_config": dataclasses.asdict(cfg),
            "model_config": dataclasses.asdict(mcfg),
        }
        ckpt.save(step, (params, opt_state), meta)

    # ---- the loop ----
    pbar = _progress(total=cfg.steps, initial=start, enabled=is_main)
    last_loss = last_val = None
    t0, tokens_since, compile_s = time.perf_counter(), 0, None
    # A logged step's metrics are read only once the step after it is queued, so that
    # logging never leaves the GPU idle while the host dispatches the next step.
    pending: tuple[int, dict[str, jax.Array], int] | None = None

    def report(entry: tuple[int, dict[str, jax.Array], int]) -> None:
        nonlocal last_loss, t0, tokens_since
        done, m, tokens = entry
        last_loss = float(m["loss"])  # waits for that step (not for the one queued after it)
        now = time.perf_counter()
        tps = tokens / (now - t0) if tokens else None
        mfu = tps * fpt / (peak * n_dev) if (tps and peak) else None
        metrics.write({
            "step": done, "loss": last_loss, "lr": float(m["lr"]),
            "tokens_per_s": tps, "mfu": mfu, "grad_norm": float(m["grad_norm"]),
        })
        pbar.set_postfix_str(
            f"loss {last_loss:.3f} | {_fmt(tps)} tok/s | MFU "
            + (f"{100 * mfu:.1f}%" if mfu is not None else "n/a")
        )
        t0, tokens_since = now, tokens_since - tokens  # steps queued since stay counted

    try:
        for step in range(start, cfg.steps):
            x, y = (jax.make_array_from_process_local_data(train_sharding, a)
                    for a in sampler.batch(sampler.position, rows))
            sampler.position += 1
            params, opt_state, m = train_step(params, opt_state, x, y, np.int32(step), base_key)
            done = step + 1
            if compile_s is None:  # first step: compilation, not throughput
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - t0
                say(f"compiled the train step in {compile_s:.1f}s")
                t0, tokens_since = time.perf_counter(), 0
            else:
                tokens_since += tokens_per_step
            if pending is not None:
                report(pending)
                pending = None
            if done % cfg.log_every == 0 or done == cfg.steps:
                pending = (done, m, tokens_since)
            pbar.update(1)
            evaluate_now = done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)
            save_now = done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
            if not (evaluate_now or save_now):
                continue
            if pending is not None:  # both wait for this step anyway; report it before the pause
                report(pending)
                pending = None
            if evaluate_now:
                last_val = evaluate(params)
                metrics.write({"step": done, "val_loss": last_val})
                if is_main:
                    pbar.write(f"step {done}: val_loss {last_val:.4f}")
            if save_now:
                save(done)
            t0, tokens_since = time.perf_counter(), 0  # keep the pause out of tokens/s
        if pending is not None:
            report(pending)
    finally:
        pbar.close()
        ckpt.wait()

    sample = None
    if cfg.sample_tokens:
        prompt = np.frombuffer(b"def ", np.uint8) if data.kind == "bytes" else np.asarray(data.val[:4])
        model = nnx.merge(graphdef, params)
        tokens = gpt2.generate(
            model, prompt.astype(np.int32), cfg.sample_tokens, temperature=0.8, top_k=40,
            rng=jax.random.fold_in(jax.random.key(cfg.seed), cfg.steps),
        )
        sample = data.decode(np.asarray(tokens))
        say("---- sample ----\n" + sample + "\n----------------")
    ckpt.close()
    say(f"done: step {cfg.steps}, loss {last_loss}, val_loss {last_val}; run folder {out}")
    return {
        "step": cfg.steps, "loss": last_loss, "val_loss": last_val, "out": str(out),
        "attention": attention, "compile_s": compile_s, "sample": sample, "resumed_from": resume_step,
    }


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e3:.1f}k" if x < 1e6 else f"{x / 1e6:.2f}M"


def _progress(*, total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=1.0)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
