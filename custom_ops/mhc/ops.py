"""Registration of the mHC ops ``v4::mhc_collapse``, ``v4::mhc_head``, ``v4::mhc_expand`` and their
backward ops (``*_bwd``: one opaque node each in a compiled backward graph).

The eager reference (reference.py) is the implementation on every device except CUDA, where bf16
streams with a power-of-two H run the Triton kernels (triton/, imported on the first CUDA call, so a
CPU install never imports triton); other CUDA inputs run the reference. The ops take validated,
contiguous tensors; call the functions in api.py, not these.

The forward ops of collapse and head also return the fp32 ``logits [..., M]`` and ``rstd [...]``
that their backward needs (marked non-differentiable): 4 * (M + 1) bytes per token instead of a
second pass over the streams.
"""

import torch
from torch import Tensor

from .. import flags
from . import reference


def _triton_supported(x: Tensor) -> bool:
    hc = x.shape[-2]
    return (
        x.dtype == torch.bfloat16 and hc & (hc - 1) == 0 and hc <= 16 and x.numel() > 0 and not flags.reference_ops_only()
    )


# ---------------------------------------------------------------------------------- collapse
@torch.library.custom_op("v4::mhc_collapse", mutates_args=())
def mhc_collapse_op(
    x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, hc_eps: float, norm_eps: float, sinkhorn_iters: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """collapsed, post, comb, logits, rstd; see reference.collapse_fwd."""
    return reference.collapse_fwd(x, fn, base, scale, hc_eps, norm_eps, sinkhorn_iters)


@mhc_collapse_op.register_kernel("cuda")
def _mhc_collapse_cuda(x, fn, base, scale, hc_eps, norm_eps, sinkhorn_iters):
    if not _triton_supported(x):
        return reference.collapse_fwd(x, fn, base, scale, hc_eps, norm_eps, sinkhorn_iters)
    from .triton import mhc_collapse_fwd

    return mhc_collapse_fwd(x, fn, base, scale, hc_eps, norm_eps, sinkhorn_iters)


@mhc_collapse_op.register_fake
def _mhc_collapse_fake(x, fn, base, scale, hc_eps, norm_eps, sinkhorn_iters):
    lead, hc = x.shape[:-2], x.shape[-2]
    gates = dict(dtype=fn.dtype, device=x.device)
    return (
        x.new_empty((*lead, x.shape[-1])),
        x.new_empty((*lead, hc), **gates),
        x.new_empty((*lead, hc, hc), **gates),
        x.new_empty((*lead, fn.shape[0]), **gates),
        x.new_empty(lead, **gates),
    )


@torch.library.custom_op("v4::mhc_collapse_bwd", mutates_args=())
def mhc_collapse_bwd_op(
    dcollapsed: Tensor,
    dpost: Tensor,
    dcomb: Tensor,
    x: Tensor,
    fn: Tensor,
    base: Tensor,
    scale: Tensor,
    logits: Tensor,
    rstd: Tensor,
    hc_eps: float,
    sinkhorn_iters: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dx, dfn, dbase, dscale; see reference.collapse_bwd."""
    return reference.collapse_bwd(dcollapsed, dpost, dcomb, x, fn, base, scale, logits, rstd, hc_eps, sinkhorn_iters)


@mhc_collapse_bwd_op.register_kernel("cuda")
def _mhc_collapse_bwd_cuda(dcollapsed, dpost, dcomb, x, fn, base, scale, logits, rstd, hc_eps, sinkhorn_iters):
    if not _triton_supported(x):
        return reference.collapse_bwd(dcollapsed, dpost, dcomb, x, fn, base, scale, logits, rstd, hc_eps, sinkhorn_iters)
    from .triton import mhc_collapse_bwd

    return mhc_collapse_bwd(dcollapsed, dpost, dcomb, x, fn, base, scale, logits, rstd, hc_eps, sinkhorn_iters)


@mhc_collapse_bwd_op.register_fake
def _mhc_collapse_bwd_fake(dcollapsed, dpost, dcomb, x, fn, base, scale, logits, rstd, hc_eps, sinkhorn_iters):
    return torch.empty_like(x), torch.empty_like(fn), torch.empty_like(base), torch.empty_like(scale)


def _collapse_setup_context(ctx, inputs, output):
    x, fn, base, scale, hc_eps, norm_eps, sinkhorn_iters = inputs
    _, _, _, logits, rstd = output
    ctx.save_for_backward(x, fn, base, scale, logits, rstd)
    ctx.hc_eps, ctx.sinkhorn_iters = hc_eps, sinkhorn_iters
    ctx.mark_non_differentiable(logits, rstd)


def _collapse_backward(ctx, dcollapsed, dpost, dcomb, _dlogits, _drstd):
    x, fn, base, scale, logits, rstd = ctx.saved_tensors
    dx, dfn, dbase, dscale = mhc_collapse_bwd_op(
        dcollapsed.contiguous(), dpost.contiguous(), dcomb.contiguous(), x, fn, base, scale, logits, rstd,
        ctx.hc_eps, ctx.sinkhorn_iters,
    )
    return dx, dfn, dbase, dscale, None, None, None


mhc_collapse_op.register_autograd(_collapse_backward, setup_context=_collapse_setup_context)


# ---------------------------------------------------------------------------------- head
@torch.library.custom_op("v4::mhc_head", mutates_args=())
def mhc_head_op(x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, hc_eps: float, norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """out, logits, rstd; see reference.head_fwd."""
    return reference.head_fwd(x, fn, base, scale, hc_eps, norm_eps)


@mhc_head_op.register_kernel("cuda")
def _mhc_head_cuda(x, fn, base, scale, hc_eps, norm_eps):
    if not _triton_supported(x):
        return reference.head_fwd(x, fn, base, scale, hc_eps, norm_eps)
    from .triton import mhc_head_fwd

    return mhc_head_fwd(x, fn, base, scale, hc_eps, norm_eps)


@mhc_head_op.register_fake
def _mhc_head_fake(x, fn, base, scale, hc_eps, norm_eps):
    lead = x.shape[:-2]
    gates = dict(dtype=fn.dtype, device=x.device)
    return x.new_empty((*lead, x.shape[-1])), x.new_empty((*lead, fn.shape[0]), **gates), x.new_empty(lead, **gates)


@torch.library.custom_op("v4::mhc_head_bwd", mutates_args=())
def mhc_head_bwd_op(
    dout: Tensor, x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, logits: Tensor, rstd: Tensor, hc_eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dx, dfn, dbase, dscale; see reference.head_bwd."""
    return reference.head_bwd(dout, x, fn, base, scale, logits, rstd, hc_eps)


@mhc_head_bwd_op.register_kernel("cuda")
def _mhc_head_bwd_cuda(dout, x, fn, base, scale, logits, rstd, hc_eps):
    if not _triton_supported(x):
        return reference.head_bwd(dout, x, fn, base, scale, logits, rstd, hc_eps)
    from .triton import mhc_head_bwd

    return mhc_head_bwd(dout, x, fn, base, scale, logits, rstd, hc_eps)


@mhc_head_bwd_op.register_fake
def _mhc_head_bwd_fake(dout, x, fn, base, scale, logits, rstd, hc_eps):
    return torch.empty_like(x), torch.empty_like(fn), torch.empty_like(base), torch.empty_like(scale)


def _head_setup_context(ctx, inputs, output):
    x, fn, base, scale, hc_eps, norm_eps = inputs
    _, logits, rstd = output
    ctx.save_for_backward(x, fn, base, scale, logits, rstd)
    ctx.hc_eps = hc_eps
    ctx.mark_non_differentiable(logits, rstd)


def _head_backward(ctx, dout, _dlogits, _drstd):
    x, fn, base, scale, logits, rstd = ctx.saved_tensors
    dx, dfn, dbase, dscale = mhc_head_bwd_op(dout.contiguous(), x, fn, base, scale, logits, rstd, ctx.hc_eps)
    return dx, dfn, dbase, dscale, None, None


mhc_head_op.register_autograd(_head_backward, setup_context=_head_setup_context)


# ---------------------------------------------------------------------------------- expand
@torch.library.custom_op("v4::mhc_expand", mutates_args=())
def mhc_expand_op(x: Tensor, out: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """New streams ``[..., H, D]``; see reference.expand_fwd."""
    return reference.expand_fwd(x, out, post, comb)


@mhc_expand_op.register_kernel("cuda")
def _mhc_expand_cuda(x, out, post, comb):
    if not _triton_supported(x):
        return reference.expand_fwd(x, out, post, comb)
    from .triton import mhc_expand_fwd

    return mhc_expand_fwd(x, out, post, comb)


@mhc_expand_op.register_fake
def _mhc_expand_fake(x, out, post, comb):
    return torch.empty_like(x)


@torch.library.custom_op("v4::mhc_expand_bwd", mutates_args=())
def mhc_expand_bwd_op(dnew: Tensor, x: Tensor, out: Tensor, post: Tensor, comb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dx, dout, dpost, dcomb; see reference.expand_bwd."""
    return reference.expand_bwd(dnew, x, out, post, comb)


@mhc_expand_bwd_op.register_kernel("cuda")
def _mhc_expand_bwd_cuda(dnew, x, out, post, comb):
    if not _triton_supported(x):
        return reference.expand_bwd(dnew, x, out, post, comb)
    from .triton import mhc_expand_bwd

    return mhc_expand_bwd(dnew, x, out, post, comb)


@mhc_expand_bwd_op.register_fake
def _mhc_expand_bwd_fake(dnew, x, out, post, comb):
    return torch.empty_like(x), torch.empty_like(out), torch.empty_like(post), torch.empty_like(comb)


def _expand_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _expand_backward(ctx, dnew):
    return mhc_expand_bwd_op(dnew.contiguous(), *ctx.saved_tensors)


mhc_expand_op.register_autograd(_expand_backward, setup_context=_expand_setup_context)
