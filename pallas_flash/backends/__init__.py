"""Backends and their registry: the public API reaches implementations only through here.

``get(name)`` returns the backend registered under a name; ``names()`` lists
them. Registered now: ``"triton"`` (the Pallas kernels lowered through
Triton), ``"mosaic"`` (the Pallas Mosaic GPU kernels for Hopper, forward and
backward), ``"auto"`` (per pass, the fastest of those two that implements
the call, from the shipped table ``auto_tables/<gpu>.json`` or its architecture's), ``"xla"`` and
``"cudnn"`` (``jax.nn.dot_product_attention``).
``"pallas"`` names the default Pallas backend, ``"auto"``.
"""

from __future__ import annotations

from pallas_flash.backends.auto import AutoBackend
from pallas_flash.backends.base import Backend, Gradients, KernelBackend
from pallas_flash.backends.jax_nn import JaxNnBackend
from pallas_flash.backends.mosaic_gpu import MosaicBackend
from pallas_flash.backends.triton import TritonBackend

__all__ = ["Backend", "KernelBackend", "Gradients", "register", "get", "names"]

_REGISTRY: dict[str, Backend] = {}
_ALIASES = {"pallas": "auto"}


def register(name: str, backend: Backend) -> None:
    """Make ``backend`` reachable as ``implementation=name`` (a string that is not an alias: ``ValueError`` for
    ``"pallas"``, which ``get`` would never resolve to it)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a backend's name must be a non-empty string, got {name!r}")
    if name in _ALIASES:
        raise ValueError(f"{name!r} is an alias of {_ALIASES[name]!r}: register the backend under another name")
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a pallas_flash.backends.Backend, got {type(backend).__name__}")
    _REGISTRY[name] = backend


def names() -> tuple[str, ...]:
    """Every name ``get`` accepts, aliases included."""
    return tuple(_ALIASES) + tuple(_REGISTRY)


def get(name: str) -> Backend:
    """The backend registered as ``name`` (or an alias of one); ``ValueError`` naming the choices otherwise."""
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"implementation must be one of {names()} (or a sequence of them), got {name!r}")
    return _REGISTRY[key]


register("triton", TritonBackend())
register("mosaic", MosaicBackend())
register("auto", AutoBackend())
register("xla", JaxNnBackend("xla"))
register("cudnn", JaxNnBackend("cudnn"))
