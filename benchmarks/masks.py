"""``python -m benchmarks.masks [flags]``: the masks suite of ``benchmarks.attention``.

The same as ``python -m benchmarks.attention --suite masks [flags]``: sliding windows,
packed documents (segment ids; ``cudnn_packed`` is cuDNN's own packed layout) and a
logits soft-cap, bf16, 16 heads, D = 128, causal, B·T = 16k. ``--allow-cpu`` (or the old
``--smoke``) runs tiny problems in interpret mode without a GPU.
"""

from __future__ import annotations

import sys
from typing import Sequence

from benchmarks import attention


def main(argv: Sequence[str] | None = None) -> int:
    argv = ["--allow-cpu" if a == "--smoke" else a for a in (sys.argv[1:] if argv is None else argv)]
    return attention.main(["--suite", "masks", *argv])


if __name__ == "__main__":
    sys.exit(main())
