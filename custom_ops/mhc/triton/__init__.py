"""Triton kernels of the mHC ops (CUDA, bf16 streams). Imported lazily by ops.py: importing it
imports triton."""

from .collapse import mhc_collapse_bwd, mhc_collapse_fwd, mhc_head_bwd, mhc_head_fwd
from .expand import mhc_expand_bwd, mhc_expand_fwd

__all__ = ["mhc_collapse_bwd", "mhc_collapse_fwd", "mhc_expand_bwd", "mhc_expand_fwd", "mhc_head_bwd", "mhc_head_fwd"]
