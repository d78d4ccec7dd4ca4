"""Text generation with GPT-2 (:mod:`models.gpt2`): :func:`generate`.

Two paths, one jitted call each per (model, shapes, options):

* with the KV cache (:meth:`models.gpt2.GPT.init_cache`): the prompt is
  prefilled with the flash kernel, then each new token attends over the cache
  with :func:`pallas_flash.decode.decode_attention`, all in one jitted
  ``lax.fori_loop``;
* without it: every step runs the model over a fixed ``block_size`` window
  (sliding past it), so the text may grow past ``block_size``.

``models.gpt2.generate`` is this function (re-exported there).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_flash import validate

if TYPE_CHECKING:  # models.gpt2 re-exports generate, so it imports this module
    from models.gpt2 import GPT

__all__ = ["generate"]


@dataclasses.dataclass(frozen=True)
class _Sampler:
    """Next tokens ``[B]`` from logits ``[B, V]``: greedy (``temperature == 0``) or top-k sampling.

    Well defined for every finite ``temperature >= 0``; one too small for float32 (below its smallest normal
    number) is greedy, the limit of sampling as the temperature goes to 0.
    """

    temperature: float
    top_k: int | None

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        logits = logits.astype(jnp.float32)  # [B, V]
        if self.temperature < np.finfo(np.float32).tiny:
            # 0, or 0 or subnormal in float32 (XLA flushes subnormals to zero): greedy, the limit as temperature -> 0.
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        scaled = logits / self.temperature  # [B, V]
        # A small temperature can overflow logits / temperature to +inf for every positive logit, and the sampler
        # then picks the first of them (often token 0), not the largest logit.
        # With the row's max subtracted first every value is <= 0 and the max is 0, so nothing overflows upwards;
        # rows that stayed finite keep the plain quotient, so ordinary temperatures sample the same tokens as before.
        shifted = (logits - jnp.max(logits, axis=-1, keepdims=True)) / self.temperature  # [B, V]
        logits = jnp.where(jnp.isfinite(scaled).all(axis=-1, keepdims=True), scaled, shifted)
        if self.top_k is not None:
            kth = jax.lax.top_k(logits, min(self.top_k, logits.shape[-1]))[0][:, -1:]  # [B, 1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "new_tokens", "sample"))
def _generate_without_cache(graphdef, state, prompt, rng, *, new_tokens: int, sample: _Sampler):
    """Every step runs the model over a fixed ``block_size`` window (sliding past it)."""
    m = nnx.merge(graphdef, state)
    window = m.config.block_size
    (B, P), total = prompt.shape, prompt.shape[1] + new_tokens
    buf = jnp.zeros((B, max(total, window)), jnp.int32).at[:, :P].set(prompt)  # [B, L]

    def step(t, carry):  # write token t from the tokens before it
        buf, rng = carry
        start = jnp.maximum(t - window, 0)
        ctx = jax.lax.dynamic_slice_in_dim(buf, start, window, axis=1)  # [B, W]
        logits = jax.lax.dynamic_index_in_dim(m(ctx), t - 1 - start, axis=1, keepdims=False)  # [B, V]
        rng, sub = jax.random.split(rng)
        return buf.at[:, t].set(sample(logits, sub)), rng

    return jax.lax.fori_loop(P, total, step, (buf, rng))[0][:, :total]


@functools.partial(jax.jit, static_argnames=("graphdef", "new_tokens", "sample", "decode_implementation"))
def _generate_with_cache(graphdef, state, prompt, rng, *, new_tokens: int, sample: _Sampler,
                         decode_implementation: str):
    """Prefill the prompt (flash kernel), then one token per step over the KV cache."""
    m = nnx.merge(graphdef, state)
    (B, P), total = prompt.shape, prompt.shape[1] + new_tokens
    m.init_cache(B, total)
    logits = m.head(m.features(prompt, prefill=True)[:, -1])  # [B, V], from the last prompt token
    rng, sub = jax.random.split(rng)
    buf = jnp.zeros((B, total), jnp.int32).at[:, :P].set(prompt).at[:, P].set(sample(logits, sub))
    graphdef, cache, rest = nnx.split(m, nnx.Cache, ...)

    def step(t, carry):  # write token t from token t - 1 and the cache (tokens 0 .. t-2)
        buf, cache, rng = carry
        m = nnx.merge(graphdef, cache, rest)
        last = jax.lax.dynamic_slice_in_dim(buf, t - 1, 1, axis=1)  # [B, 1]
        logits = m(last, decode=True, decode_implementation=decode_implementation)[:, 0]  # [B, V]
        rng, sub = jax.random.split(rng)
        return buf.at[:, t].set(sample(logits, sub)), nnx.state(m, nnx.Cache), rng

    return jax.lax.fori_loop(P + 1, total, step, (buf, cache, rng))[0]


def _check_sampling(temperature, top_k) -> tuple[float, int | None]:
    """``temperature`` a finite real >= 0 and ``top_k`` ``None`` or an int >= 1 (not bools), as Python numbers.

    Both are static (the sampler is part of the compiled loop's key); a NaN temperature would sample token 0.
    """
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__} {temperature!r}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    return temperature, validate.optional_positive_int("top_k", top_k)


def _check_prompt(prompt, vocab: int) -> jax.Array:
    """Integer token ids in ``[0, vocab)`` as ``int32 [P]`` or ``[B, P]``.

    The ids are checked at their own width, before the cast: ``int32`` would truncate floats and wrap an int64
    ``2**32 + 1`` to ``1``. An id past the embedding table would embed as NaN, one below it as garbage.
    """
    if isinstance(prompt, jax.Array):  # a tracer too: its dtype and shape are known
        ids = prompt
    else:
        try:
            ids = np.asarray(prompt)  # NumPy keeps int64 wide (jnp.asarray would wrap it to int32 without x64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"prompt must be integer token ids, got {type(prompt).__name__}: {e}") from None
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"prompt must be integer token ids, got dtype {ids.dtype}")
    if ids.ndim not in (1, 2) or ids.size == 0:
        raise ValueError(f"prompt must be non-empty token ids of shape [P] or [batch, P], got {ids.shape}")
    if not isinstance(ids, jax.core.Tracer):
        outside = (ids < 0) | (ids >= vocab)
        if bool(outside.any()):
            raise ValueError(f"prompt (shape {ids.shape}) holds token ids outside [0, vocab_size={vocab}): "
                             f"{ids[outside][:8].tolist()}")
    return jnp.asarray(ids, jnp.int32)


def _check_rng(rng) -> jax.Array:
    """One PRNG key: ``jax.random.key(seed)``, or a legacy ``jax.random.PRNGKey(seed)``; ``None``: ``key(0)``."""
    if rng is None:
        return jax.random.key(0)
    dtype, shape = getattr(rng, "dtype", None), getattr(rng, "shape", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        ok = shape == ()
    else:  # the raw uint32 key data of the default implementation
        ok = dtype == np.uint32 and shape == jax.random.key_data(jax.random.key(0)).shape
    if not ok:
        what = type(rng).__name__ if dtype is None else f"{type(rng).__name__} of dtype {dtype} and shape {shape}"
        raise TypeError(f"rng must be one PRNG key, jax.random.key(seed) (or a legacy jax.random.PRNGKey(seed)), "
                        f"got {what}")
    return rng


def generate(
    model: GPT,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 40,
    rng: jax.Array | None = None,
    use_cache: bool | None = None,
    decode_implementation: str = "pallas",
) -> jax.Array:
    """Sample ``max_new_tokens`` after ``prompt``: int ``[P]`` -> ``[P + new]``, ``[B, P]`` -> ``[B, P + new]``.

    ``prompt``: integer token ids in ``[0, vocab_size)`` (else ``TypeError``
    or ``ValueError``). ``max_new_tokens``: a Python or NumPy int ``>= 0``.
    ``temperature`` (a finite real ``>= 0``): ``0`` is greedy decoding;
    otherwise top-k sampling, ``top_k`` an int ``>= 1`` or ``None`` (the
    whole vocabulary). ``rng``: one PRNG key (``jax.random.key(seed)``),
    default ``key(0)``. One jitted
    call per (model, shapes, options); repeated calls reuse the compiled loop.

    With the KV cache (``use_cache=True``): the prompt is prefilled with the
    flash kernel (``config.attention``), then a ``lax.fori_loop`` feeds one
    token per step, whose attention reads the cache through
    ``decode_attention(implementation=decode_implementation)`` (``"pallas"``
    or ``"xla"``). GPT-2's positions are learned up to ``block_size``, so
    ``P + max_new_tokens > block_size`` raises ``ValueError`` there.

    Without (``use_cache=False``, the path from before the cache): every step
    runs the model over a fixed ``block_size`` window, the last ``block_size``
    tokens once the text is longer, so it can go past ``block_size``.
    ``use_cache=None`` (default) takes the cache whenever the text fits.
    Both paths draw token ``t``'s randomness from the same key. A model
    built with ``context_parallel`` raises ``NotImplementedError``.
    """
    if getattr(model, "context_parallel", None) is not None:
        raise NotImplementedError(
            "generate under context parallelism: the KV cache and the sliding window run on whole sequences in "
            "order; build the model without context_parallel (same parameters: nnx.merge its graphdef with them)")
    max_new_tokens = validate.int_at_least("max_new_tokens", max_new_tokens, 0)  # static: the loop's length
    temperature, top_k = _check_sampling(temperature, top_k)
    if use_cache not in (None, True, False):
        raise ValueError(f"use_cache must be None, True or False, got {use_cache!r}")
    if decode_implementation not in ("pallas", "xla"):
        raise ValueError(f"decode_implementation must be 'pallas' or 'xla', got {decode_implementation!r}")
    prompt = _check_prompt(prompt, model.config.vocab_size)
    batched = prompt.ndim == 2
    prompt = prompt if batched else prompt[None]  # [B, P]
    total, block = prompt.shape[1] + max_new_tokens, model.config.block_size
    if use_cache and total > block:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds block_size {block}: "
            "with the KV cache every position needs a learned position embedding (use_cache=False slides a window)")
    rng = _check_rng(rng)
    if max_new_tokens == 0:
        out = prompt
    else:
        graphdef, state = nnx.split(model)
        kw = dict(new_tokens=max_new_tokens, sample=_Sampler(temperature, top_k))
        if use_cache is False or total > block:
            out = _generate_without_cache(graphdef, state, prompt, rng, **kw)
        else:
            out = _generate_with_cache(graphdef, state, prompt, rng, decode_implementation=decode_implementation, **kw)
    return out if batched else out[0]
