"""Eager reference of ``v4::sinkhorn``: the specification of the op (runs in fp32 or fp64).

The mHC residual-mixing matrix of every token is a (near) doubly stochastic ``N x N`` matrix:

    c = softmax(logits, -1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)            # columns
    repeat iters - 1 times:
        c = c / (c.sum(-1, keepdim=True) + eps)        # rows
        c = c / (c.sum(-2, keepdim=True) + eps)        # columns

This is exactly the order of HF transformers' DeepseekV4HyperConnection; changing it changes the
numbers. Column sums are 1 up to eps after every iteration, row sums converge with ``iters``.
"""

import torch
from torch import Tensor


def sinkhorn_fwd(logits: Tensor, iters: int, eps: float) -> Tensor:
    """Forward on validated inputs.

    Args:
        logits: ``[..., N, N]`` fp32 or fp64.
        iters: number of column normalisations, >= 1.
        eps: >= 0, added after the softmax and to every denominator.
    Returns:
        ``[..., N, N]`` in logits' dtype.
    """
    c = torch.softmax(logits, dim=-1) + eps
    c = c / (c.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + eps)
        c = c / (c.sum(dim=-2, keepdim=True) + eps)
    return c


def sinkhorn_bwd(grad: Tensor, logits: Tensor, iters: int, eps: float) -> Tensor:
    """Gradient w.r.t. logits, recomputing the forward instead of storing it between passes.

    The recomputed trajectory (2 * iters - 1 matrices per token) lives only inside this call.
    For ``y = x / (sum_dim(x) + eps)``: ``dx = (dy - sum_dim(dy * y)) / (sum_dim(x) + eps)``; for
    ``p = softmax(logits)``: ``dlogits = p * (dp - sum(dp * p, -1))``; the ``+ eps`` after the softmax
    passes the gradient through unchanged.

    Args:
        grad: ``[..., N, N]`` gradient of the output, logits' dtype.
        logits, iters, eps: as in :func:`sinkhorn_fwd`.
    Returns:
        ``[..., N, N]`` gradient of the logits.
    """
    probs = torch.softmax(logits, dim=-1)
    steps = []  # (dim, output, denominator) of every normalisation, in forward order

    def normalise(x: Tensor, dim: int) -> Tensor:
        denom = x.sum(dim=dim, keepdim=True) + eps
        y = x / denom
        steps.append((dim, y, denom))
        return y

    c = normalise(probs + eps, -2)
    for _ in range(iters - 1):
        c = normalise(normalise(c, -1), -2)

    g = grad
    for dim, y, denom in reversed(steps):
        g = (g - (g * y).sum(dim=dim, keepdim=True)) / denom
    return probs * (g - (g * probs).sum(dim=-1, keepdim=True))
