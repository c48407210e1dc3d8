"""Triton forward of ``v4::indexer_scores`` and the fused scoring + selection of ``v4::indexer_topk``.

Kernel -> launchers. One program scores one query against its entries, block by block:
``I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s])`` with the query's heads as the M dimension of
``[H, D] x [D, BLOCK_N]``. The top-k launcher scores a chunk of queries into an fp32 ``[B, C, P]``
buffer (never ``[C, H, P]``) and selects with ``torch.topk`` (a Triton top-k over P up to 16K entries
per row is not worth its complexity while torch.topk on the fp32 rows is a small share of the time).
"""

import torch
import triton
import triton.language as tl

from ...documents import first_entries
from ..contract import ScoresInputs, TopkInputs, n_listed
from ..reference import query_chunk, select_topk
from .common import _entry_block, _visible_range, block, check_scores_inputs, dot_precision


@triton.jit
def _indexer_scores_fwd_kernel(
    q_ptr, w_ptr, keys_ptr, idx_ptr, first_ptr, out_ptr,
    T0, P, N_LISTED, RATIO,
    stride_qb, stride_qs, stride_qh,
    stride_wb, stride_ws,
    stride_kb, stride_kp,
    stride_ib, stride_is,
    stride_fb,
    stride_ob, stride_os,
    H: tl.constexpr, D: tl.constexpr, LISTED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Scores of query ``T0 + program_id(0)`` of batch ``program_id(1)``, into out row ``program_id(0)``.

    LISTED: the N_LISTED entries of ``idx`` (ignored ones get -inf). Otherwise every visible entry
    ``first[b, t] <= s < (t + 1) // RATIO`` (the caller pre-fills the rest of the row with -inf).
    """
    row = tl.program_id(0)
    b = tl.program_id(1)
    t = T0 + row
    n_first, n_vis, n_start = _visible_range(first_ptr, b, t, stride_fb, P, RATIO, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # [BLOCK_H, BLOCK_D]
    q = tl.load(
        q_ptr + b * stride_qb + t * stride_qs + offs_h[:, None] * stride_qh + offs_d[None, :],
        mask=(offs_h[:, None] < H) & (offs_d[None, :] < D), other=0.0,
    )
    # [BLOCK_H]
    w = tl.load(w_ptr + b * stride_wb + t * stride_ws + offs_h, mask=offs_h < H, other=0.0)
    n_end = N_LISTED if LISTED else n_vis
    for n0 in range(0 if LISTED else n_start, n_end, BLOCK_N):
        # [BLOCK_N] each
        offs_n, entry, valid = _entry_block(
            idx_ptr + b * stride_ib + t * stride_is, n0, n_first, n_vis, N_LISTED, LISTED, BLOCK_N
        )
        # [BLOCK_N, BLOCK_D]
        k = tl.load(
            keys_ptr + b * stride_kb + entry[:, None] * stride_kp + offs_d[None, :],
            mask=valid[:, None] & (offs_d[None, :] < D), other=0.0,
        )
        # [BLOCK_H, BLOCK_N]
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        # [BLOCK_N]
        score = tl.sum(tl.maximum(x, 0.0) * w[:, None], axis=0)
        score = tl.where(valid, score, float("-inf"))
        tl.store(out_ptr + b * stride_ob + row * stride_os + offs_n, score, mask=offs_n < n_end)


def _launch_scores(q, weights, keys, indices, first: torch.Tensor, ratio: int, t0: int, out: torch.Tensor) -> None:
    """Scores of queries ``[t0, t0 + out.shape[1])`` into ``out`` ``[B, C, n]`` fp32 (pre-filled with
    -inf when indices is None); ``first`` ``[B, S]`` int32 from documents.first_entries."""
    batch, _, heads, dim = q.shape
    rows = out.shape[1]
    listed = indices is not None
    idx = indices if listed else out  # any tensor: the LISTED=False kernel never reads it
    _indexer_scores_fwd_kernel[(rows, batch)](
        q, weights, keys, idx, first, out,
        t0, keys.shape[1], out.shape[2], ratio,
        q.stride(0), q.stride(1), q.stride(2),
        weights.stride(0), weights.stride(1),
        keys.stride(0), keys.stride(1),
        idx.stride(0), idx.stride(1),
        first.stride(0),
        out.stride(0), out.stride(1),
        H=heads, D=dim, LISTED=listed,
        BLOCK_H=block(heads), BLOCK_D=block(dim), BLOCK_N=64, PRECISION=dot_precision(q.dtype),
        num_warps=4,
    )  # fmt: skip


def indexer_scores_fwd(inputs: ScoresInputs) -> torch.Tensor:
    """``v4::indexer_scores`` on validated contiguous inputs: ``[B, S, K or P]`` fp32."""
    q, weights, keys, indices, ratio, doc_ids = inputs
    check_scores_inputs(q, weights, keys)
    batch, seq_len = q.shape[:2]
    n = n_listed(indices, keys.shape[1])
    out = torch.full((batch, seq_len, n), float("-inf"), dtype=torch.float32, device=q.device)
    if n > 0:
        first = first_entries(doc_ids, batch, seq_len, ratio, q.device)
        _launch_scores(q, weights, keys, indices, first, ratio, 0, out)
    return out


def indexer_topk(inputs: TopkInputs) -> torch.Tensor:
    """``v4::indexer_topk`` on validated contiguous inputs: ``[B, S, k]`` int32.

    Scores a chunk of C queries at a time into one reused ``[B, C, P]`` fp32 buffer (C bounded so the
    buffer stays under 256 MiB), then keeps the k best of each row.
    """
    q, weights, keys, k, ratio, doc_ids = inputs
    check_scores_inputs(q, weights, keys)
    batch, seq_len = q.shape[:2]
    n_entries = keys.shape[1]
    if n_entries == 0:
        return torch.full((batch, seq_len, k), -1, dtype=torch.int32, device=q.device)
    chunk = query_chunk(batch, seq_len, 1, n_entries)
    buffer = torch.empty(batch, chunk, n_entries, dtype=torch.float32, device=q.device)
    picks = torch.empty(batch, seq_len, k, dtype=torch.int32, device=q.device)
    first = first_entries(doc_ids, batch, seq_len, ratio, q.device)
    for t0 in range(0, seq_len, chunk):
        t1 = min(seq_len, t0 + chunk)
        scores = buffer[:, : t1 - t0]
        scores.fill_(float("-inf"))
        _launch_scores(q, weights, keys, None, first, ratio, t0, scores)
        picks[:, t0:t1] = select_topk(scores, k)
    return picks
