"""Triton kernels of the indexer ops (CUDA; imported lazily by ops.py so CPU installs never need them).

One program per (query, batch element): the H heads of a query form the M dimension of the matrix
products (every head of a query meets the same entries), the entries are walked in blocks of BLOCK_N
(contiguous for every visible entry, gathered for listed ones). Per-query scores / masses are written
directly, so ``[S, H, P]`` is never built.
"""
