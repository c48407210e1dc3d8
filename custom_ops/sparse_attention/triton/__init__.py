"""Triton kernels of ``v4::sparse_attention``: the CUDA implementation of the op.

Importing this package imports triton, so the op's registration imports it lazily (on the first CUDA
call); CPU installs never need it. ``fwd.py`` holds the forward kernel, ``bwd.py`` the backward ones
(and which of their outputs are deterministic), ``config.py`` the tile heuristics.
"""

from .bwd import sparse_attention_bwd
from .fwd import sparse_attention_fwd

__all__ = ["sparse_attention_bwd", "sparse_attention_fwd"]
