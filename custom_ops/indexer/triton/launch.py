"""Launcher heuristics shared by the indexer kernels: block sizes and the dot precision."""

import torch
import triton


def block(n: int, cap: int | None = None) -> int:
    """A power-of-two block >= n (and >= 16, the smallest tl.dot operand), at most ``cap`` if given."""
    size = max(16, triton.next_power_of_2(n))
    return size if cap is None else min(size, cap)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: exact fp32 products for fp32 inputs (Triton's default would be tf32,
    ~1e-3 relative); irrelevant for bf16 inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        raise TypeError(f"{name} must be one of {allowed} for the Triton kernels, got {tensor.dtype}")
