"""The training loop, ``main()``: logging, evaluation, checkpoints, resuming.

What a run does and writes is described in :mod:`train` (``train/__init__.py``).
:func:`cli` is ``python -m train``: a user error is one line on stderr and
exit code 2, a loss that turns non-finite exit code 1; Ctrl-C (SIGINT) exit code
130 and SIGTERM (SLURM, Kubernetes, ``docker stop``) 143, the shell's 128 + signal,
once the checkpoint being saved is on disk; during training, once the last
finished step is saved too (:mod:`train.interrupts`).

What protects a run:

* the run folder is locked for the whole run (:func:`train.run_folder.lock`):
  a second run on it stops before it reads or writes anything there;
* everything a run is told is checked before it writes anything: flags (finite
  numbers, a GPU for cudnn), data (token ids below the vocabulary, a sequence's
  worth of tokens), ``metrics.jsonl``, and on ``--resume`` that there are
  steps left to train;
* ``--resume`` restores the newest checkpoint that reads back, finite (as
  every one is saved); newer damaged ones are named and moved to
  ``checkpoints.corrupt/``;
* every step's loss and gradient norm are read once the step is done anyway
  (:class:`LossWatch`); a non-finite one stops the run, naming the step, and
  a checkpoint is saved only of a finite state, so the last one stays good.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import jax

# Imported up front: Pallas's interpret mode (the kernels off a GPU) imports it at its first lowering, and
# it registers a jit-cache option then, so the train step's second call would compile it all again.
import jax.experimental.pallas.fuser
import numpy as np
from flax import nnx

from models import gpt2
from train import data as data_lib
from train import run_folder
from train.interrupts import StopAtStep, Terminated, drain, sigterm_interrupts
from train.checkpoint import Checkpointer
from train.config import (
    TrainConfig,
    build_parser,
    check_attention,
    check_resumed_dtype,
    make_config,
    model_config,
    peak_flops,
    resolve_attention,
    resolve_dtype,
    resumed_config,
)
from train.metering import ThroughputMeter, format_rate
from train.parallel import Parallel, eval_length
from train.run_folder import MetricsLog
from train.step import (
    abstract_state,
    all_finite,
    init_train_state,
    make_evaluate,
    make_optimizer,
    make_train_step,
)


class Diverged(RuntimeError):
    """The loss, the gradient or the state turned non-finite (exit code 1)."""


class LossWatch:
    """Each step's loss and gradient norm, read once the step is done anyway.

    The loop never waits for a step just to read them: :meth:`check` is called
    with the step whose record the meter has just read, or the step an
    evaluation or a checkpoint waits for.
    """

    def __init__(self):
        self._unread: list[tuple[int, Mapping[str, Any]]] = []

    def add(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._unread.append((step, metrics))

    def check(self, upto: int) -> None:
        """Read the steps up to ``upto``; raise :class:`Diverged` at the first non-finite one."""
        ready = [(s, m) for s, m in self._unread if s <= upto]
        self._unread = [(s, m) for s, m in self._unread if s > upto]
        values = jax.device_get([(m["loss"], m["grad_norm"]) for _, m in ready])
        for (step, _), (loss, norm) in zip(ready, values):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise Diverged(f"non-finite training at step {step}: loss {float(loss)}, "
                               f"gradient norm {float(norm)}")


class Reporter:
    """Where the records of a run go: ``metrics.jsonl`` and the progress bar, once checked."""

    def __init__(self, metrics: MetricsLog, pbar, *, enabled: bool):
        self.metrics, self.pbar, self.enabled = metrics, pbar, enabled
        self.watch = LossWatch()
        self.loss: float | None = None  # the last logged training loss
        self.val_loss: float | None = None  # the last validation loss

    def train(self, record: dict[str, Any] | None) -> None:
        """A logged step's record (:meth:`ThroughputMeter.step`); None is no record."""
        if record is None:
            return
        self.watch.check(record["step"])  # never a record of a non-finite step
        self.loss = record["loss"]
        self.metrics.write(record)
        mfu = record["mfu"]
        self.pbar.set_postfix_str(
            f"loss {self.loss:.3f} | {format_rate(record['tokens_per_s'])} tok/s | MFU "
            + (f"{100 * mfu:.1f}%" if mfu is not None else "n/a")
        )

    def val(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise Diverged(f"non-finite validation loss at step {step}: {loss}")
        self.val_loss = loss
        self.metrics.write({"step": step, "val_loss": loss})
        if self.enabled:
            self.pbar.write(f"step {step}: val_loss {loss:.4f}")


@dataclasses.dataclass
class Restored:
    """The checkpoint a resumed run starts from."""

    step: int
    state: Any  # (params, opt_state)
    meta: dict[str, Any]
    corrupt: list[int]  # newer checkpoints that did not read back


def _say(is_main: bool, file=None):
    """``print`` on process 0 only (to ``file``, default stdout)."""
    def say(*parts):
        if is_main:
            print(*parts, file=file or sys.stdout, flush=True)

    return say


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run training; returns a summary (final step, losses, folder)."""
    args = vars(build_parser().parse_args(argv))
    resume = args.pop("resume", False)
    if args.pop("multihost", False):
        initialize_distributed()
    is_main = jax.process_index() == 0
    say = _say(is_main)
    platform = jax.default_backend()
    has_gpu = platform == "gpu"
    out = pathlib.Path(args.get("out") or make_config(args, has_gpu=has_gpu).out)
    args["out"] = str(out)
    run_folder.check_out(out)

    if resume:
        if not (out / "checkpoints").is_dir():
            raise ValueError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        with run_folder.lock(out, enabled=is_main), Checkpointer(out / "checkpoints") as ckpt:

            def abstract_for(meta: dict[str, Any]):  # shapes on this run's mesh; vocabulary from the checkpoint
                cfg = resumed_config(meta["train_config"], args)
                mcfg = model_config(cfg, vocab_size=meta["model_config"]["vocab_size"],
                                    attention="xla", dtype="float32")
                replicated = Parallel.over_devices(cfg.context_parallel).replicated
                return abstract_state(mcfg, make_optimizer(cfg)[0], replicated)

            state, meta, corrupt = ckpt.restore_newest_intact(abstract_for, warn=_say(is_main, sys.stderr),
                                                              intact=_finite_state)
            restored = Restored(int(meta["step"]), state, meta, corrupt)
            cfg = resumed_config(meta["train_config"], args)
            check_resumed_dtype(cfg.dtype, meta["model_config"].get("dtype"), platform)
            parallel = _check_run(cfg, platform)
            if restored.step >= cfg.steps:
                return _nothing_to_train(cfg, restored, ckpt, say)
            _say_schedule_change(meta["train_config"], cfg, restored.step, say)
            data = _load_data(cfg, parallel)
            data_lib.check_fingerprint(meta.get("data"), data, f"the checkpoint at step {restored.step}")
            _say_validation_change(meta["train_config"], cfg, len(data.val), restored.step, say)
            return _train(cfg, data, ckpt, restored, parallel=parallel, platform=platform, say=say)

    cfg = make_config(args, has_gpu=has_gpu)
    parallel = _check_run(cfg, platform)
    data = _load_data(cfg, parallel)
    with run_folder.lock(out, enabled=is_main), Checkpointer(out / "checkpoints") as ckpt:
        steps = ckpt.all_steps()
        if steps:
            raise ValueError(
                f"{out} already holds a run (checkpoint at step {steps[-1]}): pass --resume to "
                f"continue it, or choose another --out"
            )
        return _train(cfg, data, ckpt, None, parallel=parallel, platform=platform, say=say)


def initialize_distributed() -> None:
    """``jax.distributed.initialize()`` for ``--multihost``.

    It reads ``JAX_COORDINATOR_ADDRESS`` itself, and the process count and
    index from a cluster it knows (SLURM, Open MPI, Kubernetes...);
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` give them anywhere else.
    """
    kwargs = {}
    for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(name):
            try:
                kwargs[key] = int(os.environ[name])
            except ValueError:
                raise ValueError(f"--multihost: {name} must be an integer, got {os.environ[name]!r}") from None
    jax.distributed.initialize(**kwargs)


def _check_run(cfg: TrainConfig, platform: str) -> Parallel:
    """What the configuration needs of this machine; the run's mesh."""
    check_attention(cfg.attention, platform)
    parallel = Parallel.over_devices(cfg.context_parallel)
    parallel.check(batch_size=cfg.batch_size, seq_len=cfg.seq_len)
    parallel.rows(cfg.batch_size)  # this process's rows are one block (else an error now, not after writing)
    return parallel


def _load_data(cfg: TrainConfig, parallel: Parallel) -> data_lib.TokenData:
    """The run's data, checked (with the validation length the layout needs) before the run folder is written."""
    data_lib.check_out_outside(cfg.data, cfg.out)
    data = data_lib.load_data(cfg.data, vocab_size=cfg.vocab_size)
    data_lib.check_length(data, cfg.seq_len)
    parallel.eval_len(cfg.seq_len, len(data.val))
    return data


def _say_schedule_change(saved: dict[str, Any], cfg: TrainConfig, step: int, say) -> None:
    """A resume with another ``--steps`` stretches the cosine decay to the new length, so the learning rate moves
    at the resumed step: say by how much (the run stays as asked; nanoGPT's schedule behaves alike)."""
    if saved.get("steps") == cfg.steps:
        return
    old = make_optimizer(TrainConfig(**saved))[1](step)
    new = make_optimizer(cfg)[1](step)
    say(f"--steps {saved.get('steps')} -> {cfg.steps}: the learning-rate schedule now decays to step {cfg.steps}; "
        f"at step {step} the learning rate moves from {float(old):.3g} to {float(new):.3g}")


def _say_validation_change(saved: dict[str, Any], cfg: TrainConfig, val_tokens: int, step: int, say) -> None:
    """A resume with another ``--eval-batches``, or another ``--context-parallel`` where the validation split is
    shorter than ``--seq-len`` (its length is cut to the layout), validates on other tokens: say so, since the
    val_loss records before and after ``step`` then measure different sets."""
    def measured(c: dict[str, Any]) -> tuple[int, int]:
        length = eval_length(c["seq_len"], val_tokens, c.get("context_parallel") or 1)
        return c.get("eval_batches", cfg.eval_batches), length

    (old_batches, old_len), (new_batches, new_len) = measured(saved), measured(dataclasses.asdict(cfg))
    if (old_batches, old_len) != (new_batches, new_len):
        say(f"validation: {new_batches} batches of {new_len} tokens, was {old_batches} of {old_len}: val_loss "
            f"after step {step} is measured on other tokens than before it")


def _finite_state(state) -> str | None:
    """Every checkpoint is saved finite (``save`` checks): a NaN or an infinity read back means damage on disk."""
    return None if bool(all_finite(state)) else "it holds NaN or infinite values, and every save is checked finite"


def _nothing_to_train(cfg: TrainConfig, restored: Restored, ckpt: Checkpointer, say) -> dict[str, Any]:
    """``--resume`` at or past ``--steps``: an error past it, a no-op at it; nothing is written."""
    where = f"the checkpoint at step {restored.step} in {ckpt.directory}"
    if restored.step > cfg.steps:
        raise ValueError(f"--resume: {where} is already past --steps {cfg.steps}; nothing to train "
                         f"(pass --steps above {restored.step} to train longer)")
    say(f"nothing to train: {where} is already at --steps {cfg.steps}; pass a larger --steps to "
        f"train longer")
    return {"step": restored.step, "loss": None, "val_loss": None, "out": cfg.out, "attention": None,
            "compile_s": None, "sample": None, "resumed_from": restored.step}


def _train(cfg: TrainConfig, data: data_lib.TokenData, ckpt: Checkpointer, restored: Restored | None,
           *, parallel: Parallel, platform: str, say) -> dict[str, Any]:
    """Set up, train from ``restored`` (or from scratch) to ``cfg.steps``, sample; in a locked folder."""
    out = pathlib.Path(cfg.out)
    is_main = jax.process_index() == 0
    metrics = MetricsLog(out / "metrics.jsonl", enabled=is_main)  # checked before anything is written
    if restored is None and metrics.lines:
        raise ValueError(
            f"{metrics.path} holds {len(metrics.lines)} records of an earlier run that saved no "
            f"checkpoint; delete it (or the folder) to start a new run there, or choose another --out"
        )
    attention, why = resolve_attention(cfg.attention, platform, cfg.context_parallel)
    dtype = resolve_dtype(cfg.dtype, platform)
    ckpt.check_writable()  # not at the first save, after training
    data_print = data.fingerprint  # for the checkpoints' meta: the tokens are hashed now, not at the first save

    # ---- the run folder: everything checked, now write ----
    if restored is not None:
        metrics.rewind(restored.step)  # records past the checkpoint: its state did not keep them
        for step in restored.corrupt if is_main else ():
            say(f"moved the unreadable checkpoint {step} to {ckpt.set_aside(step)}")
    if is_main:
        run_folder.write_text_atomic(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    say(f"attention: {attention} ({why})")

    # ---- devices: the batch over "data", with --context-parallel the sequence over "seq" ----
    devices = list(parallel.mesh.devices.flat)
    replicated = parallel.replicated
    rows = parallel.rows(cfg.batch_size)  # the rows this process loads
    cp = parallel.context_parallel

    # ---- data and model ----
    mcfg = model_config(cfg, vocab_size=data.vocab_size, attention=attention, dtype=dtype)
    n_params = gpt2.param_count(mcfg)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    say(f"data: {data.description}; train {len(data.train):,} / val {len(data.val):,} tokens")
    say(
        f"model: {cfg.config} ({n_params / 1e6:.2f}M parameters, vocab {mcfg.vocab_size}, "
        f"{dtype} compute), T={cfg.seq_len}, {tokens_per_step:,} tokens/step on "
        f"{len(devices)} {devices[0].device_kind} device(s)"
        + (f" ({parallel.data_size} data x {parallel.seq_size} seq, ring attention)" if cp else "")
    )
    sampler = data_lib.BatchSampler(
        data.train, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, seed=cfg.seed,
    )
    eval_len = parallel.eval_len(cfg.seq_len, len(data.val))
    val_batches = data_lib.eval_batches(
        data.val, seq_len=eval_len, batch_size=cfg.batch_size, n_batches=cfg.eval_batches, rows=rows,
    )
    tx, schedule = make_optimizer(cfg)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: gpt2.GPT(mcfg, context_parallel=cp, rngs=nnx.Rngs(0))))

    # ---- the jitted steps ----
    train_step, loss_fn = make_train_step(graphdef, tx, cfg.grad_accum, schedule)
    train_step = jax.jit(
        train_step, donate_argnums=(0, 1), out_shardings=(replicated, replicated, replicated)
    )
    def positions(seq_len: int):  # of the columns as laid out: zigzag under context parallelism
        return None if cp is None else parallel.replicate(parallel.positions(seq_len))

    evaluate = make_evaluate(loss_fn, val_batches, functools.partial(parallel.put, batch_size=cfg.batch_size),
                             positions(eval_len))
    train_positions = positions(cfg.seq_len)

    # ---- state: fresh or restored ----
    if restored is not None:
        (params, opt_state), meta = restored.state, restored.meta
        start = restored.step
        sampler.position = int(meta["data_position"])
        key_data = np.asarray(meta["rng_key"], dtype=np.uint32)
        say(f"resumed from {ckpt.directory} at step {start}")
    else:
        init_state = functools.partial(init_train_state, mcfg, tx)
        params, opt_state = jax.jit(init_state, out_shardings=replicated)(jax.random.key(cfg.seed))
        start = 0
        key_data = np.asarray(jax.random.key_data(jax.random.key(cfg.seed)))
    base_key = jax.random.wrap_key_data(parallel.replicate(key_data))  # on every device of every process

    saved = start  # the step of the newest checkpoint of this state

    def save(step: int) -> None:
        nonlocal saved
        if not all_finite((params, opt_state)):  # the losses were finite; the state must be too
            raise Diverged(f"non-finite parameters or optimizer state at step {step}")
        meta = {
            "step": step,
            "data_position": sampler.position,
            "rng_key": key_data.tolist(),
            "tokens_seen": step * tokens_per_step,
            "train_config": dataclasses.asdict(cfg),
            "model_config": dataclasses.asdict(mcfg),
            "data": data_print,
        }
        ckpt.save(step, (params, opt_state), meta)
        saved = step

    # ---- the loop ----
    pbar = _progress(total=cfg.steps, initial=start, enabled=is_main)
    report = Reporter(metrics, pbar, enabled=is_main)
    meter = ThroughputMeter(
        tokens_per_step, flops_per_token=gpt2.flops_per_token(mcfg, cfg.seq_len),
        peak_flops=peak_flops(devices[0]), n_devices=len(devices),
    )
    stop = StopAtStep()

    def stop_here(done: int) -> None:
        """Ctrl-C or SIGTERM: between steps the state, the data position and the records agree at ``done``;
        save it (if it is not saved yet and the losses were finite) and stop."""
        report.train(meter.flush())
        report.watch.check(done)
        if done != saved:
            save(done)
        ckpt.wait()
        if ckpt.latest_step() is None:
            stop.stop("no step was finished, so no checkpoint was saved: run again without --resume")
        stop.stop(f"--resume continues from step {ckpt.latest_step()} (saved in {ckpt.directory})")

    try:
        with stop.installed():
            for step in range(start, cfg.steps):
                if stop.requested():
                    stop_here(step)
                x, y = (parallel.put(a, cfg.batch_size) for a in sampler.batch(sampler.position, rows))
                sampler.position += 1
                params, opt_state, m = train_step(params, opt_state, x, y, np.int32(step), base_key, train_positions)
                done = step + 1
                report.watch.add(done, m)
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
                report.watch.check(done)
                if evaluate_now:
                    report.val(done, evaluate(params))
                if save_now:
                    save(done)
                meter.restart()  # keep the pause out of tokens/s
            report.train(meter.flush())
            if stop.requested():  # during the last step: it is saved, the sample is skipped
                stop_here(cfg.steps)
    except Diverged as e:
        ckpt.wait()
        latest = ckpt.latest_step()
        kept = (f"the last checkpoint, step {latest} in {ckpt.directory}, is from before it and is kept"
                if latest is not None else "no checkpoint had been saved yet")
        raise Diverged(f"{e}; stopped there, saving nothing of it; {kept}") from None
    finally:
        pbar.close()
    ckpt.wait()

    sample = None
    if cfg.sample_tokens:
        prompt = np.frombuffer(b"def ", np.uint8) if data.kind == "bytes" else np.asarray(data.val[:4])
        plain = graphdef if cp is None else nnx.graphdef(nnx.eval_shape(lambda: gpt2.GPT(mcfg, rngs=nnx.Rngs(0))))
        model = nnx.merge(plain, params)  # generation (the KV cache) runs without context parallelism
        tokens = gpt2.generate(
            model, prompt.astype(np.int32), cfg.sample_tokens, temperature=0.8, top_k=40,
            rng=jax.random.fold_in(jax.random.key(cfg.seed), cfg.steps),
        )
        sample = data.decode(np.asarray(tokens))
        say("---- sample ----\n" + sample + "\n----------------")
    say(f"done: step {cfg.steps}, loss {report.loss}, val_loss {report.val_loss}; run folder {out}")
    return {
        "step": cfg.steps, "loss": report.loss, "val_loss": report.val_loss, "out": str(out),
        "attention": attention, "compile_s": meter.compile_s, "sample": sample,
        "resumed_from": restored.step if restored else None,
    }


def _progress(*, total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=1.0)


def cli(argv: list[str] | None = None) -> int:
    """``python -m train``: run :func:`main`; errors are one line on stderr. Returns the exit code."""
    try:
        with sigterm_interrupts():
            main(argv)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # user errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        how = e.args[0] if e.args else "--resume continues from the last checkpoint in --out, if one was saved"
        print(f"interrupted{' (SIGTERM)' if isinstance(e, Terminated) else ''}; {how}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        drain()  # the steps still queued: exiting under them can abort the process (not 130 or 143)
    return 0
