"""Model definitions built on pallas_flash (GPT-2 in ``models.gpt2``)."""
