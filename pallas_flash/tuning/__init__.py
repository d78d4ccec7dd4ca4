"""Timing and tuning: ``timer.time_fn`` (the one timer) and the tuner CLI (``python -m pallas_flash.tuning``)."""
