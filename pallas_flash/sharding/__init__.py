"""Multi-GPU attention: sequence layouts (``layout``) and context parallelism (``ring``)."""

from pallas_flash.sharding.layout import unzigzag, zigzag
from pallas_flash.sharding.ring import ring_attention, sequence_parallel_attention, sequence_sharding

__all__ = ["zigzag", "unzigzag", "ring_attention", "sequence_parallel_attention", "sequence_sharding"]
