"""``implementation="auto"``: per pass, the kernel backend the shipped table says is fastest.

Every kernel backend saves the same residuals (``q, k, v, out`` and the
log2-domain log-sum-exp), so the forward of one backend and the backward of
another compose exactly. ``AutoBackend`` chooses, per call and per pass
(``"fwd"``, ``"bwd"``), the first backend of the table's list for this GPU that
``supports`` the call, and falls back to ``"triton"`` (which implements every
feature) otherwise; never to XLA. A config of one backend's own type (a
Triton ``FlashConfig``) runs that backend for both passes. The choice is static: it depends on the
GPU, the dtype, the head dim, causal and the features, all known at trace time.

The table, ``auto_tables/<gpu>.json``, is a list of rules, the first match
wins::

    {"gpu": "H200", "rules": [
       {"head_dims": [64, 128], "pass": "fwd", "order": ["mosaic", "triton"], "source": "..."},
       ...]}

A rule matches on ``pass`` and, where present, ``head_dims``, ``causal`` and
``min_seq``/``max_seq`` (the query length). A table names its GPU (``"gpu"``,
matched in the device kind) or, for the parts no named table covers, an
architecture (``"compute_capability"``: ``sm90.json`` sends the other Hopper
parts, H800 or H20, to the sm_90 kernels measured on the H100 and H200). The
first named table that matches is the GPU's whole table; the architecture's
applies only where none does. No rule, no table for this GPU, or no GPU
(interpret mode on a CPU): ``"triton"``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

from pallas_flash.backends.base import Gradients, KernelBackend
from pallas_flash.backends.triton.config import gpu_capability, gpu_name
from pallas_flash.spec import AttentionInputs, AttentionSpec, DefaultConfig

__all__ = ["AutoBackend", "AutoConfig", "table_order"]

TABLES = pathlib.Path(__file__).parent / "auto_tables"
FALLBACK = "triton"
KERNEL_BACKENDS = (FALLBACK, "mosaic")  # what an AutoConfig may name, and whose configs ``adopt`` takes


@dataclasses.dataclass(frozen=True)
class AutoConfig:
    """The backends and configs chosen for one call: ``forward`` runs the forward pass, ``backward`` the backward."""

    forward: str
    forward_config: Any
    backward: str
    backward_config: Any


@functools.lru_cache(maxsize=None)
def _tables() -> tuple[dict, ...]:
    return tuple(json.loads(p.read_text()) for p in sorted(TABLES.glob("*.json")))


def _table_for(gpu: str, capability: str) -> dict | None:
    """The table of ``gpu`` (a device kind): the first naming it, else the one of its compute capability."""
    named = [t for t in _tables() if "gpu" in t and t["gpu"] in gpu]
    by_arch = [t for t in _tables() if capability and t.get("compute_capability") == capability]
    return (named or by_arch or [None])[0]


def table_order(
    pass_: str, head_dim: int, causal: bool, seq_q: int, gpu: str | None = None, capability: str = ""
) -> tuple[str, ...]:
    """The backends the shipped table lists for one pass of a call, fastest first: on this machine's GPU, or on
    ``gpu`` (a device kind) of compute ``capability`` (none given: only the tables naming ``gpu`` apply)."""
    if gpu is None:
        gpu, capability = gpu_name(), gpu_capability()
    table = _table_for(gpu, capability) if gpu else None
    if table is not None:
        for rule in table["rules"]:
            if rule["pass"] != pass_:
                continue
            if "head_dims" in rule and head_dim not in rule["head_dims"]:
                continue
            if "causal" in rule and rule["causal"] != causal:
                continue
            if not rule.get("min_seq", 0) <= seq_q <= rule.get("max_seq", float("inf")):
                continue
            return tuple(rule["order"])
    return (FALLBACK,)


@dataclasses.dataclass(frozen=True)
class AutoBackend(KernelBackend):
    """Per pass, the fastest kernel backend that implements the call (see the module docstring)."""

    name = "auto"
    config_type = AutoConfig

    @staticmethod
    def _backend(name: str) -> KernelBackend:
        from pallas_flash import backends  # the registry imports this module

        return backends.get(name)

    def supports(self, q, k, v, inputs: AttentionInputs, spec: AttentionSpec) -> None:
        self._backend(FALLBACK).supports(q, k, v, inputs, spec)  # the fallback implements every feature

    def choose(self, pass_: str, q, k, v, inputs: AttentionInputs, spec: AttentionSpec) -> str:
        """The first backend of the table's order for ``pass_`` that supports the call (else the fallback)."""
        for name in table_order(pass_, q.shape[-1], spec.causal, q.shape[1]):
            try:
                self._backend(name).supports(q, k, v, inputs, spec)
            except NotImplementedError:
                continue
            return name
        return FALLBACK

    def plan(self, q, k, v, inputs: AttentionInputs, spec: AttentionSpec) -> AutoConfig:
        """The backends and their default configs for this call."""
        fwd, bwd = self.choose("fwd", q, k, v, inputs, spec), self.choose("bwd", q, k, v, inputs, spec)
        return AutoConfig(
            fwd, self._backend(fwd).default_config(q, k, spec), bwd, self._backend(bwd).default_config(q, k, spec)
        )

    def default_config(self, q, k, spec: AttentionSpec) -> AutoConfig:
        # Without the call's side inputs only the spec can be checked; ``attention_with_lse`` plans with them.
        return self.plan(q, k, k, AttentionInputs(), spec)

    def adopt(self, config) -> AutoConfig:
        """A config of one backend's own type (a Triton ``FlashConfig``, a ``MosaicConfig``) runs that backend for both
        passes. An ``AutoConfig`` must name a kernel backend per pass and hold a config of that backend's type
        (``ValueError``/``TypeError`` naming the field otherwise)."""
        if isinstance(config, AutoConfig):
            for pass_ in ("forward", "backward"):
                name, cfg = getattr(config, pass_), getattr(config, f"{pass_}_config")
                if name not in KERNEL_BACKENDS:
                    raise ValueError(f"AutoConfig.{pass_} must name a kernel backend, 'triton' or 'mosaic', "
                                     f"got {name!r}")
                backend = self._backend(name)
                if not isinstance(cfg, backend.config_type):
                    raise TypeError(f"AutoConfig.{pass_}_config must be a {backend.config_type.__name__} for the "
                                    f"{name!r} backend, got {type(cfg).__name__}")
            return config
        for name in KERNEL_BACKENDS:
            if isinstance(config, self._backend(name).config_type):
                return AutoConfig(name, config, name, config)
        raise TypeError(
            f"config must be an AutoConfig or a config of the 'triton' or 'mosaic' backend for implementation 'auto', "
            f"got {type(config).__name__}"
        )

    def interpret_effects(self, config, kind: str) -> bool:
        """The picked backend's: a Mosaic pass in interpret mode runs unpartitioned, as ``"mosaic"`` does."""
        config = config.config if isinstance(config, DefaultConfig) else config
        name = config.forward if kind == "forward" else config.backward
        return self._backend(name).interpret_has_effects

    def shard_config(self, q, k, v, inputs: AttentionInputs, spec: AttentionSpec) -> AutoConfig:
        return self.plan(q, k, v, inputs, spec)

    def attention_with_lse(self, q, k, v, inputs: AttentionInputs, spec: AttentionSpec, *, config=None, interpret=None):
        if config is None:
            config = DefaultConfig(self.plan(q, k, v, inputs, spec))
        elif not isinstance(config, AutoConfig):
            # The user's config of one backend asks for that backend: where it refuses the call, refuse too (as
            # implementation=<that backend> does) rather than run the other backend without the config.
            config = self.adopt(config)
            self._backend(config.forward).supports(q, k, v, inputs, spec)
        else:
            config = self.adopt(config)
        return super().attention_with_lse(q, k, v, inputs, spec, config=config, interpret=interpret)

    def _checked(self, name: str, config, q, k, v, inputs, spec) -> tuple[KernelBackend, Any]:
        """``name``'s backend and config, or the fallback's when ``name`` refuses this exact call.

        A plan made for one spec may be run on another (ring attention's chunk
        pairs add position offsets; a shard has other shapes): every pass checks
        again, so a backend never runs a call it does not implement.
        """
        backend = self._backend(name)
        try:
            backend.supports(q, k, v, inputs, spec)
        except NotImplementedError:
            backend = self._backend(FALLBACK)
            if not isinstance(config, backend.config_type):
                config = backend.default_config(q, k, spec)
        return backend, config

    def forward(self, q, k, v, inputs, spec, *, config: AutoConfig, interpret: bool):
        backend, cfg = self._checked(config.forward, config.forward_config, q, k, v, inputs, spec)
        return backend.forward(q, k, v, inputs, spec, config=cfg, interpret=interpret)

    def backward(self, q, k, v, out, lse2, do, dlse, inputs, spec, *, config: AutoConfig, interpret: bool,
                 want_dbias: bool, want_dslopes: bool) -> Gradients:
        backend, cfg = self._checked(config.backward, config.backward_config, q, k, v, inputs, spec)
        return backend.backward(
            q, k, v, out, lse2, do, dlse, inputs, spec, config=cfg, interpret=interpret,
            want_dbias=want_dbias, want_dslopes=want_dslopes,
        )
