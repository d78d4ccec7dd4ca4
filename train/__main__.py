"""``python -m train``: see :mod:`train` (``train/__init__.py``) or ``--help``."""

import sys

from train.loop import cli

if __name__ == "__main__":
    sys.exit(cli())
