"""GPT-2 in Flax NNX, in one readable file (in the spirit of nanoGPT).

Pre-LayerNorm transformer with learned position embeddings and a language-model
head tied to the token embedding. Initialisation follows GPT-2: every weight
~ normal(0.02), biases zero, and the two projections that write into the
residual stream (attention output, MLP output) ~ normal(0.02 / sqrt(2 * n_layer)).

Attention is :class:`pallas_flash.nnx.FlashMultiHeadAttention` with
``is_causal=True``; ``GPTConfig.attention`` picks the backend (``"pallas"``: per
pass the fastest Pallas kernels; ``"triton"`` or ``"mosaic"``: one of them;
``"xla"``, ``"cudnn"``; or ``None`` for the library's automatic choice).
Computation runs in ``GPTConfig.dtype`` (bfloat16 by default) with float32
parameters. The residual stream is kept in ``GPTConfig.residual_dtype``,
by default the compute dtype, as llm.c keeps it (layer-norm statistics are
still float32); ``"float32"`` gives nanoGPT-under-autocast numerics, at
about 1 ms more per 16k-token GPT-2 step on an H100. Logits come out in the compute
dtype, as under PyTorch autocast: a float32 ``[B, T, 50304]`` logits tensor
would cost 3.3 GB per 16k tokens, and its gradient would send the tied head's
two backward matmuls down the slow float32 path. :func:`cross_entropy` takes
them from there, in float32 arithmetic, with a hand-fused gradient. The MLP's
GELU is :func:`bias_gelu`, which recomputes its ``tanh`` in the backward pass
rather than keeping a second ``[B, T, 4D]`` tensor for it.

Presets (``PRESETS`` / :func:`get_config`):

* ``tiny``: 2 layers, 4 heads, width 128, block 128, vocab 256 (bytes); for
  CPU runs and tests, a fraction of a second per step.
* ``gpt2``: the 124M model (12 layers, 12 heads, width 768, block 1024) with
  the GPT-2 BPE vocabulary padded to 50304 (a multiple of 64). Trained on
  byte-level data the training script swaps in ``vocab_size=256``, keeping
  the 124M body (about 85M non-embedding parameters).
* ``gpt2-medium``: 350M (24 layers, 16 heads, width 1024).

Context parallelism (long sequences sharded over devices):
``GPT(cfg, context_parallel=ContextParallel(mesh, seq_axis="seq",
batch_axis="data"), rngs=...)`` runs every attention layer as ring attention
over the mesh axis ``seq``. Its input ``idx`` is then in the layout's order
(zigzag by default: ``idx[:, cp.order(T)]``), and the position embeddings
follow (``positions`` defaults to ``cp.order(T)``); the logits come out in the
same order. ``train`` uses it for ``--context-parallel N``.

Generation is :func:`models.generate.generate` (re-exported here as
``generate``): it keeps a KV cache in every attention layer
(:meth:`GPT.init_cache`), prefilled with the flash kernel, then each new token
attends over the cache with :func:`pallas_flash.decode.decode_attention`.

Shape legend in the comments: B batch, T sequence, D width (n_embd), N heads,
H head dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.generate import generate  # re-exported: models.gpt2.generate
from pallas_flash import validate
from pallas_flash.nnx import ContextParallel, FlashMultiHeadAttention

__all__ = [
    "GPT",
    "GPTConfig",
    "PRESETS",
    "bias_gelu",
    "cross_entropy",
    "flops_per_token",
    "generate",
    "get_config",
    "param_count",
]

ATTENTION_CHOICES = ("pallas", "triton", "mosaic", "xla", "cudnn")  # pallas: per pass the fastest Pallas backend


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model hyper-parameters (all plain values, so it serialises to JSON)."""

    vocab_size: int = 50304
    block_size: int = 1024  # longest sequence (learned position table size)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # embedding and residual dropout (not attention probs)
    attention: str | tuple[str, ...] | None = None  # backend, see module docstring
    dtype: str = "bfloat16"  # computation dtype
    param_dtype: str = "float32"
    residual_dtype: str | None = None  # the residual stream; None: the compute dtype

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.attention is not None and not isinstance(self.attention, (str, list, tuple)):
            raise ValueError(f"GPTConfig.attention must be None, a backend name or a sequence of them, "
                             f"got {self.attention!r}")
        choices = (self.attention,) if isinstance(self.attention, str) else self.attention
        if isinstance(self.attention, list):  # from JSON: keep the dataclass hashable
            object.__setattr__(self, "attention", tuple(self.attention))
        if choices is not None and (
            not choices or any(c not in ATTENTION_CHOICES for c in choices)
        ):
            raise ValueError(
                f"GPTConfig.attention must be None, one of {ATTENTION_CHOICES} or a "
                f"sequence of them, got {self.attention!r}"
            )
        for name in ("dtype", "param_dtype", "residual_dtype"):
            if name == "residual_dtype" and self.residual_dtype is None:
                continue
            value = getattr(self, name)
            try:
                floating = value is not None and jnp.issubdtype(jnp.dtype(value), jnp.floating)
            except TypeError:
                floating = False
            if not floating:  # an int8 residual stream would silently zero the model
                raise ValueError(f"GPTConfig.{name} must name a float dtype, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(vocab_size=256, block_size=128, n_layer=2, n_head=4, n_embd=128),
    "gpt2": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(
        vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=1024
    ),
}


def get_config(name: str, **overrides) -> GPTConfig:
    """A preset by name, with fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; a no-op when ``rng`` is None (evaluation)."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return x * (keep / (1.0 - rate)).astype(x.dtype)  # a product: a dropped NaN stays NaN


class MLP(nnx.Module):
    """D -> 4D -> GELU (tanh approximation, as GPT-2) -> D."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        dense = dict(
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            bias_init=nnx.initializers.zeros_init(),
            rngs=rngs,
        )
        self.c_fc = nnx.Linear(
            cfg.n_embd, 4 * cfg.n_embd, kernel_init=_init(0.02), **dense
        )
        self.c_proj = nnx.Linear(
            4 * cfg.n_embd, cfg.n_embd, kernel_init=_init(_residual_std(cfg)), **dense
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        # c_fc's matmul, then its bias inside bias_gelu (which saves less for the backward).
        fc, dtype = self.c_fc, self.c_fc.dtype
        y = x.astype(dtype) @ fc.kernel[...].astype(dtype)  # [B, T, 4D]
        h = bias_gelu(y, fc.bias[...].astype(dtype))  # [B, T, 4D]
        return self.c_proj(h)  # [B, T, D]


class Block(nnx.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig, *, context_parallel: ContextParallel | None = None, rngs: nnx.Rngs):
        self.cfg = cfg
        compute, params = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        ln = dict(epsilon=1e-5, dtype=compute, param_dtype=params, rngs=rngs)
        self.ln_1 = nnx.LayerNorm(cfg.n_embd, **ln)
        self.attn = FlashMultiHeadAttention(
            num_heads=cfg.n_head,
            in_features=cfg.n_embd,
            is_causal=True,
            implementation=cfg.attention,
            dtype=compute,
            param_dtype=params,
            kernel_init=_init(0.02),
            out_kernel_init=_init(_residual_std(cfg)),
            context_parallel=context_parallel,
            rngs=rngs,
        )
        self.ln_2 = nnx.LayerNorm(cfg.n_embd, **ln)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, rngs: Sequence[jax.Array | None], **cache) -> jax.Array:
        # x: [B, T, D] residual stream (cfg.residual_dtype or cfg.dtype); sublayers compute in cfg.dtype.
        # cache: the attention's KV-cache arguments (prefill, decode, decode_implementation).
        x = x + _dropout(self.attn(self.ln_1(x), **cache), self.cfg.dropout, rngs[0])
        x = x + _dropout(self.mlp(self.ln_2(x)), self.cfg.dropout, rngs[1])
        return x


class GPT(nnx.Module):
    """GPT-2 language model: token ids ``[B, T]`` -> logits ``[B, T, V]``.

    ``context_parallel``: run attention as ring attention over a sequence
    sharded on a mesh axis (see the module docstring); not part of
    ``GPTConfig``, which stays plain values.
    """

    def __init__(self, cfg: GPTConfig, *, context_parallel: ContextParallel | None = None, rngs: nnx.Rngs):
        self.config = cfg
        self.context_parallel = context_parallel
        params = jnp.dtype(cfg.param_dtype)
        embed = dict(param_dtype=params, dtype=params, embedding_init=_init(0.02), rngs=rngs)
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, **embed)  # tied with the head
        self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, **embed)
        self.blocks = nnx.List([Block(cfg, context_parallel=context_parallel, rngs=rngs)
                                for _ in range(cfg.n_layer)])
        self.ln_f = nnx.LayerNorm(
            cfg.n_embd, epsilon=1e-5, dtype=jnp.dtype(cfg.dtype), param_dtype=params, rngs=rngs
        )

    def __call__(
        self,
        idx: jax.Array,
        *,
        positions: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        prefill: bool = False,
        decode: bool = False,
        decode_implementation: str | None = None,
    ) -> jax.Array:
        """Logits for every position.

        Args:
          idx: int token ids ``[B, T]`` with ``T <= block_size``.
          positions: int ``[T]`` or ``[B, T]``, the position of each token
            (its learned embedding); default ``arange(T)``, or under context
            parallelism the layout's order ``context_parallel.order(T)``. Not
            with ``prefill``/``decode`` (the cache knows the positions).
          dropout_rng: a PRNG key to enable dropout (training); ``None`` runs
            deterministically. Ignored when ``config.dropout == 0``.
          prefill: start the KV cache (:meth:`init_cache`) over with ``idx``
            (positions ``0 .. T-1``, the flash kernel).
          decode: ``idx`` are the next ``T`` tokens of each sequence: their
            positions continue from the cache's index; they are appended to the
            cache and attend over it (``decode_attention``).
          decode_implementation: ``decode_attention``'s ``"pallas"`` (default)
            or ``"xla"``, for ``decode`` calls.

        Returns:
          logits ``[B, T, vocab_size]`` in ``config.dtype`` (float32
          accumulation); see :func:`cross_entropy`.
        """
        return self.head(self.features(idx, positions=positions, dropout_rng=dropout_rng, prefill=prefill,
                                       decode=decode, decode_implementation=decode_implementation))

    def features(self, idx: jax.Array, *, positions: jax.Array | None = None, dropout_rng: jax.Array | None = None,
                 prefill: bool = False, decode: bool = False, decode_implementation: str | None = None) -> jax.Array:
        """The final layer-normed features ``[B, T, D]`` (``__call__`` without the head)."""
        cfg = self.config
        if idx.ndim != 2:
            raise ValueError(f"idx must be token ids of shape [batch, seq], got {idx.shape}")
        B, T = idx.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        keys: list[jax.Array | None] = [None] * (2 * cfg.n_layer + 1)
        if dropout_rng is not None and cfg.dropout > 0:
            keys = list(jax.random.split(dropout_rng, 2 * cfg.n_layer + 1))
        cache = {}
        if prefill or decode:
            if positions is not None:
                raise ValueError("positions are for calls without the KV cache: prefill/decode take them from it")
            attn = self.blocks[0].attn
            if attn.cache_index is None:
                raise ValueError("the KV cache is not initialised: call init_cache(batch_size, max_length) first")
            # As the attention layer checks it, but before the embedding: decode's positions come from the cache's
            # index [cache batch], which would broadcast against another batch of tokens (or fail inside the add).
            cache_batch, max_length = attn.cached_key.shape[:2]
            if B != cache_batch or T > max_length:
                raise ValueError(f"the new tokens [batch, length] = {(B, T)} do not fit the KV cache "
                                 f"[batch, max_length] = {(cache_batch, max_length)}")
            cache = dict(prefill=prefill, decode=decode, decode_implementation=decode_implementation)

        if decode and not prefill:  # the new tokens continue each sequence: [B, T] positions
            pos = self.blocks[0].attn.cache_index[...][:, None] + jnp.arange(T)
            x = self.wte(idx) + self.wpe(pos)  # [B, T, D] in param_dtype
        else:
            if positions is None:  # the sequence order; under context parallelism the layout's
                cp = self.context_parallel
                positions = jnp.arange(T) if cp is None else jnp.asarray(cp.order(T))
            if jnp.shape(positions) not in ((T,), (B, T)):
                raise ValueError(f"positions must have shape [T] or [B, T] = {(B, T)}, got {jnp.shape(positions)}")
            x = self.wte(idx) + self.wpe(positions)  # [B, T, D] in param_dtype
        x = x.astype(cfg.residual_dtype or cfg.dtype)
        x = _dropout(x, cfg.dropout, keys[-1])
        for i, block in enumerate(self.blocks):
            x = block(x, keys[2 * i : 2 * i + 2], **cache)  # [B, T, D]
        return self.ln_f(x)  # [B, T, D] in cfg.dtype

    def head(self, x: jax.Array) -> jax.Array:
        """The tied head: logits ``[..., V]`` = ``x @ wte^T`` in the compute dtype (f32 accumulation)."""
        compute = jnp.dtype(self.config.dtype)
        wte = self.wte.embedding[...].astype(compute)  # [V, D]
        return jnp.einsum("...d,vd->...v", x.astype(compute), wte)  # [..., V]

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> None:
        """An empty KV cache in every attention layer, for ``max_length <= block_size`` tokens.

        ``batch_size`` and ``max_length`` are positive Python or NumPy
        integers (not bools: ``TypeError``). ``dtype`` defaults to
        ``config.dtype``. GPT-2 has learned positions up to ``block_size``, so
        a longer cache raises ``ValueError``. Not under context parallelism
        (``NotImplementedError``).
        """
        batch_size = validate.int_at_least("batch_size", batch_size, 1)
        max_length = validate.int_at_least("max_length", max_length, 1)
        if max_length > self.config.block_size:
            raise ValueError(
                f"max_length {max_length} exceeds block_size {self.config.block_size}: GPT-2 has learned "
                "positions only up to block_size")
        for block in self.blocks:
            block.attn.init_cache((batch_size, max_length, self.config.n_embd),
                                 self.config.dtype if dtype is None else dtype)


@jax.custom_vjp
def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-position cross-entropy ``logsumexp(logits) - logits[label]``, in float32.

    Args:
      logits: ``[..., V]`` in any float dtype (the model's compute dtype).
      labels: int ``[...]`` in ``[0, V)``.

    Returns:
      float32 losses of shape ``labels.shape``; NaN (and a NaN gradient row)
      for a label outside ``[0, V)``.

    Same values as ``optax.softmax_cross_entropy_with_integer_labels`` on the
    float32 logits, but its gradient ``softmax(logits) - onehot(label)`` is
    one fused elementwise pass that reads the saved logits once and writes the
    gradient in their dtype; autodiff through the optax version makes several
    float32 passes over the ``[B, T, V]`` tensor (the max, the label gather's
    scatter, the softmax), which cost GPT-2 124M about 8 ms per 16k-token step.
    """
    return _cross_entropy_fwd(logits, labels)[0]


def _cross_entropy_fwd(logits, labels):
    if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must be integer class ids of shape logits.shape[:-1] = "
            f"{logits.shape[:-1]}, got {labels.dtype} {labels.shape}"
        )
    x = logits.astype(jnp.float32)
    # Max and sum of exponentials in one pass (an online softmax as a variadic
    # reduction), where two separate reductions would read the logits twice.
    m, s = jax.lax.reduce(
        (x, jnp.ones_like(x)), (jnp.float32(-jnp.inf), jnp.float32(0)), _max_sumexp, (x.ndim - 1,)
    )  # [...], [...]
    lse = m + jnp.log(s)  # [...]
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]  # [...]
    # A label outside [0, V) (a negative one would wrap to a class) gives NaN, in the gradient too.
    valid = (labels >= 0) & (labels < logits.shape[-1])
    loss = jnp.where(valid, lse - picked.astype(jnp.float32), jnp.nan)
    return loss, (logits, labels, lse)


def _max_sumexp(a, b):
    """Combine two partial (max m, sum of exp(x - m)) pairs of a softmax denominator."""
    (m1, s1), (m2, s2) = a, b
    m = jnp.maximum(m1, m2)
    # exp(-|m1 - m2|) rescales the smaller side; equal maxima (including both
    # -inf, where the difference would be NaN) need no rescaling.
    r = jnp.exp(jnp.where(m1 == m2, 0.0, -jnp.abs(m1 - m2)))
    return m, jnp.where(m1 >= m2, s1 + s2 * r, s1 * r + s2)


def _cross_entropy_bwd(res, g):
    logits, labels, lse = res
    g = jnp.where((labels >= 0) & (labels < logits.shape[-1]), g, jnp.nan)  # [...]: as the forward's loss
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])  # [..., V]
    onehot = labels[..., None] == jnp.arange(logits.shape[-1])  # [..., V]
    dlogits = (probs - onehot) * g[..., None]
    return dlogits.astype(logits.dtype), None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


@jax.custom_vjp
def bias_gelu(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``gelu(y + bias)`` with the tanh approximation (GPT-2's), in ``y``'s dtype.

    Same values and gradients as autodiff through ``jax.nn.gelu(y + bias,
    approximate=True)`` (the bias gradient is summed in float32), but the
    backward pass recomputes ``y + bias`` and the ``tanh`` from the matmul
    output ``y`` instead of saving them: autodiff keeps a second ``[B, T, 4D]``
    residual, one more write and read of the MLP's widest tensor per layer.
    """
    return jax.nn.gelu(y + bias, approximate=True)


def _bias_gelu_fwd(y, bias):
    return bias_gelu(y, bias), (y, bias)


def _bias_gelu_bwd(res, g):
    # The barrier keeps XLA from merging this recomputation with the forward's
    # (common-subexpression elimination), which would bring the saved tanh back.
    y, bias = jax.lax.optimization_barrier(res)
    (dz,) = jax.vjp(lambda z: jax.nn.gelu(z, approximate=True), y + bias)[1](g)
    dbias = jnp.sum(dz.astype(jnp.float32), axis=tuple(range(dz.ndim - bias.ndim)))
    return dz, dbias.astype(bias.dtype)


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


def _init(std: float):
    return nnx.initializers.normal(stddev=std)


def _residual_std(cfg: GPTConfig) -> float:
    return 0.02 / math.sqrt(2 * cfg.n_layer)


def param_count(cfg: GPTConfig, *, include_position: bool = True) -> int:
    """Number of parameters, from shapes only (nothing is allocated).

    The token embedding is counted once (it is tied with the head). With
    ``include_position=False`` the position table is left out, which is the
    ``N`` of the usual ``6 N`` FLOPs-per-token estimate (nanoGPT's convention).
    """
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    n = sum(math.prod(p.shape) for p in leaves)
    if not include_position:
        n -= cfg.block_size * cfg.n_embd
    return int(n)


def flops_per_token(cfg: GPTConfig, seq_len: int, n_params: int | None = None) -> float:
    """Training FLOPs per token: ``6 N + 12 L T D`` (PaLM appendix B).

    ``N`` is the non-position parameter count; the second term is attention's
    ``QK^T`` and ``AV`` matmuls (forward + backward, no causal discount).
    """
    if n_params is None:
        n_params = param_count(cfg, include_position=False)
    return 6.0 * n_params + 12.0 * cfg.n_layer * seq_len * cfg.n_embd

