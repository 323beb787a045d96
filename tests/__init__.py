"""Tests of dilated_attention_pytorch, grouped by the library's layers; shared helpers live in ``tests.helpers``."""
