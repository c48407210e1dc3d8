"""Benchmarks of the ops, the training step and the checkpoint load; each prints a table and the counts
it uses. Run them as modules from the repository root, e.g.

    python -m benchmarks.step --tiny --device cpu
    python -m benchmarks.<name> --help

All of them time through `benchmarks.timing`. Nothing outside this folder imports it.
"""
