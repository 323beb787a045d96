"""LongNet models: LM, decoding, Hugging Face integration, CLI, checkpoints."""
