"""Registration of ``v4::sinkhorn`` and its backward ``v4::sinkhorn_bwd``.

The eager reference (reference.py) is the implementation on every device except CUDA, where fp32
logits with a power-of-two N run the Triton kernels (triton/, imported on the first CUDA call, so a
CPU install never imports triton); other CUDA inputs (fp64, N not a power of two) run the reference.
The backward is its own op so that a compiled backward graph holds one opaque node. Call
:func:`custom_ops.sinkhorn` (api.py), which validates, rather than these.
"""

import torch
from torch import Tensor

from .. import flags
from . import reference


def _triton_supported(logits: Tensor) -> bool:
    n = logits.shape[-1]
    return logits.dtype == torch.float32 and n & (n - 1) == 0 and n <= 16 and not flags.reference_ops_only()


@torch.library.custom_op("v4::sinkhorn", mutates_args=())
def sinkhorn_op(logits: Tensor, iters: int, eps: float) -> Tensor:
    """``[..., N, N]`` -> ``[..., N, N]`` (same dtype); see reference.py."""
    return reference.sinkhorn_fwd(logits, iters, eps)


@sinkhorn_op.register_kernel("cuda")
def _sinkhorn_cuda(logits, iters, eps):
    if not _triton_supported(logits):
        return reference.sinkhorn_fwd(logits, iters, eps)
    from .triton import sinkhorn_fwd

    return sinkhorn_fwd(logits, iters, eps)


@sinkhorn_op.register_fake
def _sinkhorn_fake(logits, iters, eps):
    return torch.empty_like(logits)


@torch.library.custom_op("v4::sinkhorn_bwd", mutates_args=())
def sinkhorn_bwd_op(grad: Tensor, logits: Tensor, iters: int, eps: float) -> Tensor:
    """Gradient w.r.t. logits, recomputing the forward; see reference.py."""
    return reference.sinkhorn_bwd(grad, logits, iters, eps)


@sinkhorn_bwd_op.register_kernel("cuda")
def _sinkhorn_bwd_cuda(grad, logits, iters, eps):
    if not _triton_supported(logits):
        return reference.sinkhorn_bwd(grad, logits, iters, eps)
    from .triton import sinkhorn_bwd

    return sinkhorn_bwd(grad, logits, iters, eps)


@sinkhorn_bwd_op.register_fake
def _sinkhorn_bwd_fake(grad, logits, iters, eps):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, iters, eps = inputs
    # Only the input is kept: the backward recomputes the trajectory.
    ctx.save_for_backward(logits)
    ctx.iters, ctx.eps = iters, eps


def _backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return sinkhorn_bwd_op(grad.contiguous(), logits, ctx.iters, ctx.eps), None, None


sinkhorn_op.register_autograd(_backward, setup_context=_setup_context)
