"""pallas_flash: exact FlashAttention for JAX, as Pallas kernels for NVIDIA GPUs.

Public API:
- ``dot_product_attention``: a drop-in for ``jax.nn.dot_product_attention``.
- ``flash_attention``: the kernel entry point with explicit block configs.
- ``attention_with_lse``: one block of a longer sequence (position offsets),
  returning ``(out, lse)``; ``combine`` merges such partial results exactly.
- ``FlashConfig``, ``ForwardConfig``, ``BackwardConfig``, ``default_config``:
  the Triton backend's block configs.
- ``attention_reference``: the plain-jnp reference used by the tests.
- ``backends``: the backend interface and registry.
- ``decode_attention``: split-K decoding over a contiguous or paged KV cache.
- ``ring_attention`` (inside ``shard_map``) and ``sequence_parallel_attention``
  (global arrays sharded over the sequence): context parallelism.
- ``zigzag``/``unzigzag``: the load-balanced causal sequence layout for context parallelism.
"""

import warnings as _warnings

# JAX 0.11 marks its Pallas Triton backend deprecated and warns at every
# lowering; the backend is our implementation detail, so users should not see
# that warning once per compiled kernel. Only that exact message is silenced.
_warnings.filterwarnings("ignore", message=r"The Pallas Triton backend is deprecated", category=DeprecationWarning)

from pallas_flash import backends  # noqa: E402
from pallas_flash.api import attention_with_lse, dot_product_attention, flash_attention  # noqa: E402
from pallas_flash.backends.triton import BackwardConfig, FlashConfig, ForwardConfig, default_config  # noqa: E402
from pallas_flash.combine import combine  # noqa: E402
from pallas_flash.decode import decode_attention  # noqa: E402
from pallas_flash.reference import attention_reference  # noqa: E402
from pallas_flash.sharding import ring_attention, sequence_parallel_attention, unzigzag, zigzag  # noqa: E402
from pallas_flash.spec import CHECKPOINT_NAMES  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "dot_product_attention",
    "flash_attention",
    "attention_with_lse",
    "combine",
    "decode_attention",
    "ring_attention",
    "sequence_parallel_attention",
    "zigzag",
    "unzigzag",
    "backends",
    "FlashConfig",
    "ForwardConfig",
    "BackwardConfig",
    "default_config",
    "attention_reference",
    "CHECKPOINT_NAMES",
]
