"""Block-sparse attention: layouts, cache, portable, Triton and FlexAttention paths, modules."""
