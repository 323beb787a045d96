"""The single-device core: block engine, kernels, patterns, merge, custom ops, numerics."""
