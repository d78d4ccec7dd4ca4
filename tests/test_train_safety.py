"""python -m train never loses or corrupts a run: locked folders, damaged checkpoints, non-finite losses, user
errors named in one line, SIGTERM during a save, other data or dtype on resume, a folder that cannot be written.
The tiny run these start from, and the rest of the CLI: test_train.py."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tests.conftest import ON_GPU
from tests.test_train import REPO, TINY_ARGS, _records, _train_losses, tiny_run  # noqa: F401 - a fixture
from train import data as data_lib
from train.checkpoint import Checkpointer, _one_line
from train.config import TrainConfig, build_parser, validate_config
from train.loop import cli, main
from train.step import all_finite


def _snapshot(folder):
    """Every file under ``folder``: relative path -> bytes."""
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_run(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    return out


def _cli_error(capsys, argv, code=2):
    """The CLI exits with ``code`` and one line ``error: ...`` on stderr (and a progress bar)."""
    assert cli(argv) == code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "%|" not in line]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _truncate_largest_array(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:1000])


# Another process: takes a folder's lock as a run does, and keeps it.
_HOLD_LOCK = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, b'%d' % os.getpid()); "
              "print('locked', flush=True); time.sleep(120)")


def test_a_second_run_on_a_locked_folder_stops_and_changes_nothing(tiny_run, tmp_path, capsys):
    """Item 1: a run holds OUT/.lock (flock) while it runs; a second one on the same
    folder, fresh or --resume, gets one line naming the holder and writes nothing."""
    out, fresh = _copy_run(tiny_run, tmp_path), tmp_path / "fresh"
    fresh.mkdir()
    holders = [subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder / ".lock")],
                                stdout=subprocess.PIPE, text=True) for folder in (out, fresh)]
    try:
        assert [holder.stdout.readline().strip() for holder in holders] == ["locked", "locked"]
        before, before_fresh = _snapshot(out), _snapshot(fresh)
        for argv in (["--resume", "--out", str(out)], TINY_ARGS + ["--out", str(out)]):
            err = _cli_error(capsys, argv)
            assert f"--out {out} is in use by another run (process {holders[0].pid}" in err
        assert f"process {holders[1].pid}" in _cli_error(capsys, TINY_ARGS + ["--out", str(fresh)])
        assert _snapshot(out) == before and _snapshot(fresh) == before_fresh
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def _resume_past_damage(tiny_run, tmp_path, capsys, damage, said: str):
    """A copy of the run, ``damage`` done to its newest checkpoint (20): --resume warns ``said``, restores the one
    before, sets the bad one aside and re-trains the same steps to the same losses. Returns the copy's folder."""
    original, _ = tiny_run
    out = _copy_run(tiny_run, tmp_path)
    damage(out / "checkpoints" / "20")
    summary = main(["--resume", "--out", str(out), "--sample-tokens", "0"])
    assert f"warning: checkpoint {out / 'checkpoints' / '20'} {said}" in capsys.readouterr().err
    assert summary["resumed_from"] == 10
    assert (out / "checkpoints.corrupt" / "20" / "state").is_dir()  # kept, out of the way
    # Every step's record exactly once and in order (a dict keyed by step would hide a record written twice).
    steps = [r["step"] for r in _records(out) if "loss" in r]
    want_steps = [r["step"] for r in _records(original) if "loss" in r]
    assert steps == want_steps == sorted(set(want_steps)), f"training records' steps {steps}, want {want_steps}"
    want, got = _train_losses(_records(original)), _train_losses(_records(out))
    for step in want:
        np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f"step {step}")
    return out


# Orbax leaves the reads of the failed restore as coroutines that complain when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_resume_falls_back_past_a_corrupt_checkpoint(tiny_run, tmp_path, capsys):
    """Item 2: the newest checkpoint does not read back (a truncated array file): --resume
    warns, restores the one before, sets the bad one aside and re-trains the same steps."""
    out = _resume_past_damage(tiny_run, tmp_path, capsys, _truncate_largest_array, "does not read back")

    # None intact (an emptied step folder, a truncated one): one line, nothing moved.
    shutil.rmtree(out / "checkpoints.corrupt")
    for item in (out / "checkpoints" / "20").iterdir():
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    _truncate_largest_array(out / "checkpoints" / "10")
    before = _snapshot(out)
    err = _cli_error(capsys, ["--resume", "--out", str(out)])
    assert f"no checkpoint in {out / 'checkpoints'} reads back: step 20 (" in err
    assert "; step 10 (OUT_OF_RANGE" in err
    assert _snapshot(out) == before and not (out / "checkpoints.corrupt").exists()


def _rewrite_with_a_nan(step_dir):
    """Checkpoint ``step_dir`` written again with one NaN in its first floating-point array: it reads back whole
    (bytes overwritten on disk mostly decode to other finite values: the arrays are compressed)."""
    folder, step = step_dir.parent, int(step_dir.name)
    with Checkpointer(folder) as ckpt:
        state, meta = ckpt.restore(None, step)
    leaves, tree = jax.tree.flatten(state)
    first = next(i for i, x in enumerate(leaves) if np.issubdtype(x.dtype, np.floating))
    damaged = np.array(leaves[first])
    damaged.flat[len(damaged.flat) // 2] = np.nan
    leaves[first] = damaged
    shutil.rmtree(step_dir)
    with Checkpointer(folder) as ckpt:
        ckpt.save(step, jax.tree.unflatten(tree, leaves), meta)
        ckpt.wait()


def test_resume_falls_back_past_a_checkpoint_with_nan_written_into_it(tiny_run, tmp_path, capsys):
    """A checkpoint damaged so that it still reads back, but holds NaN: every save is checked finite, so it is
    damage; --resume takes the one before (not training from it and blaming the training), sets it aside."""
    _resume_past_damage(tiny_run, tmp_path, capsys, _rewrite_with_a_nan, "does not read back: it holds NaN")


def test_a_reason_is_the_innermost_cause_but_not_a_suppressed_context():
    """An emptied meta file fails in json with "Expecting value", raised ``from None`` inside an ``except
    StopIteration``: the reason given was that StopIteration's "0"."""
    with pytest.raises(ValueError) as empty:
        json.loads("")
    assert _one_line(empty.value).startswith("Expecting value")
    try:
        try:
            raise OSError("disk gone")
        except OSError as e:
            raise ValueError("cannot read") from e
    except ValueError as e:
        assert _one_line(e) == "disk gone"


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """Item 3: a learning rate of 1e10 blows the model up at step 2: exit code 1, a line
    naming the step, the step-1 checkpoint kept, no record and no checkpoint of step 2."""
    out = tmp_path / "nan"
    err = _cli_error(capsys, TINY_ARGS + ["--out", str(out), "--lr", "1e10", "--warmup", "0",
                                          "--steps", "4", "--log-every", "1", "--checkpoint-every", "1"],
                     code=1)
    assert "non-finite training at step 2: loss nan" in err
    assert f"the last checkpoint, step 1 in {out / 'checkpoints'}" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    assert [(r["step"], np.isfinite(r["loss"])) for r in _records(out)] == [(1, True)]

    # Flags and data that would give a NaN never start a run.
    for flag, value in (("--lr", "inf"), ("--weight-decay", "nan"), ("--grad-clip", "inf")):
        flag_kind = "non-negative" if flag == "--weight-decay" else "positive"
        with pytest.raises(SystemExit):
            build_parser().parse_args([flag, value])
        assert f"argument {flag}: must be a {flag_kind} finite number" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--lr must be a finite number"):
        validate_config(TrainConfig(lr=float("inf")))
    tokens = tmp_path / "tokens.bin"
    np.array([1, 2, 300, 4] * 100, np.uint16).tofile(tokens)
    with pytest.raises(ValueError, match=f"{tokens} holds token id 300 .at token 2.*--vocab-size"):
        data_lib.load_data(tokens, vocab_size=256)
    assert all_finite({"a": np.ones(3), "step": np.int32(1)}) and not all_finite({"a": np.array([1, np.nan])})


def test_user_errors_are_one_line_naming_the_flag_or_file(tiny_run, tmp_path, capsys):
    """Item 4: no tracebacks, exit code 2, the flag or file named."""
    text = tmp_path / "input.txt"
    text.write_bytes(b"x" * 20)  # shorter than one sequence of 32
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\0" * 2001)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (["--out", str(a_file)], f"--out {a_file} is a file, not a folder"),
        (["--out", str(a_file / "sub")], f"--out {a_file / 'sub'}: cannot create"),
        (["--data", str(odd)], f"--data file {odd} is 2,001 bytes, not a whole number of uint16 tokens"),
        (["--data", str(text)], f"--data {text}: the training split has 19 tokens, fewer than --seq-len + 1"),
    ]
    if not ON_GPU:
        cases.append((["--attention", "cudnn"], "--attention cudnn needs an NVIDIA GPU"))
    for extra, message in cases:
        argv = TINY_ARGS + ["--out", str(tmp_path / "o")] + extra
        assert message in _cli_error(capsys, argv), extra
    assert not (tmp_path / "o").exists()  # nothing was written for any of them

    out = _copy_run(tiny_run, tmp_path)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 22, "loss"\n')  # a line cut short
    before = _snapshot(out)
    err = _cli_error(capsys, ["--resume", "--out", str(out), "--steps", "30"])
    n = len(before["metrics.jsonl"].splitlines())
    assert f"{out / 'metrics.jsonl'} line {n} is not a JSON record" in err
    assert _snapshot(out) == before

    # The command itself: `python -m train` exits non-zero with that one line.
    proc = subprocess.run([sys.executable, "-m", "train", "--out", str(a_file)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: --out {a_file} is a file, not a folder; choose a folder for the run")


def test_resume_past_steps_says_there_is_nothing_to_train(tiny_run, tmp_path, capsys):
    """Item 5: --steps below the checkpoint's step is an error, at it a no-op; nothing is written."""
    out = _copy_run(tiny_run, tmp_path)
    before = _snapshot(out)
    err = _cli_error(capsys, ["--resume", "--out", str(out), "--steps", "15"])
    assert (f"the checkpoint at step 20 in {out / 'checkpoints'} is already past --steps 15; "
            f"nothing to train") in err
    summary = main(["--resume", "--out", str(out)])
    assert summary["step"] == 20 and summary["loss"] is None
    assert "nothing to train: the checkpoint at step 20" in capsys.readouterr().out
    assert _snapshot(out) == before


# Another process: a tiny run that is sent SIGTERM as its step-10 checkpoint is being written.
_SIGTERM_AT_SAVE = textwrap.dedent("""
    import os, signal, sys
    from train import checkpoint, loop
    save = checkpoint.Checkpointer.save
    def save_then_sigterm(self, step, state, meta):
        save(self, step, state, meta)  # returns before the write is done
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)
    checkpoint.Checkpointer.save = save_then_sigterm
    sys.exit(loop.cli(sys.argv[1:]))
""")


def test_sigterm_finishes_the_checkpoint_being_saved(tmp_path):
    """SIGTERM (SLURM, Kubernetes, docker stop) stops a run as Ctrl-C does: the checkpoint being written is
    finished, the run says it was interrupted, exit code 143; the handler before the run is restored."""
    import signal

    out = tmp_path / "term"
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_AT_SAVE, *TINY_ARGS, "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "interrupted (SIGTERM); --resume continues" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["10"]
    from train.checkpoint import Checkpointer

    with Checkpointer(out / "checkpoints") as ckpt:
        assert ckpt.restore_meta(10)["step"] == 10

    before = signal.getsignal(signal.SIGTERM)
    assert cli(["--out", str(tmp_path / "term" / "config.json")]) == 2  # a user error: the handler is put back
    assert signal.getsignal(signal.SIGTERM) is before


# Another process: a tiny run that is sent a signal during step 7, between its checkpoints (every 10 steps).
_SIGNAL_AT_STEP_7 = textwrap.dedent("""
    import os, signal, sys
    from train import loop, metering
    step = metering.ThroughputMeter.step
    def step_then_signal(self, done, metrics, *, log):
        if done == 7:
            os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL_AT_7"]))
        return step(self, done, metrics, log=log)
    metering.ThroughputMeter.step = step_then_signal
    sys.exit(loop.cli(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_between_checkpoints_saves_the_last_finished_step(tiny_run, tmp_path, sig, code):
    """Ctrl-C or SIGTERM mid-run (a preemption) loses no work: the run saves its last finished step and exits
    130 or 143 (not the abort of exiting under queued steps); --resume then gives the uninterrupted run's losses."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_AT_STEP_7, *TINY_ARGS, "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), SIGNAL_AT_7=sig))
    assert proc.returncode == code, proc.stderr[-3000:]
    assert f"--resume continues from step 7 (saved in {out / 'checkpoints'})" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["7"]
    summary = main(["--resume", "--out", str(out), "--sample-tokens", "0"])
    assert summary["resumed_from"] == 7 and summary["step"] == 20
    want, got = _train_losses(_records(tiny_run[0])), _train_losses(_records(out))
    assert sorted(got) == sorted(want)  # every logged step once
    for step in want:
        np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f"step {step}")


def _edit_meta(step_dir, edit):
    """Rewrite the JSON meta of checkpoint ``step_dir`` through ``edit(meta)`` (as an older or other run's)."""
    path = pathlib.Path(step_dir) / "meta" / "metadata"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_resume_refuses_other_data_and_a_run_folder_inside_its_data(tmp_path, capsys):
    """A run folder inside a byte --data folder would train on its own checkpoints: refused. A resume re-reads
    --data: other bytes there (same length) are refused, naming --data; the same data resumes, as does a
    checkpoint saved before fingerprints were."""
    text = tmp_path / "data" / "input.txt"
    text.parent.mkdir()
    text.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 50)
    inside = tmp_path / "data" / "run"
    err = _cli_error(capsys, TINY_ARGS + ["--data", str(text.parent), "--out", str(inside)])
    assert f"--out {inside} is inside the --data folder {text.parent}" in err
    assert not inside.exists()

    out = tmp_path / "run"
    main(TINY_ARGS + ["--data", str(text), "--out", str(out), "--steps", "4", "--checkpoint-every", "2",
                      "--eval-every", "0"])
    shutil.rmtree(out / "checkpoints" / "4")
    original = text.read_bytes()
    text.write_bytes(original.replace(b"fox", b"cat"))
    before, _ = _snapshot(out), capsys.readouterr()
    err = _cli_error(capsys, ["--resume", "--out", str(out)])
    assert f"--data {text} is not the data the checkpoint at step 2 was trained on (blake2b '" in err
    assert _snapshot(out) == before
    text.write_bytes(original)
    assert main(["--resume", "--out", str(out), "--steps", "6"])["resumed_from"] == 2
    _edit_meta(out / "checkpoints" / "6", lambda meta: meta.pop("data"))  # an older checkpoint
    assert main(["--resume", "--out", str(out), "--steps", "8"])["resumed_from"] == 6


def test_a_checkpoints_folder_that_cannot_be_written_fails_before_training(tmp_path, capsys):
    """A file where OUT/checkpoints should be: one line naming the folder before any step is trained (it was
    found only at the second save, after training, and then hung in Orbax)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("in the way")
    err = _cli_error(capsys, TINY_ARGS + ["--out", str(out)])
    assert f"--out: cannot write checkpoints to {out / 'checkpoints'} (a file is in the way)" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()


def test_resume_keeps_the_checkpoints_dtype(tiny_run, tmp_path, capsys):
    """--dtype auto resolves on the platform at hand: a checkpoint trained in the other dtype (a GPU run resumed
    on a CPU, or the reverse; faked in its meta) is refused, naming --dtype, and nothing is written."""
    out = _copy_run(tiny_run, tmp_path)
    other = "float32" if ON_GPU else "bfloat16"
    _edit_meta(out / "checkpoints" / "20", lambda meta: meta["model_config"].update(dtype=other))
    before = _snapshot(out)
    err = _cli_error(capsys, ["--resume", "--out", str(out), "--steps", "24"])
    assert f"--dtype auto is {'bfloat16' if ON_GPU else 'float32'} on " in err
    assert f"but the checkpoint was trained in {other}" in err
    assert _snapshot(out) == before


# Another process: a tiny run whose checkpoints folder is made read-only once its step-10 checkpoint is on disk.
_READ_ONLY_AT_SAVE = textwrap.dedent("""
    import os, sys
    from train import checkpoint, loop
    save = checkpoint.Checkpointer.save
    def read_only_then_save(self, step, state, meta):
        if step == 20:
            self.wait()
            os.chmod(self.directory, 0o555)
        save(self, step, state, meta)
    checkpoint.Checkpointer.save = read_only_then_save
    sys.exit(loop.cli(sys.argv[1:]))
""")


def test_a_checkpoints_folder_lost_mid_run_stops_the_run_at_once(tmp_path):
    """The checkpoints folder made read-only, deleted or replaced by a file after the startup probe: the next save
    fails at once with one line naming the folder, and the checkpoints saved before still read back. (Orbax made
    the step folder in a background thread: its writer threads then waited 5 minutes for it before the process
    could exit, and a deleted folder was silently made anew.)"""
    import jax.numpy as jnp

    from train.checkpoint import Checkpointer

    # Read-only: Orbax's own write fails. Root writes anyway, so the run goes without that capability.
    command = [sys.executable, "-c", _READ_ONLY_AT_SAVE, *TINY_ARGS, "--out", str(tmp_path / "run")]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root writes into a read-only folder, and setpriv (to drop that) is missing")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    folder = tmp_path / "run" / "checkpoints"
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=200,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    finally:
        if folder.exists():
            folder.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [line for line in proc.stderr.strip().splitlines() if "%|" not in line]
    assert err[-1] == f"error: cannot write checkpoints to {folder} any more (Permission denied)", err[-5:]
    with Checkpointer(folder) as ckpt:
        assert ckpt.all_steps() == [10]
        state, meta = ckpt.restore(None, 10)
        assert meta["step"] == 10 and all_finite(state)

    # Written, but the old checkpoint past max_to_keep could not be deleted: said as such, at wait() or at the
    # next save(), and both checkpoints read back.
    def cannot_delete(steps):
        raise PermissionError(13, "Permission denied", str(steps))

    for surfaces in ("wait", "next save"):
        with Checkpointer(tmp_path / surfaces, max_to_keep=1) as ckpt:
            ckpt.save(1, {"w": jnp.ones(4)}, {"step": 1})
            ckpt.wait()
            ckpt._manager._checkpoint_deleter.delete_steps = cannot_delete
            ckpt.save(2, {"w": jnp.full(4, 2.0)}, {"step": 2})
            message = (f"checkpoint 2 was written to {ckpt.directory}, but removing older checkpoints failed "
                       "(Permission denied); they are kept")
            with pytest.raises(OSError, match=f"^{re.escape(message)}$"):
                ckpt.wait() if surfaces == "wait" else ckpt.save(3, {"w": jnp.ones(4)}, {"step": 3})
            assert ckpt.all_steps() == [1, 2] and ckpt.restore(None, 2)[1] == {"step": 2}

    # Deleted, or a file in its place: said as such (Orbax made a new folder, or failed in the background).
    with Checkpointer(tmp_path / "small") as ckpt:
        ckpt.save(1, {"w": jnp.ones(4)}, {"step": 1})
        ckpt.wait()
        moved = tmp_path / "moved"
        ckpt.directory.rename(moved)
        for why in ("it was deleted or moved", "a file is in the way"):
            message = f"cannot write checkpoints to {ckpt.directory} any more ({why})"
            with pytest.raises(OSError, match=f"^{re.escape(message)}$"):
                ckpt.save(2, {"w": jnp.ones(4)}, {"step": 2})
            ckpt.directory.write_text("in the way")
    with Checkpointer(moved) as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.restore(None, 1)[1] == {"step": 1}
