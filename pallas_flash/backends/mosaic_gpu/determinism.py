"""Whether the user asked XLA for bit-identical reruns on GPU, read from ``XLA_FLAGS``: then the Mosaic backend's
default backward is its deterministic mode (``config.default_backward``)."""

from __future__ import annotations

import os

__all__ = ["deterministic_requested"]


def deterministic_requested(xla_flags: str | None = None) -> bool:
    """Whether ``XLA_FLAGS`` (``xla_flags`` when given) asks for bit-identical reruns on GPU: XLA's
    ``--xla_gpu_deterministic_ops`` or ``--xla_gpu_exclude_nondeterministic_ops`` (the one XLA's determinism guide
    names; both also make cuDNN's attention backward deterministic). Then the default backward is the
    deterministic mode at every length, over a tuned entry's fused mode too. Read at trace time. A value that is
    not a bool (``true``/``false``/``1``/``0``, or none: true) raises ``ValueError``; of one flag given twice
    the last counts."""
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    requested = dict.fromkeys(_DETERMINISM_FLAGS, False)
    for flag in flags.split():
        name, eq, value = flag.lstrip("-").partition("=")
        if name not in requested:
            continue
        value = value.strip().lower() if eq else "true"
        if value not in _FLAG_BOOLS:
            raise ValueError(f"XLA_FLAGS sets {flag!r}: not a boolean (one of {sorted(_FLAG_BOOLS)})")
        requested[name] = _FLAG_BOOLS[value]
    return any(requested.values())


_DETERMINISM_FLAGS = ("xla_gpu_deterministic_ops", "xla_gpu_exclude_nondeterministic_ops")
_FLAG_BOOLS = {"true": True, "1": True, "false": False, "0": False}
