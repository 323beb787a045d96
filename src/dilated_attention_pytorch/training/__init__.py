"""Training and sampling scripts for ``LongNetLM`` (``python -m dilated_attention_pytorch train|generate``)."""
