"""Registration of the mHC ops ``v4::mhc_collapse``, ``v4::mhc_head``, ``v4::mhc_expand`` and their
backward ops (``*_bwd``: one opaque node each in a compiled backward graph).

The eager reference (reference.py) is the implementation on every device; on CUDA, bf16 streams with
a power-of-two H up to 16 run the Triton kernels (triton/) instead, as decided for every op in
custom_ops/dispatch.py (which also honours ``TITAN_V4_REFERENCE_OPS``). The predicate reads the
streams ``x``, which the backward ops take after the output gradients. The schemas come from the
NamedTuples of contract.py. The ops take validated, contiguous tensors; call the functions in
api.py, not these.

The forward ops of collapse and head also return the fp32 ``logits [..., M]`` and ``rstd [...]``
that their backward needs (marked non-differentiable): 4 * (M + 1) bytes per token instead of a
second pass over the streams.
"""

import torch
from torch import Tensor

from .. import dispatch
from . import reference
from .contract import (
    CollapseInputs,
    CollapseOutputs,
    CollapseSaved,
    ExpandGrads,
    ExpandInputs,
    Grads,
    HeadInputs,
    HeadOutputs,
    HeadSaved,
    triton_applies,
)

# ---------------------------------------------------------------------------------- collapse
mhc_collapse_op = dispatch.op(
    "v4::mhc_collapse", CollapseInputs, CollapseOutputs,
    reference=reference.collapse_fwd, triton="custom_ops.mhc.triton:mhc_collapse_fwd", applies=triton_applies, reads="x",
)


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


mhc_collapse_bwd_op = dispatch.op(
    "v4::mhc_collapse_bwd", CollapseSaved, Grads, leading=("dcollapsed", "dpost", "dcomb"),
    reference=reference.collapse_bwd, triton="custom_ops.mhc.triton:mhc_collapse_bwd", applies=triton_applies, reads="x",
)


@mhc_collapse_bwd_op.register_fake
def _mhc_collapse_bwd_fake(dcollapsed, dpost, dcomb, *saved):
    return _gates_grads_fake(CollapseSaved(*saved))


def _collapse_setup_context(ctx, inputs, output):
    inputs, outputs = CollapseInputs(*inputs), CollapseOutputs(*output)
    ctx.save_for_backward(inputs.x, inputs.fn, inputs.base, inputs.scale, outputs.logits, outputs.rstd)
    ctx.hc_eps, ctx.sinkhorn_iters = inputs.hc_eps, inputs.sinkhorn_iters
    ctx.mark_non_differentiable(outputs.logits, outputs.rstd)


def _collapse_backward(ctx, dcollapsed, dpost, dcomb, _dlogits, _drstd):
    saved = CollapseSaved(*ctx.saved_tensors, ctx.hc_eps, ctx.sinkhorn_iters)
    grads = mhc_collapse_bwd_op(dcollapsed.contiguous(), dpost.contiguous(), dcomb.contiguous(), *saved)
    return *grads, None, None, None


mhc_collapse_op.register_autograd(_collapse_backward, setup_context=_collapse_setup_context)


# ---------------------------------------------------------------------------------- head
mhc_head_op = dispatch.op(
    "v4::mhc_head", HeadInputs, HeadOutputs,
    reference=reference.head_fwd, triton="custom_ops.mhc.triton:mhc_head_fwd", applies=triton_applies, reads="x",
)


@mhc_head_op.register_fake
def _mhc_head_fake(x, fn, base, scale, hc_eps, norm_eps):
    lead = x.shape[:-2]
    gates = dict(dtype=fn.dtype, device=x.device)
    return x.new_empty((*lead, x.shape[-1])), x.new_empty((*lead, fn.shape[0]), **gates), x.new_empty(lead, **gates)


mhc_head_bwd_op = dispatch.op(
    "v4::mhc_head_bwd", HeadSaved, Grads, leading=("dout",),
    reference=reference.head_bwd, triton="custom_ops.mhc.triton:mhc_head_bwd", applies=triton_applies, reads="x",
)


@mhc_head_bwd_op.register_fake
def _mhc_head_bwd_fake(dout, *saved):
    return _gates_grads_fake(HeadSaved(*saved))


def _head_setup_context(ctx, inputs, output):
    inputs, outputs = HeadInputs(*inputs), HeadOutputs(*output)
    ctx.save_for_backward(inputs.x, inputs.fn, inputs.base, inputs.scale, outputs.logits, outputs.rstd)
    ctx.hc_eps = inputs.hc_eps
    ctx.mark_non_differentiable(outputs.logits, outputs.rstd)


def _head_backward(ctx, dout, _dlogits, _drstd):
    grads = mhc_head_bwd_op(dout.contiguous(), *HeadSaved(*ctx.saved_tensors, ctx.hc_eps))
    return *grads, None, None


mhc_head_op.register_autograd(_head_backward, setup_context=_head_setup_context)


def _gates_grads_fake(saved: CollapseSaved | HeadSaved) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(Grads(*(torch.empty_like(t) for t in (saved.x, saved.fn, saved.base, saved.scale))))


# ---------------------------------------------------------------------------------- expand
mhc_expand_op = dispatch.op(
    "v4::mhc_expand", ExpandInputs, Tensor,
    reference=reference.expand_fwd, triton="custom_ops.mhc.triton:mhc_expand_fwd", applies=triton_applies, reads="x",
)


@mhc_expand_op.register_fake
def _mhc_expand_fake(x, out, post, comb):
    return torch.empty_like(x)


mhc_expand_bwd_op = dispatch.op(
    "v4::mhc_expand_bwd", ExpandInputs, ExpandGrads, leading=("dnew",),
    reference=reference.expand_bwd, triton="custom_ops.mhc.triton:mhc_expand_bwd", applies=triton_applies, reads="x",
)


@mhc_expand_bwd_op.register_fake
def _mhc_expand_bwd_fake(dnew, *inputs):
    return tuple(ExpandGrads(*(torch.empty_like(t) for t in ExpandInputs(*inputs))))


def _expand_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _expand_backward(ctx, dnew):
    return mhc_expand_bwd_op(dnew.contiguous(), *ctx.saved_tensors)


mhc_expand_op.register_autograd(_expand_backward, setup_context=_expand_setup_context)
