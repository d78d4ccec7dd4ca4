"""Where the Mosaic GPU backend's tuned configs live: the user's cache and the shipped tables.

Both hold ``{config_key: MosaicConfig.to_dict()}`` entries (the cache per GPU
name); ``config.default_config`` reads them, the cache first, and validates
what it takes.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

from pallas_flash.backends.triton import config as triton_config

__all__ = ["SHIPPED_TABLES", "TABLES_DIR", "shipped_table", "user_cache_path"]

# Shipped tables, tuned with ``python -m pallas_flash.tuning --backend mosaic --out tables/<file>``: the first whose
# name occurs in the GPU's device_kind applies. Keys: ``config_key``.
SHIPPED_TABLES = {"H200": "h200.json", "H100": "h100.json"}
TABLES_DIR = pathlib.Path(__file__).parent / "tables"


@functools.cache
def shipped_table(gpu: str) -> dict[str, dict[str, Any]]:
    """The shipped table for ``gpu`` (a device_kind); ``{}`` for a GPU none covers."""
    for name, file in SHIPPED_TABLES.items():
        if name in gpu:
            return json.loads((TABLES_DIR / file).read_text())
    return {}


def user_cache_path() -> pathlib.Path:
    """Where ``python -m pallas_flash.tuning --backend mosaic`` stores configs tuned on this machine.

    ``mosaic_configs.json`` in the Triton backend's cache folder (``$PALLAS_FLASH_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/pallas_flash``, else ``~/.cache/pallas_flash``): ``{gpu name: {config_key: to_dict()}}``.
    """
    return triton_config.user_cache_path().with_name("mosaic_configs.json")
