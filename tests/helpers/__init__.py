"""Shared test helpers (imported by tests; conftest.py holds only fixtures and hooks)."""
