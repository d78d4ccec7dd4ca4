"""Recorded kernel digests: a refactoring meant to leave the kernels alone must leave them byte-identical.

``test_triton_ir.py`` and ``test_mosaic_lowering.py`` each keep one book (a JSON
file beside them, test key -> the digests of the kernels it lowers). A key with
no record fails, so a new variant is recorded on purpose. After a deliberate
kernel change, regenerate with ``PALLAS_FLASH_WRITE_IR_DIGESTS=1`` (and say so
in the commit): then ``check`` records instead of comparing, and ``write``
merges what was recorded into the file.
"""

from __future__ import annotations

import json
import os
import pathlib

WRITE = os.environ.get("PALLAS_FLASH_WRITE_IR_DIGESTS") == "1"


class DigestBook:
    def __init__(self, path: pathlib.Path, what: str):
        self.path = path
        self.what = what  # "the Triton IR", "the Mosaic GPU kernels": for the failure message
        self.known: dict[str, list[str]] = json.loads(path.read_text()) if path.exists() else {}
        self.new: dict[str, list[str]] = {}

    def check(self, key: str, digests: list[str]) -> None:
        if WRITE:
            self.new[key] = digests
            return
        assert key in self.known, (
            f"no digest of {key}: regenerate {self.path.name} with PALLAS_FLASH_WRITE_IR_DIGESTS=1")
        assert digests == self.known[key], (
            f"{self.what} of {key} changed; if that is meant, regenerate {self.path.name} "
            "with PALLAS_FLASH_WRITE_IR_DIGESTS=1"
        )

    def write(self) -> None:
        """At the end of the module's tests: merge the recorded digests into the file (only when regenerating)."""
        if WRITE and self.new:
            merged = {**self.known, **self.new}
            self.path.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
