"""Training GPT-2 with pallas_flash attention: ``python -m train --help``."""
