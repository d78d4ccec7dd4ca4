"""Orbax checkpoints of a training run: arrays (params, optimizer state) + JSON meta.

A checkpoint ``OUT/checkpoints/<step>/`` holds ``state`` (the array pytree,
restored onto whatever shardings the caller asks for) and ``meta`` (plain
JSON: step, data position, RNG key, the configs). Saving is asynchronous and
atomic: a run killed while writing leaves the previous checkpoint intact, and
Orbax ignores the unfinished one.

A checkpoint damaged afterwards (a truncated array file, an emptied step
folder, or values the caller's ``intact`` check refuses) does not read back:
:meth:`Checkpointer.restore_newest_intact` then falls back to the newest one
that does, and :meth:`Checkpointer.set_aside` moves the damaged ones to
``checkpoints.corrupt/`` (kept, out of the way of the steps that will be saved
again).

A folder lost mid-run (deleted, made read-only, a file in its place) fails the next save at once, naming it;
the checkpoints saved before are not touched. Where a checkpoint was written but Orbax could not then delete the
ones past ``max_to_keep``, the error says that, and they are kept.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CorruptCheckpoint", "NoIntactCheckpoint"]

#: What every checkpoint's JSON part holds (see ``train.loop``).
META_KEYS = ("step", "data_position", "rng_key", "train_config", "model_config")


class CorruptCheckpoint(Exception):
    """Checkpoint ``step`` does not read back; ``reason`` says why, in one line."""

    def __init__(self, directory: pathlib.Path, step: int, reason: str):
        super().__init__(f"checkpoint {directory / str(step)} does not read back: {reason}")
        self.step, self.reason = step, reason


class NoIntactCheckpoint(ValueError):
    """No checkpoint in the folder reads back (a user error: one line, exit code 2)."""


def _one_line(error: BaseException, limit: int = 300) -> str:
    """The innermost cause of ``error``, as one short line.

    A context the raiser suppressed (``raise ... from None``) is not followed: json's "Expecting value" hides
    the ``StopIteration('0')`` it was raised from, which says nothing."""
    while True:
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None:
            break
        error = inner
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Checkpointer:
    """Save and restore ``(state, meta)`` pairs under ``directory``."""

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        # The step folder is made in save(), not in a background thread: where it cannot be made (the folder
        # deleted, replaced or made read-only mid-run), save() fails at once. Made in the background, Orbax's
        # writer threads waited for it (their 5-minute barrier timeout), and the process could not exit meanwhile.
        sync_folders = ocp.AsyncOptions(create_directories_asynchronously=False)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, async_options=sync_folders),
        )
        self._saving: int | None = None  # the step of the last save() started

    def check_writable(self) -> None:
        """Make the folder and a probe folder and file in it, then remove them: a folder that cannot take a
        checkpoint (read-only, a file in the way) fails here, before training, not at the first save."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = pathlib.Path(tempfile.mkdtemp(prefix=".write-probe-", dir=self.directory))
            (probe / "probe").write_bytes(b"probe")
            shutil.rmtree(probe)
        except OSError as e:
            why = "a file is in the way" if self.directory.is_file() else e.strerror or str(e)
            raise ValueError(f"--out: cannot write checkpoints to {self.directory} ({why})") from None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps present, oldest first (read from the folder, not cached)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start writing checkpoint ``step`` (returns before the write finishes).

        A folder gone or not writable any more raises ``OSError`` naming it, at once; the checkpoints saved before
        are left as they are (Orbax deletes old ones only once a newer one is written).
        """
        self._check_folder()
        with self._write_errors():  # the previous save's failure is its own (Orbax's save() waits for it anyway)
            self._manager.wait_until_finished()
        self._saving = step
        with self._write_errors():
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON part (cheap: no arrays are read)."""
        step = self._check_step(step)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(out.meta)
        except Exception as e:  # Orbax and TensorStore raise many kinds; all mean "unreadable"
            raise CorruptCheckpoint(self.directory, step, _one_line(e)) from e
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise CorruptCheckpoint(self.directory, step, f"its meta lacks {missing}")
        return meta

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Read checkpoint ``step`` (default: the latest).

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with
        shardings, shaped like the saved state; the arrays come back on those
        shardings.
        """
        step = self._check_step(step)
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # a truncated array file fails deep inside TensorStore
            raise CorruptCheckpoint(self.directory, step, _one_line(e)) from e
        return out.state, dict(out.meta)

    def restore_newest_intact(
        self, abstract_for: Callable[[dict[str, Any]], Any], *, warn: Callable[[str], None],
        intact: Callable[[Any], str | None] = lambda state: None,
    ) -> tuple[Any, dict[str, Any], list[int]]:
        """``(state, meta, corrupt)`` of the newest checkpoint that reads back whole.

        ``abstract_for(meta)`` gives the abstract state (see :meth:`restore`)
        of a checkpoint from its meta; its own errors pass through.
        ``intact(state)``: why a state that did read back is damaged all the
        same (e.g. a NaN where every save is checked finite), or None. The newer
        checkpoints that do not read are named through ``warn`` (once one
        does) and listed in ``corrupt``, newest first; nothing is moved or
        deleted here (see :meth:`set_aside`). When none reads, raises
        :class:`NoIntactCheckpoint` naming each one and why.
        """
        failures = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(abstract_for(self.restore_meta(step)), step)
                damage = intact(state)
                if damage is not None:
                    raise CorruptCheckpoint(self.directory, step, damage)
            except CorruptCheckpoint as e:
                failures.append(e)
                continue
            for e in failures:
                warn(f"warning: {e}; resuming from step {step}, the newest one that does")
            return state, meta, [e.step for e in failures]
        if not failures:
            raise NoIntactCheckpoint(f"--resume: no checkpoint in {self.directory}")
        raise NoIntactCheckpoint(
            f"--resume: no checkpoint in {self.directory} reads back: "
            + "; ".join(f"step {e.step} ({e.reason})" for e in failures)
        )

    def set_aside(self, step: int) -> pathlib.Path | None:
        """Move checkpoint ``step`` to ``checkpoints.corrupt/<step>[.n]``; returns where (None if gone)."""
        source = self.directory / str(step)
        if not source.exists():  # another host of the run moved it already
            return None
        parent = self.directory.with_name(self.directory.name + ".corrupt")
        parent.mkdir(exist_ok=True)
        target, n = parent / str(step), 0
        while target.exists():
            n += 1
            target = parent / f"{step}.{n}"
        source.rename(target)
        self._manager.reload()
        return target

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        with self._write_errors():
            self._manager.wait_until_finished()

    def _check_folder(self) -> None:
        if not self.directory.is_dir():  # deleted, moved or replaced mid-run: Orbax would make a new one
            why = "a file is in the way" if self.directory.exists() else "it was deleted or moved"
            raise OSError(f"cannot write checkpoints to {self.directory} any more ({why})")

    @contextlib.contextmanager
    def _write_errors(self):
        """Orbax failing to write a checkpoint (an OSError, TensorStore's ValueError) as one line naming the folder."""
        try:
            yield
        except (OSError, ValueError) as e:
            self._check_folder()  # the likeliest cause, said plainly
            why = e.strerror if isinstance(e, OSError) and e.strerror else _one_line(e)
            if self._saving is not None and self._saving in self.all_steps():
                # Orbax finalizes a checkpoint, then deletes the old ones past max_to_keep: what failed came after
                raise OSError(f"checkpoint {self._saving} was written to {self.directory}, but removing older "
                              f"checkpoints failed ({why}); they are kept") from e
            raise OSError(f"cannot write checkpoints to {self.directory} any more ({why})") from e

    def close(self) -> None:
        """Wait for pending saves, then release Orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step


def abstract_like(tree: Any) -> Any:
    """``ShapeDtypeStruct``s (with shardings) for every array in ``tree``."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )
