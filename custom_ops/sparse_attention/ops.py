"""Registration of ``v4::sparse_attention`` and its backward ``v4::sparse_attention_bwd``.

Both ops are registered without ``device_types``, so the eager reference serves every device (CPU
and, until the Triton kernels land, CUDA). The backward is its own op so that under
``torch.compile`` the backward graph also holds one opaque node instead of the traced chunk loop.

The ops take validated, contiguous tensors; call :func:`custom_ops.sparse_attention` (api.py), not
these, from model code. Arguments are positional here (custom-op autograd is simplest that way); the
public function has the keyword-only signature.
"""

from typing import Optional

import torch
from torch import Tensor

from . import reference


@torch.library.custom_op("v4::sparse_attention", mutates_args=())
def sparse_attention_op(
    q: Tensor,
    kv: Tensor,
    sink: Tensor,
    pool: Optional[Tensor],
    topk: Optional[Tensor],
    doc_ids: Optional[Tensor],
    window: int,
    scale: float,
    ratio: int,
) -> tuple[Tensor, Tensor]:
    """out ``[B, S, H, D]`` (q's dtype), lse ``[B, S, H]`` fp32 without the sink; see reference.py."""
    return reference.sparse_attention_fwd(q, kv, sink, pool, topk, doc_ids, window, scale, ratio)


@sparse_attention_op.register_fake
def _sparse_attention_fake(q, kv, sink, pool, topk, doc_ids, window, scale, ratio):
    batch, seq_len, heads, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, seq_len, heads), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("v4::sparse_attention_bwd", mutates_args=())
def sparse_attention_bwd_op(
    grad_out: Tensor,
    q: Tensor,
    kv: Tensor,
    sink: Tensor,
    pool: Optional[Tensor],
    topk: Optional[Tensor],
    doc_ids: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    window: int,
    scale: float,
    ratio: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dkv, dsink, dpool. Custom ops cannot return None, so without a pool dpool is ``[B, 0, D]``."""
    dq, dkv, dsink, dpool = reference.sparse_attention_bwd(
        grad_out, q, kv, sink, pool, topk, doc_ids, out, lse, window, scale, ratio
    )
    if dpool is None:
        dpool = q.new_zeros((q.shape[0], 0, q.shape[-1]))
    return dq, dkv, dsink, dpool


@sparse_attention_bwd_op.register_fake
def _sparse_attention_bwd_fake(grad_out, q, kv, sink, pool, topk, doc_ids, out, lse, window, scale, ratio):
    dpool = q.new_empty((q.shape[0], 0, q.shape[-1])) if pool is None else torch.empty_like(pool)
    return torch.empty_like(q), torch.empty_like(kv), torch.empty_like(sink), dpool


def _setup_context(ctx, inputs, output):
    q, kv, sink, pool, topk, doc_ids, window, scale, ratio = inputs
    out, lse = output
    # Only inputs, out and lse are kept; the backward recomputes the probabilities.
    ctx.save_for_backward(q, kv, sink, pool, topk, doc_ids, out, lse)
    ctx.window, ctx.scale, ctx.ratio = window, scale, ratio
    # lse is a by-product for the caller (and the kernels' contract); its gradient is not implemented.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, kv, sink, pool, topk, doc_ids, out, lse = ctx.saved_tensors
    dq, dkv, dsink, dpool = sparse_attention_bwd_op(
        grad_out.contiguous(), q, kv, sink, pool, topk, doc_ids, out, lse, ctx.window, ctx.scale, ctx.ratio
    )
    # One gradient per op input: q, kv, sink, pool, topk, doc_ids, window, scale, ratio.
    return dq, dkv, dsink, None if pool is None else dpool, None, None, None, None, None


sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)
