"""Ctrl-C and SIGTERM in a training run: stop cleanly, with the state on disk.

* :func:`sigterm_interrupts`: for the whole run, SIGTERM (SLURM, Kubernetes,
  ``docker stop``) raises :class:`Terminated`, a ``KeyboardInterrupt``, so it
  stops the run as Ctrl-C does and the checkpoint being saved is finished.
* :class:`StopAtStep`: inside the training loop of a one-process run, the first
  Ctrl-C or SIGTERM only asks the loop to stop; the loop then saves the state
  of the last finished step (its parameters, optimizer state and data position
  agree there) and stops. A second Ctrl-C stops at once; a second SIGTERM is
  ignored, so the save is not cut short. With several processes a signal still
  stops at once: they would not agree on the step to save at.
* :func:`drain`: wait for the computations still queued on the devices before
  the process exits; exiting under them aborts the process (``terminate called
  without an active exception``) instead of returning 130 or 143.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import jax

__all__ = ["StopAtStep", "Terminated", "drain", "sigterm_interrupts"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, stopping the run as Ctrl-C does (exit code 143)."""


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM raises :class:`Terminated` meanwhile, so the checkpoint being saved is finished (not lost) on the
    way out; later ones are ignored until then. The previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the save short
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopAtStep:
    """The first Ctrl-C or SIGTERM within :meth:`installed` sets :attr:`signum`; the loop checks it between
    steps (:meth:`requested`) and calls :meth:`stop` once it has saved."""

    def __init__(self):
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self):
        """Take SIGINT and SIGTERM meanwhile (main thread, one process only; elsewhere they stop at once)."""
        if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
            yield self
            return

        def handler(signum, frame):
            if self.signum is None:
                self.signum = signum
            elif signum == signal.SIGINT:  # a second Ctrl-C: stop now, without the save
                raise KeyboardInterrupt()
            # a second SIGTERM: ignored, the save goes on

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                # After a SIGTERM the run is on its way out: a later one must not cut the last save short.
                signal.signal(s, signal.SIG_IGN if s == signal.SIGTERM == self.signum else h)

    def requested(self) -> bool:
        return self.signum is not None

    def stop(self, message: str) -> None:
        """Raise what the signal asked for: :class:`Terminated` (SIGTERM) or ``KeyboardInterrupt``."""
        raise (Terminated if self.signum == signal.SIGTERM else KeyboardInterrupt)(message)


def drain() -> None:
    """Wait for every live array's computation (errors in them are not this function's to report)."""
    for array in jax.live_arrays():
        try:
            array.block_until_ready()
        except Exception:  # a deleted (donated) buffer or a failed computation: nothing to wait for
            pass
