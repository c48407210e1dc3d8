"""Parallelism: the parallel layout (EP, FSDP2 / HSDP / DDP, activation checkpointing, per-block
compile), the pipeline split, and the torchtitan CPU shim (docs/design.md lists the files). Keep this
file free of imports: the shim must run before torchtitan is imported (titan_v4/__init__.py imports
cpu_shim first)."""
