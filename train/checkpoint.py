"""Orbax checkpoints of a training run: arrays (params, optimizer state) + JSON meta.

A checkpoint ``OUT/checkpoints/<step>/`` holds ``state`` (the array pytree,
restored onto whatever shardings the caller asks for) and ``meta`` (plain
JSON: step, data position, RNG key, the configs). Saving is asynchronous and
atomic: a run killed while writing leaves the previous checkpoint intact, and
Orbax ignores the unfinished one.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


class Checkpointer:
    """Save and restore ``(state, meta)`` pairs under ``directory``."""

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start writing checkpoint ``step`` (returns before the write finishes)."""
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
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out.meta)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Read checkpoint ``step`` (default: the latest).

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with
        shardings, shaped like the saved state; the arrays come back on those
        shardings.
        """
        step = self._check_step(step)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return out.state, dict(out.meta)

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

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
