"""``python -m train``: see :mod:`train` (``train/__init__.py``) or ``--help``."""

import sys

from train.loop import main

if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
