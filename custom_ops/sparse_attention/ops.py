"""Registration of ``v4::sparse_attention`` and its backward ``v4::sparse_attention_bwd``.

The eager reference (reference.py) is the implementation on every device; on CUDA, bf16 queries run
the Triton kernels (triton/) instead, as decided for every op in custom_ops/dispatch.py (which also
honours ``TITAN_V4_REFERENCE_OPS``). The backward is its own op so that under ``torch.compile`` the
backward graph also holds one opaque node.

The schemas come from :class:`contract.Inputs`: the forward takes its fields positionally, the
backward takes ``grad_out, out, lse`` followed by the same fields. The ops take validated,
contiguous tensors; model code calls :func:`custom_ops.sparse_attention` (api.py), not these.
"""

import torch
from torch import Tensor

from .. import dispatch
from ..schema import tensor_fields
from . import reference
from .contract import Grads, Inputs, Outputs, compute_dtype, triton_applies

TENSOR_FIELDS = tensor_fields(Inputs)


sparse_attention_op = dispatch.op(
    "v4::sparse_attention", Inputs, Outputs,
    reference=reference.sparse_attention_fwd, triton="custom_ops.sparse_attention.triton:sparse_attention_fwd",
    applies=triton_applies, reads="q", via=dispatch.packed(Inputs),
)


@sparse_attention_op.register_fake
def _sparse_attention_fake(*args):
    q = Inputs(*args).q
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=compute_dtype(q.dtype))


def _backward_on(bwd, grad_out: Tensor, out: Tensor, lse: Tensor, *args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward op on ``bwd`` (the reference's or the kernels'): dq, dkv, dsink, dpool. Custom
    ops cannot return None, so without a pool dpool is ``[B, 0, D]``."""
    inputs = Inputs(*args)
    return _with_empty_dpool(bwd(inputs, grad_out, Outputs(out, lse)), inputs)


sparse_attention_bwd_op = dispatch.op(
    "v4::sparse_attention_bwd", Inputs, Grads, leading=("grad_out", "out", "lse"),
    reference=reference.sparse_attention_bwd, triton="custom_ops.sparse_attention.triton:sparse_attention_bwd",
    applies=triton_applies, reads="q", via=_backward_on,
)


@sparse_attention_bwd_op.register_fake
def _sparse_attention_bwd_fake(grad_out, out, lse, *args):
    inputs = Inputs(*args)
    dpool = None if inputs.pool is None else torch.empty_like(inputs.pool)
    grads = Grads(torch.empty_like(inputs.q), torch.empty_like(inputs.kv), torch.empty_like(inputs.sink), dpool)
    return _with_empty_dpool(grads, inputs)


def _with_empty_dpool(grads: Grads, inputs: Inputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if grads.dpool is not None:
        return tuple(grads)
    q = inputs.q
    return tuple(grads._replace(dpool=q.new_zeros((q.shape[0], 0, q.shape[-1]))))


def _setup_context(ctx, inputs, output):
    inputs = Inputs(*inputs)
    # Only the tensor inputs, out and lse are kept; the backward recomputes the probabilities.
    ctx.save_for_backward(*(getattr(inputs, name) for name in TENSOR_FIELDS), *output)
    ctx.scalars = {name: value for name, value in inputs._asdict().items() if name not in TENSOR_FIELDS}
    # lse is a by-product for the caller (and the kernels' contract); its gradient is not implemented.
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, grad_lse):
    *tensors, out, lse = ctx.saved_tensors
    inputs = Inputs(**dict(zip(TENSOR_FIELDS, tensors)), **ctx.scalars)
    grads = Grads(*sparse_attention_bwd_op(grad_out.contiguous(), out, lse, *inputs))
    if inputs.pool is None:
        grads = grads._replace(dpool=None)
    # One gradient per op input: Grads names them d<input>; the other inputs get None.
    return tuple(getattr(grads, f"d{name}", None) for name in Inputs._fields)


sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)
