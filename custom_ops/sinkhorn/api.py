"""Public entry point of the Sinkhorn op (mHC residual mixing)."""

import math

from torch import Tensor

from ..checks import check_int, check_tensor
from ..schema import contiguous
from . import ops
from .contract import DTYPES, Inputs


def sinkhorn(logits: Tensor, iters: int, eps: float) -> Tensor:
    """Near doubly stochastic mixing matrices from logits, HF DeepseekV4HyperConnection's order.

    ``c = softmax(logits, -1) + eps; c = c / (c.sum(-2, keepdim=True) + eps)``, then ``iters - 1`` times
    ``c = c / (c.sum(-1, keepdim=True) + eps); c = c / (c.sum(-2, keepdim=True) + eps)``.

    Args:
        logits: ``[..., N, N]`` fp32 (fp64 is accepted for tests). Non-contiguous input is made
            contiguous (a copy).
        iters: Python int >= 1.
        eps: finite Python float >= 0.
    Returns:
        ``[..., N, N]`` in logits' dtype; differentiable w.r.t. logits (the backward recomputes the
        forward instead of storing its iterations).
    Raises:
        TypeError / ValueError naming the bad argument.
    """
    check_tensor("logits", logits)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must be [..., N, N] (square last two dims), got shape {tuple(logits.shape)}")
    if logits.dtype not in DTYPES:
        raise TypeError(f"logits must be float32 (or float64), got {logits.dtype}")
    check_int("iters", iters)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a Python float >= 0, got {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return ops.sinkhorn_op(*contiguous(Inputs(logits, iters, float(eps))))
