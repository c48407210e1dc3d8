"""Parallelization and the torchtitan CPU shim. Keep this file free of imports: the shim must run
before torchtitan is imported (titan_v4/__init__.py imports cpu_shim first)."""
