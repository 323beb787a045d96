"""Benchmarks: ``python -m dilated_attention_pytorch bench``."""
