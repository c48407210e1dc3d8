"""The precision policy of the model: which math runs above the activation dtype, and in what."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for precision-sensitive math: fp32 for bf16 / fp16 / fp32 inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def full_precision(x: torch.Tensor):
    """Context that switches autocast off, for the math V4 keeps in fp32 (mHC, routing, indexer
    scores) when a single-device run trains under bf16 autocast."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in here: autocast's dtype where autocast is on for x's device
    type, else x's own dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMSNorm over the last dim, statistics in compute_dtype, result in x's dtype."""
    return x * torch.rsqrt(x.to(compute_dtype(x.dtype)).square().mean(-1, keepdim=True) + eps).to(x.dtype)
