"""Multi-GPU attention: sequence layouts (``layout``), the ring (``ring``), its glue for global arrays (``context``)
and the partitioning of the kernels under ``jit`` (``partition``)."""

from pallas_flash.sharding.context import ring_attention, sequence_parallel_attention, sequence_sharding
from pallas_flash.sharding.layout import unzigzag, zigzag

__all__ = ["zigzag", "unzigzag", "ring_attention", "sequence_parallel_attention", "sequence_sharding"]
