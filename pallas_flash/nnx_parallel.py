"""Context parallelism for :class:`pallas_flash.nnx.FlashMultiHeadAttention`.

A layer built with ``context_parallel=ContextParallel(mesh, seq_axis="seq",
batch_axis="data")`` runs its self-attention as ring attention
(:func:`pallas_flash.sharding.context.sequence_parallel_attention`) over the
devices of ``seq_axis``: the sequence of its inputs ``[B, T, features]`` is
sharded over that axis (and the batch over ``batch_axis``), each device holds
``T / n`` tokens, and the keys and values travel around the ring; nothing is
gathered. Everything outside attention (projections, MLPs, norms) is per
token, so it shards over the sequence with no communication.

Under the default ``layout="zigzag"`` the sequence axis of the inputs is in
zigzag order (of ``2n`` equal chunks, device ``i`` holds chunks ``i`` and
``2n - 1 - i``), which balances causal work across the ring;
:meth:`ContextParallel.order` gives the original position of each column, the
positions a model must embed (``models.gpt2.GPT`` does that by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from pallas_flash.sharding import sequence_parallel_attention
from pallas_flash.sharding.layout import zigzag_chunks
from pallas_flash.sharding.ring import LAYOUTS

__all__ = ["ContextParallel"]


def _axis_names(axes) -> tuple[Hashable, ...]:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, tuple) else (axes,)


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """Where a layer's sequence lives: ring attention over ``mesh``'s ``seq_axis``.

    Attributes:
      mesh: the ``jax.sharding.Mesh`` the inputs are sharded on.
      seq_axis: the mesh axis (or tuple of axes) the sequence is sharded over.
      batch_axis: the mesh axis (or axes) the batch is sharded over, or None.
      head_axis: the mesh axis (or axes) the attention heads are sharded over
        inside attention, or None.
      layout: ``"zigzag"`` (default; the inputs' sequence is in zigzag order)
        or ``"contiguous"`` (device ``i`` holds the ``i``-th ``T / n`` tokens).
    """

    mesh: Mesh
    seq_axis: Hashable = "seq"
    batch_axis: Hashable | None = None
    head_axis: Hashable | None = None
    layout: str = "zigzag"

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise TypeError(f"ContextParallel.mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"ContextParallel.layout must be one of {LAYOUTS}, got {self.layout!r}")
        used: list[Hashable] = []
        for field in ("seq_axis", "batch_axis", "head_axis"):
            names = _axis_names(getattr(self, field))
            if field == "seq_axis" and not names:
                raise ValueError("ContextParallel.seq_axis must name a mesh axis, got None")
            for name in names:
                if name not in self.mesh.axis_names:
                    raise ValueError(
                        f"ContextParallel.{field} {name!r} is not an axis of the mesh, whose axes are "
                        f"{tuple(self.mesh.axis_names)}")
                if name in used:
                    raise ValueError(f"ContextParallel: mesh axis {name!r} is used twice")
                used.append(name)

    @property
    def size(self) -> int:
        """``n``, the devices on the ring (the size of ``seq_axis``)."""
        return int(np.prod([self.mesh.shape[a] for a in _axis_names(self.seq_axis)]))

    @property
    def chunks(self) -> int:
        """Equal chunks the sequence is cut into: ``2n`` (zigzag) or ``n`` (contiguous)."""
        return self.size * (2 if self.layout == "zigzag" else 1)

    def check_length(self, seq_len: int) -> None:
        """``ValueError`` unless a sequence of ``seq_len`` tokens cuts into :attr:`chunks` equal chunks."""
        if seq_len % self.chunks:
            raise ValueError(
                f"context parallelism over {self.size} devices ({self.layout} layout) cuts the sequence into "
                f"{self.chunks} equal chunks, but its length is {seq_len}")

    def order(self, seq_len: int) -> np.ndarray:
        """int32 ``[seq_len]``: the original position of each column of a sequence laid out for the ring.

        ``arange`` for the contiguous layout; the zigzag permutation for
        ``"zigzag"``, so ``x[..., order]`` puts a sequence ``x`` in that
        layout (the same as ``pallas_flash.zigzag(x, n, axis=-1)``).
        """
        self.check_length(seq_len)
        positions = np.arange(seq_len, dtype=np.int32)
        if self.layout == "contiguous":
            return positions
        pieces = np.split(positions, 2 * self.size)
        return np.concatenate([pieces[c] for c in zigzag_chunks(self.size)])

    def attend(self, query: jax.Array, key: jax.Array, value: jax.Array, *, is_causal: bool,
               scale: float | None, implementation: str, refused: dict[str, Any], **side: Any) -> jax.Array:
        """Ring attention on global ``[B, T, N, H]`` q and ``[B, T, K, H]`` k/v laid out for this ring.

        ``refused``: the layer's features ring attention lacks, by name
        (``NotImplementedError`` naming those that are set). ``side``: segment
        ids (in the layout's order) and lengths (in original positions).
        """
        given = [name for name, value in refused.items() if value is not None]
        if given:
            raise NotImplementedError(
                f"{', '.join(given)} under context parallelism: ring attention supports causal masking, "
                "lengths and segment ids only")
        self.check_length(query.shape[1])
        return sequence_parallel_attention(
            query, key, value, mesh=self.mesh, seq_axis=self.seq_axis, batch_axis=self.batch_axis,
            head_axis=self.head_axis, layout=self.layout, is_causal=is_causal, scale=scale,
            implementation=implementation, **{name: x for name, x in side.items() if x is not None},
        )
