"""Merge partial attention results exactly: ``combine``.

Attention over a key set split into disjoint parts is a weighted sum of the
parts' outputs. With each part's ``(out_i, lse_i)`` (the log-sum-exp of its
logits per query row),

    lse = log(sum_i exp(lse_i)),    out = sum_i exp(lse_i - lse) * out_i,

exactly the attention over all keys. Ring attention (key blocks arriving
around a ring) and split-K decoding (the cache split across programs) both
merge this way. Rows that see no key in a part have ``lse_i = -inf`` and
weight 0, and whatever that part's ``out_i`` holds there (NaN included) is
ignored; rows that see no key anywhere stay ``lse = -inf``, ``out = 0``.
Differentiable in every ``out_i`` and ``lse_i`` (plain ``jax.numpy``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_flash import validate

__all__ = ["combine"]


def combine(outs: Sequence[jax.Array], lses: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Merge partial results: ``outs[i]`` ``[B, Tq, N, H]`` and ``lses[i]`` ``[B, N, Tq]`` -> ``(out, lse)``.

    ``out`` has the dtype of ``outs[0]`` and is accumulated in float32;
    ``lse`` is float32. Both must be floating arrays.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"combine needs as many outputs as log-sum-exps, at least one; got {len(outs)} and {len(lses)}")
    for i, (o, l) in enumerate(zip(outs, lses)):
        for name, x in ((f"outs[{i}]", o), (f"lses[{i}]", l)):
            validate.check_array(name, x)
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
        if o.ndim != 4 or l.shape != (o.shape[0], o.shape[2], o.shape[1]):
            raise ValueError(
                f"part {i}: out must be [B, Tq, N, H] and lse [B, N, Tq]; got out {tuple(o.shape)} and lse {tuple(l.shape)}"
            )
        if o.shape != outs[0].shape:
            raise ValueError(f"every part must have one shape; part 0 is {tuple(outs[0].shape)}, part {i} {tuple(o.shape)}")
    lse_parts = jnp.stack([l.astype(jnp.float32) for l in lses])  # [P, B, N, Tq]
    top = jax.lax.stop_gradient(jnp.max(lse_parts, axis=0))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lse_parts - top)  # [P, B, N, Tq]; 0 for parts a row does not see
    total = jnp.sum(weights, axis=0)
    seen = total != 0  # a NaN total (a part's NaN lse) stays NaN in lse and out; only an empty row is -inf
    lse = jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    scale = jnp.swapaxes(weights / jnp.where(seen, total, 1.0), 2, 3)[..., None]  # [P, B, Tq, N, 1]
    # A part's rows with lse -inf saw no key: weight 0, and their outputs are zeroed so that 0 * NaN cannot reach.
    empty = jnp.swapaxes(lse_parts == -jnp.inf, 2, 3)[..., None]  # [P, B, Tq, N, 1]
    out = sum(jnp.where(e, 0.0, o.astype(jnp.float32)) * s for o, s, e in zip(outs, scale, empty))
    return out.astype(outs[0].dtype), lse
