"""Helpers shared by the tests (imported as ``tests.helpers.<module>``; pytest puts the repository
root on the path through ``pythonpath`` in pyproject.toml)."""
