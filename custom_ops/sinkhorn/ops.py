"""Registration of ``v4::sinkhorn`` and its backward ``v4::sinkhorn_bwd``.

The eager reference (reference.py) is the implementation on every device; on CUDA, fp32 logits with
a power-of-two N up to 16 run the Triton kernels (triton/) instead, as decided for every op in
custom_ops/dispatch.py (which also honours ``TITAN_V4_REFERENCE_OPS``). The backward is its own op so
that a compiled backward graph holds one opaque node. The schemas come from :class:`contract.Inputs`.
Call :func:`custom_ops.sinkhorn` (api.py), which validates, rather than these.
"""

import torch
from torch import Tensor

from .. import dispatch
from . import reference
from .contract import Inputs, triton_applies

sinkhorn_op = dispatch.op(
    "v4::sinkhorn", Inputs, Tensor,
    reference=reference.sinkhorn_fwd, triton="custom_ops.sinkhorn.triton:sinkhorn_fwd",
    applies=triton_applies, reads="logits",
)


@sinkhorn_op.register_fake
def _sinkhorn_fake(logits, iters, eps):
    return torch.empty_like(logits)


sinkhorn_bwd_op = dispatch.op(
    "v4::sinkhorn_bwd", Inputs, Tensor, leading=("grad",),
    reference=reference.sinkhorn_bwd, triton="custom_ops.sinkhorn.triton:sinkhorn_bwd",
    applies=triton_applies, reads="logits",
)


@sinkhorn_bwd_op.register_fake
def _sinkhorn_bwd_fake(grad, logits, iters, eps):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    inputs = Inputs(*inputs)
    # Only the input is kept: the backward recomputes the trajectory.
    ctx.save_for_backward(inputs.logits)
    ctx.iters, ctx.eps = inputs.iters, inputs.eps


def _backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return sinkhorn_bwd_op(grad.contiguous(), logits, ctx.iters, ctx.eps), None, None


sinkhorn_op.register_autograd(_backward, setup_context=_setup_context)
