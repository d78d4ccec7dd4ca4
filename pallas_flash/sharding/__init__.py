"""Multi-GPU attention: sequence layouts for context parallelism (``layout``)."""

from pallas_flash.sharding.layout import unzigzag, zigzag

__all__ = ["zigzag", "unzigzag"]
