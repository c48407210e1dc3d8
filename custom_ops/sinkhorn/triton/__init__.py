"""Triton kernels of ``v4::sinkhorn`` (CUDA). Imported lazily by ops.py: importing it imports triton."""

from .kernels import sinkhorn_bwd, sinkhorn_fwd, sinkhorn_tile_bwd, sinkhorn_tile_fwd

__all__ = ["sinkhorn_bwd", "sinkhorn_fwd", "sinkhorn_tile_bwd", "sinkhorn_tile_fwd"]
