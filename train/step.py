"""The jitted computations of a run: initialisation, the train step, evaluation."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import gpt2
from train.config import TrainConfig


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warm-up, cosine decay and global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup,
        decay_steps=cfg.steps,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )

    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def decay_mask(params):
    """Which parameters AdamW decays: matrices and embeddings (``kernel``, ``embedding``), not biases or norms.
    By name, not rank: the attention's query/key/value biases are ``[heads, head_dim]`` arrays."""
    return jax.tree_util.tree_map_with_path(lambda path, p: _leaf_name(path) in ("kernel", "embedding"), params)


def _leaf_name(path) -> str:
    """The last named key of a pytree path (``.../attn/key/bias`` -> ``bias``)."""
    for key in reversed(path):
        name = getattr(key, "key", getattr(key, "name", None))
        if isinstance(name, str) and name != "value":  # nnx Variables may add a ``.value`` level
            return name
    return ""


def init_train_state(mcfg: gpt2.GPTConfig, tx: optax.GradientTransformation, key: jax.Array):
    """Fresh ``(params, opt_state)``; jit it with ``key`` as an argument.

    The key is an argument, not a constant: with no inputs XLA would try to
    constant-fold the whole random initialisation (minutes of compile at 124M).
    The params are plain nested dicts, not ``nnx.State``: they flatten in C++,
    which cuts the host's pytree work per train-step call (flatten the inputs,
    unflatten the outputs) from about 4.6 to 0.4 ms on the 590 arrays of GPT-2
    124M and its AdamW state (one CPU core; ``benchmarks/NOTES.md`` entry 11).
    """
    params = nnx.to_pure_dict(nnx.state(gpt2.GPT(mcfg, rngs=nnx.Rngs(key)), nnx.Param))
    return params, tx.init(params)


def abstract_state(mcfg: gpt2.GPTConfig, tx: optax.GradientTransformation,
                   sharding: jax.sharding.Sharding):
    """``init_train_state``'s output as ``ShapeDtypeStruct``s on ``sharding``: what a checkpoint restores into."""
    shapes = jax.eval_shape(functools.partial(init_train_state, mcfg, tx), jax.random.key(0))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when no floating-point leaf of ``tree`` holds a NaN or an infinity."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, grad_accum: int,
                    schedule: optax.Schedule | None = None):
    """``(train_step, loss_fn)``, pure functions of the parameter state, to be jitted.

    ``params`` is the model's ``nnx.Param`` state, as an ``nnx.State`` or as
    its plain-dict form (``nnx.to_pure_dict``, what ``main`` uses).
    ``loss_fn(params, x, y, dropout_rng, positions=None)``: mean next-token
    cross-entropy of ``x, y [B, T]``; ``positions`` ``[T]``, the position of
    each column (the zigzag order under context parallelism; default: the
    model's, see ``GPT.__call__``). ``train_step(params, opt_state, x, y,
    step, base_key, positions=None)`` takes ``x, y [grad_accum, B, T]``, averages the gradient over the
    micro-batches (a ``lax.scan``, so one compiled step does the whole
    accumulation) and applies one optimizer update; it returns the new
    ``params, opt_state`` and ``{"loss", "grad_norm"}``, plus ``"lr"`` (this
    step's learning rate) when ``schedule`` is given.
    """

    def loss_fn(params, x, y, dropout_rng, positions=None):
        model = nnx.merge(graphdef, params)
        logits = model(x, positions=positions, dropout_rng=dropout_rng)  # [B, T, V] in the compute dtype
        return gpt2.cross_entropy(logits, y).mean()

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(params, opt_state, x, y, step, base_key, positions=None):
        if x.ndim != 3 or x.shape[0] != grad_accum or y.shape != x.shape:  # else micro-batches would be dropped
            raise ValueError(f"x and y must be [grad_accum={grad_accum}, batch, seq] token ids of one shape, "
                             f"got x {x.shape} and y {y.shape}")
        key = jax.random.fold_in(base_key, step)  # dropout randomness of this step
        if grad_accum == 1:
            loss, grads = grad_fn(params, x[0], y[0], key, positions)
        else:
            def micro(carry, inputs):
                loss_sum, grad_sum = carry
                xi, yi, i = inputs  # [B, T], [B, T], micro-step index
                loss, grads = grad_fn(params, xi, yi, jax.random.fold_in(key, i), positions)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss, grads), _ = jax.lax.scan(
                micro, (jnp.zeros((), jnp.float32), zeros), (x, y, jnp.arange(grad_accum))
            )
            loss = loss / grad_accum
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if schedule is not None:  # read on the host without a second computation
            metrics["lr"] = schedule(step)
        return params, opt_state, metrics

    return train_step, loss_fn


def make_evaluate(loss_fn: Callable, batches: Sequence[tuple[np.ndarray, np.ndarray]],
                  put: Callable[[np.ndarray], jax.Array], positions: jax.Array | None = None) -> Callable[..., float]:
    """``evaluate(params)``: the mean loss over ``batches`` (this process's rows of each).

    ``loss_fn`` is the one :func:`make_train_step` returns, run without
    dropout; ``put`` makes the global array of a batch from this process's
    rows (``train.parallel.Parallel.put``), ``positions`` as for ``loss_fn``.
    """

    @jax.jit
    def eval_loss(params, x, y, positions):
        return loss_fn(params, x, y, None, positions)

    def evaluate(params) -> float:
        losses = [eval_loss(params, put(x), put(y), positions) for x, y in batches]
        return float(jnp.mean(jnp.stack(losses)))

    return evaluate
