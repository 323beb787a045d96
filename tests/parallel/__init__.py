"""Sequence parallelism over real gloo process groups: ring, head-parallel, block-sparse distributed."""
