"""The training loop, ``main()``: logging, evaluation, checkpoints, resuming.

What a run does and writes is described in :mod:`train` (``train/__init__.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models import gpt2
from train import data as data_lib
from train.checkpoint import Checkpointer
from train.config import (
    TrainConfig,
    build_parser,
    make_config,
    model_config,
    overrides_from_checkpoint,
    peak_flops,
    resolve_attention,
    resolve_dtype,
    validate_config,
)
from train.metering import ThroughputMeter, format_rate
from train.step import init_train_state, make_evaluate, make_optimizer, make_train_step


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


class Reporter:
    """Where the records of a run go: ``metrics.jsonl`` and the progress bar."""

    def __init__(self, metrics: MetricsLog, pbar, *, enabled: bool):
        self.metrics, self.pbar, self.enabled = metrics, pbar, enabled
        self.loss: float | None = None  # the last logged training loss
        self.val_loss: float | None = None  # the last validation loss

    def train(self, record: dict[str, Any] | None) -> None:
        """A logged step's record (:meth:`ThroughputMeter.step`); None is no record."""
        if record is None:
            return
        self.loss = record["loss"]
        self.metrics.write(record)
        mfu = record["mfu"]
        self.pbar.set_postfix_str(
            f"loss {self.loss:.3f} | {format_rate(record['tokens_per_s'])} tok/s | MFU "
            + (f"{100 * mfu:.1f}%" if mfu is not None else "n/a")
        )

    def val(self, step: int, loss: float) -> None:
        self.val_loss = loss
        self.metrics.write({"step": step, "val_loss": loss})
        if self.enabled:
            self.pbar.write(f"step {step}: val_loss {loss:.4f}")


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
        cfg = TrainConfig(**overrides_from_checkpoint(saved, {**args, "out": str(out)}))
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
    dtype = resolve_dtype(cfg.dtype, platform)
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
    mcfg = model_config(cfg, vocab_size=data.vocab_size, attention=attention, dtype=dtype)
    n_params = gpt2.param_count(mcfg)
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
    evaluate = make_evaluate(loss_fn, val_batches, eval_sharding)

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
    report = Reporter(metrics, pbar, enabled=is_main)
    meter = ThroughputMeter(
        tokens_per_step, flops_per_token=gpt2.flops_per_token(mcfg, cfg.seq_len),
        peak_flops=peak_flops(devices[0]), n_devices=n_dev,
    )

    try:
        for step in range(start, cfg.steps):
            x, y = (jax.make_array_from_process_local_data(train_sharding, a)
                    for a in sampler.batch(sampler.position, rows))
            sampler.position += 1
            params, opt_state, m = train_step(params, opt_state, x, y, np.int32(step), base_key)
            done = step + 1
            first = meter.compile_s is None
            report.train(meter.step(done, m, log=done % cfg.log_every == 0 or done == cfg.steps))
            if first:
                say(f"compiled the train step in {meter.compile_s:.1f}s")
            pbar.update(1)
            evaluate_now = done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)
            save_now = done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
            if not (evaluate_now or save_now):
                continue
            report.train(meter.flush())  # both wait for this step anyway; report it before the pause
            if evaluate_now:
                report.val(done, evaluate(params))
            if save_now:
                save(done)
            meter.restart()  # keep the pause out of tokens/s
        report.train(meter.flush())
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
    say(f"done: step {cfg.steps}, loss {report.loss}, val_loss {report.val_loss}; run folder {out}")
    return {
        "step": cfg.steps, "loss": report.loss, "val_loss": report.val_loss, "out": str(out),
        "attention": attention, "compile_s": meter.compile_s, "sample": sample,
        "resumed_from": resume_step,
    }


def _progress(*, total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=1.0)
