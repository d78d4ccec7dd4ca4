"""The registry of implementations the attention and masks suites time: ``IMPLS``, name -> ``Impl``.

An ``Impl`` builds ``f(q, k, v, **extras)`` for a ``Problem``, ``extras`` being arrays made once outside
the timed function (segment ids, a dense mask, lengths) and passed in as arguments; ``build`` raises
``NotImplementedError`` where it has no equivalent (status n/a), and where ``applies`` is false there is
no record at all. ``benchmarks.harness`` checks and times them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Callable

import numpy as np

from benchmarks.problems import DTYPES, Problem

@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    build: Callable[[Problem], Callable]  # -> f(q, k, v, **extras); NotImplementedError: n/a
    note: str = ""
    applies: Callable[[Problem], bool] = lambda p: True
    extras: Callable[[Problem], dict] = lambda p: {}


def on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def _pallas_flash(p: Problem, implementation: str = "pallas"):
    import pallas_flash

    def f(q, k, v, **extras):
        return pallas_flash.dot_product_attention(
            q, k, v, is_causal=p.shape.causal, local_window_size=p.window_arg, logits_soft_cap=p.soft_cap,
            implementation=implementation, **extras)

    return f


def _pallas_flash_mosaic(p: Problem, *, deterministic: bool | None = None):
    """pallas_flash's Mosaic GPU backend: no fallback, so a refused call is n/a rather than another kernel's time.
    ``deterministic``: ``None`` the default config (the shipped table's at its tuned buckets, else the heuristics:
    the backward's dQ mode per call, ``fused_dq_pays``); ``True``/``False`` that mode forced: the default's backward
    where it is already in that mode, else the heuristic's for the mode (``mosaic_gpu.config.default_backward``; what
    ``XLA_FLAGS=--xla_gpu_deterministic_ops=true`` gives for ``True``), the forward's config the default."""
    import dataclasses

    import jax

    import pallas_flash
    from pallas_flash import backends
    from pallas_flash.backends.mosaic_gpu.config import WIDE_HEAD_DIMS, default_backward
    from pallas_flash.validate import attention_call

    s = p.shape
    q = jax.ShapeDtypeStruct(s.q_shape, DTYPES[p.dtype])  # shapes only: supports() reads no values
    k = jax.ShapeDtypeStruct(s.kv_shape, DTYPES[p.dtype])
    ids = None if p.doc_lens is None else np.zeros((s.batch, s.seq_q), np.int32)  # supports() reads no values
    spec, inputs = attention_call(q, k, k, None, None, is_causal=s.causal, local_window_size=p.window_arg,
                                  logits_soft_cap=p.soft_cap, q_segment_ids=ids, kv_segment_ids=ids)
    mosaic = backends.get("mosaic")
    mosaic.supports(q, k, k, inputs, spec)  # NotImplementedError: n/a
    config = None
    if deterministic is not None:
        if not deterministic and s.head_dim in WIDE_HEAD_DIMS:
            raise NotImplementedError(f"at head dim {s.head_dim} the Mosaic backward is deterministic only")
        config = mosaic.default_config(q, k, spec)
        if config.bwd.deterministic != deterministic:
            bwd = default_backward(s.head_dim, q.dtype, s.seq_q, s.seq_k, causal=s.causal, deterministic=deterministic)
            config = dataclasses.replace(config, bwd=bwd)

    def f(q, k, v, **extras):
        return pallas_flash.dot_product_attention(
            q, k, v, is_causal=s.causal, local_window_size=p.window_arg, logits_soft_cap=p.soft_cap,
            implementation="mosaic", config=config, **extras)

    return f


def _tokamax_mosaic(p: Problem):
    """tokamax 0.0.17's Mosaic GPU kernel (carried to the GPU as wheels: ../shared/peers/README.md)."""
    if not on_gpu():
        raise NotImplementedError("tokamax's Mosaic GPU kernel needs an NVIDIA GPU")
    if p.masked:
        raise NotImplementedError("tokamax_mosaic is run for plain and causal attention only")
    try:
        import tokamax
    except ImportError as e:
        raise NotImplementedError(f"tokamax is not installed ({e})") from None

    def f(q, k, v):
        return tokamax.dot_product_attention(q, k, v, is_causal=p.shape.causal, implementation="mosaic")

    return f


def _jax_nn(implementation: str):
    def build(p: Problem):
        import jax

        if implementation == "cudnn" and not on_gpu():
            raise NotImplementedError("cuDNN attention needs an NVIDIA GPU")
        if p.soft_cap is not None:
            raise NotImplementedError("jax.nn.dot_product_attention has no logits soft-cap")

        def f(q, k, v, **extras):
            return jax.nn.dot_product_attention(q, k, v, is_causal=p.shape.causal, local_window_size=p.window_arg,
                                                implementation=implementation, **extras)

        return f

    return build


def _pallas_mha(p: Problem):
    import jax
    import jax.numpy as jnp

    with warnings.catch_warnings():  # its import warns that it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention as mod
    s, blocks = p.shape, mod.BlockSizes.get_default()
    for name, t in (("Tq", s.seq_q), ("Tk", s.seq_k)):
        if t % min(blocks.block_q, t):
            raise NotImplementedError(f"pallas_mha needs {name}={t} to be a multiple of its block {blocks.block_q}")

    def f(q, k, v):
        if p.gqa > 1:  # no GQA in this kernel: materialise the repeated K/V
            k, v = jnp.repeat(k, p.gqa, axis=2), jnp.repeat(v, p.gqa, axis=2)
        return mod.mha(q, k, v, None, sm_scale=1.0 / math.sqrt(s.head_dim), causal=s.causal, block_sizes=blocks,
                       interpret=jax.default_backend() != "gpu")

    return f


def _cudnn_packed(p: Problem):
    if not on_gpu():
        raise NotImplementedError("cuDNN attention needs an NVIDIA GPU")
    if p.soft_cap is not None or p.window is not None:
        raise NotImplementedError("cudnn_packed is run for plain packed documents only")
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa

    def f(q, k, v, seqlen, offsets):
        return cudnn_fa.dot_product_attention(
            q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
            scale=1.0 / math.sqrt(p.shape.head_dim), mask_type=cudnn_fa.MaskType.PADDING_CAUSAL)

    return f


def length_extras(p: Problem) -> dict:
    """A padded batch's valid lengths, as jax.nn and pallas_flash both take them."""
    import jax.numpy as jnp

    if p.seq_lens is None:
        return {}
    lens = jnp.asarray(p.seq_lens, jnp.int32)
    return {"query_seq_lengths": lens, "key_value_seq_lengths": lens}


def _segment_extras(p: Problem) -> dict:
    import jax.numpy as jnp

    ids = p.segment_ids()
    extras = length_extras(p)
    return extras if ids is None else {**extras, "q_segment_ids": jnp.asarray(ids), "kv_segment_ids": jnp.asarray(ids)}


def _mask_extras(p: Problem) -> dict:
    """jax.nn has no segment ids: a dense ``[B, 1, T, T]`` mask, built once as a user of jax.nn would."""
    import jax.numpy as jnp

    ids = p.segment_ids()
    extras = length_extras(p)
    return extras if ids is None else {**extras, "mask": jnp.asarray(ids[:, None, :, None] == ids[:, None, None, :])}


def _packed_extras(p: Problem) -> dict:
    """cuDNN's packed layout: per-document lengths ``[B, M]`` and offsets ``[B, M + 1]``."""
    import jax.numpy as jnp

    lens = np.asarray(p.doc_lens, np.int32)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    b = p.shape.batch
    return {"seqlen": jnp.asarray(np.broadcast_to(lens, (b, lens.size))),
            "offsets": jnp.asarray(np.broadcast_to(offsets, (b, offsets.size)))}


IMPLS: dict[str, Impl] = {
    i.name: i
    for i in (
        Impl("pallas_flash", _pallas_flash, "pallas_flash.dot_product_attention(implementation='pallas')",
             extras=_segment_extras),
        Impl("pallas_flash_triton", functools.partial(_pallas_flash, implementation="triton"),
             "pallas_flash.dot_product_attention(implementation='triton'): the Pallas Triton kernels, default "
             "configs (the shipped table for this GPU, else the heuristics)", extras=_segment_extras),
        Impl("pallas_flash_mosaic", _pallas_flash_mosaic, "pallas_flash.dot_product_attention(implementation="
             "'mosaic'): the Mosaic GPU (sm_90) forward and backward, default configs (the shipped table for this "
             "GPU, H200 or H100, at its tuned buckets, N 1k/4k/16k with Tq and Tk in one bucket; else the heuristics; "
             "the backward's dQ fused by TMA reduce-add where `fused_dq_pays` or the table says: MHA, no window, "
             "ids or lengths, D=128 from N=8k, D=64 non-causal from 1k (128-row steps); else the deterministic dQ "
             "kernel)",
             extras=_segment_extras),
        Impl("pallas_flash_mosaic_deterministic", functools.partial(_pallas_flash_mosaic, deterministic=True),
             "the same with the deterministic backward at every length (bit-identical reruns; what "
             "XLA_FLAGS=--xla_gpu_deterministic_ops=true gives)", extras=_segment_extras),
        Impl("pallas_flash_mosaic_fused", functools.partial(_pallas_flash_mosaic, deterministic=False),
             "the same with the fused dQ at every length (TMA reduce-add: run-to-run nondeterministic last bits; "
             "D=256: n/a)", extras=_segment_extras),
        Impl("tokamax_mosaic", _tokamax_mosaic, "tokamax.dot_product_attention(implementation='mosaic'), "
             "tokamax 0.0.17", applies=lambda p: not p.masked),
        Impl("cudnn", _jax_nn("cudnn"), "jax.nn.dot_product_attention(implementation='cudnn')", extras=_mask_extras),
        Impl("xla", _jax_nn("xla"), "jax.nn.dot_product_attention(implementation='xla')", extras=_mask_extras),
        Impl("pallas_mha", _pallas_mha, "jax.experimental.pallas.ops.gpu.attention.mha, default BlockSizes; for GQA, "
             "K/V repeated with jnp.repeat inside the timed function", applies=lambda p: not p.masked),
        Impl("cudnn_packed", _cudnn_packed, "cuDNN's own packed-documents layout (per-document lengths and offsets) "
             "through JAX's private jax._src.cudnn.fused_attention_stablehlo (ERR if it changed)",
             applies=lambda p: p.doc_lens is not None, extras=_packed_extras),
    )
}
