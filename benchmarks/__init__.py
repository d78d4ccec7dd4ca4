"""Benchmarks for pallas_flash: attention kernels and GPT-2 training speed."""
