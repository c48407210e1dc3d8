"""Triton backward of ``v4::indexer_scores``.

Kernel -> launcher. One program per (query, batch element) recomputes ``x = q[t, h] . k[s]`` for its
entries block by block and, with ``g = grad[t, s]`` and ``c = g * w[t, h] * 1[x > 0]``, accumulates
``dw[t, h] = sum_s g * relu(x)`` and ``dq[t, h] = sum_s c * k[s]`` in registers. The key gradient
``dk[s] = sum_{t, h} c * q[t, h]`` collects contributions from every query that scores s, so each
program adds its ``[BLOCK_N, D]`` share with fp32 atomics into a ``[B, P, D]`` fp32 buffer (no
reverse index is needed; the order of the additions, and so the last bits of dk, is not deterministic).
"""

import torch
import triton
import triton.language as tl

from ...documents import first_entries
from ..contract import ScoresGrads, ScoresInputs, n_listed
from .common import _entry_block, _visible_range, block, check_scores_inputs, dot_precision


@triton.jit
def _indexer_scores_bwd_kernel(
    grad_ptr, q_ptr, w_ptr, keys_ptr, idx_ptr, first_ptr, dq_ptr, dw_ptr, dk_ptr,
    P, N_LISTED, RATIO,
    stride_gb, stride_gs,
    stride_qb, stride_qs, stride_qh,
    stride_wb, stride_ws,
    stride_kb, stride_kp,
    stride_ib, stride_is,
    stride_fb,
    H: tl.constexpr, D: tl.constexpr, LISTED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dq, dw of query ``program_id(0)`` of batch ``program_id(1)``; its share of dk (atomics).

    dq / dw / dk share the strides of q / w / keys; dk is fp32.
    """
    t = tl.program_id(0)
    b = tl.program_id(1)
    n_first, n_vis, n_start = _visible_range(first_ptr, b, t, stride_fb, P, RATIO, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hd_mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    q_off = b * stride_qb + t * stride_qs + offs_h[:, None] * stride_qh + offs_d[None, :]
    # [BLOCK_H, BLOCK_D]
    q = tl.load(q_ptr + q_off, mask=hd_mask, other=0.0)
    # [BLOCK_H]
    w = tl.load(w_ptr + b * stride_wb + t * stride_ws + offs_h, mask=offs_h < H, other=0.0)
    # [BLOCK_H, BLOCK_D]
    dq = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    # [BLOCK_H]
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    n_end = N_LISTED if LISTED else n_vis
    for n0 in range(0 if LISTED else n_start, n_end, BLOCK_N):
        # [BLOCK_N] each
        offs_n, entry, valid = _entry_block(
            idx_ptr + b * stride_ib + t * stride_is, n0, n_first, n_vis, N_LISTED, LISTED, BLOCK_N
        )
        # [BLOCK_N]: the gradient of entries that are not visible is ignored
        g = tl.load(grad_ptr + b * stride_gb + t * stride_gs + offs_n, mask=valid, other=0.0)
        nd_mask = valid[:, None] & (offs_d[None, :] < D)
        k_off = b * stride_kb + entry[:, None] * stride_kp + offs_d[None, :]
        # [BLOCK_N, BLOCK_D]
        k = tl.load(keys_ptr + k_off, mask=nd_mask, other=0.0)
        # [BLOCK_H, BLOCK_N]
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        dw += tl.sum(tl.maximum(x, 0.0) * g[None, :], axis=1)
        # [BLOCK_H, BLOCK_N]
        coef = tl.where(x > 0, w[:, None] * g[None, :], 0.0)
        dq += tl.dot(coef.to(k.dtype), k, input_precision=PRECISION)
        # [BLOCK_N, BLOCK_D]
        dk = tl.dot(tl.trans(coef.to(q.dtype)), q, input_precision=PRECISION)
        tl.atomic_add(dk_ptr + k_off, dk, mask=nd_mask)
    tl.store(dq_ptr + q_off, dq.to(dq_ptr.dtype.element_ty), mask=hd_mask)
    tl.store(dw_ptr + b * stride_wb + t * stride_ws + offs_h, dw, mask=offs_h < H)


def indexer_scores_bwd(inputs: ScoresInputs, grad: torch.Tensor) -> ScoresGrads:
    """Gradients of ``sum(grad * scores)`` on validated contiguous inputs; grad ``[B, S, K or P]`` fp32."""
    q, weights, keys, indices, ratio, doc_ids = inputs
    check_scores_inputs(q, weights, keys)
    batch, seq_len, heads, dim = q.shape
    n_entries = keys.shape[1]
    grad = grad.to(torch.float32).contiguous()
    dq = torch.empty_like(q)
    dweights = torch.empty_like(weights)
    dkeys = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device)
    listed = indices is not None
    idx = indices if listed else grad  # any tensor: the LISTED=False kernel never reads it
    first = first_entries(doc_ids, batch, seq_len, ratio, q.device)
    _indexer_scores_bwd_kernel[(seq_len, batch)](
        grad, q, weights, keys, idx, first, dq, dweights, dkeys,
        n_entries, n_listed(indices, n_entries), ratio,
        grad.stride(0), grad.stride(1),
        q.stride(0), q.stride(1), q.stride(2),
        weights.stride(0), weights.stride(1),
        keys.stride(0), keys.stride(1),
        idx.stride(0), idx.stride(1),
        first.stride(0),
        H=heads, D=dim, LISTED=listed,
        BLOCK_H=block(heads), BLOCK_D=block(dim), BLOCK_N=64, PRECISION=dot_precision(q.dtype),
        num_warps=4,
    )  # fmt: skip
    return ScoresGrads(dq, dweights, dkeys.to(keys.dtype))
