"""The run folder ``--out``: its lock, ``metrics.jsonl`` and ``config.json``.

One run at a time: :func:`lock` holds an exclusive ``flock`` on ``OUT/.lock``
for the whole run, so a second run on the same folder stops before it reads
or writes anything there (two runs would interleave ``metrics.jsonl`` and
overwrite each other's checkpoints). The lock goes with the process, however
it ends; the file stays, holding the last holder's process id.

Files are replaced atomically (written to a temporary name, then renamed), so
a run killed while rewriting ``metrics.jsonl`` leaves the old file whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

__all__ = ["MetricsLog", "RunFolderBusy", "check_out", "lock", "write_text_atomic"]

LOCK_NAME = ".lock"


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock (a user error: one line, exit code 2)."""


def check_out(out: pathlib.Path) -> None:
    """``--out`` must be a folder or not exist yet."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a folder for the run")


@contextlib.contextmanager
def lock(out: pathlib.Path, *, enabled: bool = True) -> Iterator[None]:
    """Create ``out`` if needed and hold its lock while the block runs.

    Raises :class:`RunFolderBusy` at once if another process holds it. With
    ``enabled`` False (the other processes of a multi-host run) it does
    nothing: process 0 holds the lock for the whole run.
    """
    if not enabled:
        yield
        return
    check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the run folder or its lock ({e.strerror})") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunFolderBusy(
                f"--out {out} is in use by another run (process {holder}, lock {out / LOCK_NAME}); "
                f"wait for it to end or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLog:
    """``metrics.jsonl``: one JSON object a line, each with a ``step``; appended across resumes.

    Opening reads and checks the records already there (a line that is not
    a record is an error naming the file and line, before anything changes);
    :meth:`rewind` drops the records past a resumed checkpoint.
    """

    def __init__(self, path: pathlib.Path, *, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.lines: list[tuple[int, str]] = []  # (step, line) of the records there
        self._unterminated = False  # the last record has no newline (a hand repair): the next write adds one
        if enabled and path.exists():
            text = path.read_text(errors="replace")
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    self.lines.append((self._step(line, number), line))
            self._unterminated = bool(text) and not text.endswith("\n")

    def _step(self, line: str, number: int) -> int:
        try:
            record = json.loads(line)
            step = record["step"] if isinstance(record, dict) else None
        except ValueError as e:
            raise ValueError(f"{self.path} line {number} is not a JSON record ({e}); repair or "
                             f"delete that line, then run again") from None
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"{self.path} line {number} has no integer \"step\"; repair or delete "
                             f"that line, then run again")
        return step

    def rewind(self, step: int) -> None:
        """Drop the records past ``step``: the resumed state did not keep them."""
        if self.enabled and any(s > step for s, _ in self.lines):
            self.lines = [(s, line) for s, line in self.lines if s <= step]
            write_text_atomic(self.path, "".join(line + "\n" for _, line in self.lines))
            self._unterminated = False

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write("\n" * self._unterminated + json.dumps(record) + "\n")
            self._unterminated = False
