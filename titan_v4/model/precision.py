"""The precision policy of the model: which math runs above the activation dtype."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for precision-sensitive math: fp32 for bf16 / fp16 / fp32 inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def full_precision(x: torch.Tensor):
    """Context that switches autocast off, for the math V4 keeps in fp32 (mHC, routing, indexer
    scores) when a single-device run trains under bf16 autocast."""
    return torch.autocast(device_type=x.device.type, enabled=False)
