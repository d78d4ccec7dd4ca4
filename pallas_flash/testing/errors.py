"""The one relative error that the tests and the benchmarks judge results by."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["rel_err"]


@functools.lru_cache(maxsize=None)
def _norms_fn():
    @jax.jit
    def norms(x, ref):
        x, ref = x.astype(jnp.float64), ref.astype(jnp.float64)
        return jnp.all(jnp.isfinite(x)), jnp.linalg.norm(x - ref), jnp.linalg.norm(ref)

    return norms


def rel_err(x, ref) -> float:
    """``||x - ref|| / ||ref||`` in float64 (``||x - ref||`` where ``ref`` is all zeros).

    Any NaN or inf in ``x`` gives ``inf``, so a result with one never passes a
    ``rel_err(x, ref) < tol`` check. Device arrays stay on their device (a
    benchmark's large outputs are not copied to the host); NumPy arrays work too.
    """
    with jax.enable_x64(True):
        finite, num, den = _norms_fn()(jnp.asarray(x), jnp.asarray(ref))
        if not bool(finite):
            return float("inf")
        return float(num / den) if float(den) > 0 else float(num)
