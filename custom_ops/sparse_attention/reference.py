"""Eager reference of ``v4::sparse_attention``: the specification of the op.

This module states every edge case of the op and is what kernels are tested against. It runs on any
device and in fp64 (as an oracle) as well as fp32 / bf16 (computed in fp32). Until the Triton kernels
exist it is also the implementation behind the op on CUDA, so it is written to be usable at training
shapes (S=4096, H=64, D=512, window=128, top-k 512):

* heads are packed FlashMLA-style: all H heads of one query share the same key/value rows, so every
  product is one batched matmul over (batch, query) of an ``[H, D] x [D, n_keys]`` matrix;
* the local window is gathered with pad + ``unfold`` and the top-k pool rows with index tensors, so
  nothing of size S x S is ever built;
* queries are processed in chunks, so temporaries are ``O(chunk * (window + K) * max(H, D))``;
* the backward recomputes the probabilities from the saved ``lse`` (flash-attention style) instead of
  keeping them from the forward.

Semantics (b = batch, t = query position, h = head):

* Documents. ``doc_ids[b]`` labels packed documents; a document is a maximal run of equal consecutive
  ids, and ``doc_start(b, t)`` is the first position of the run that contains t. Without doc_ids the
  whole row is one document (``doc_start = 0``).
* Local keys: kv rows ``j`` with ``max(t - window + 1, doc_start(b, t)) <= j <= t``. The query's own row is
  always visible, so no row is ever empty through the public API (the empty-row rule below still
  holds for the math).
* Pool entry ``w`` (compressed from source tokens ``[w * ratio, (w + 1) * ratio)``) is visible iff it is
  complete at t, ``w < (t + 1) // ratio``, and lies inside t's document, ``w * ratio >= doc_start(b, t)``.
  Entries ``w >= P`` do not exist.
* With ``topk``: only the listed entries. An index is ignored (never an error) when it is negative
  (-1 marks padding), ``>= P``, or fails the visibility rule above. Valid indices of one query are
  assumed distinct; a repeated valid index would be counted once per occurrence.
* Without ``topk`` (HCA): every visible pool entry. Without ``pool``: the local window only.
* ``logit = scale * q[b, t, h] . k`` with ``k = v`` = the kv or pool row (shared by all heads).
  ``p = exp(logit) / (sum(exp(visible logits)) + exp(sink[h]))``: the sink only enlarges the
  denominator, it has no value row. ``out = sum(p * v)``; a row with nothing visible gives 0.
* ``lse[b, t, h] = logsumexp(visible logits)`` WITHOUT the sink (-inf for an empty row), in the
  compute dtype (fp32 for bf16 / fp32 inputs, fp64 for fp64).
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..documents import doc_starts
from .contract import Grads, Inputs, Outputs, compute_dtype

# Bound on the elements of the largest per-chunk temporary (logits are [B, C, H, n_keys], gathered
# rows [B, C, n_keys, D]); 2**26 fp32 elements = 256 MiB. At S=4096, H=64, D=512, window=128, K=512
# this gives chunks of ~200 queries.
_CHUNK_ELEMENTS = 2**26


def default_query_chunk(batch: int, seq_len: int, heads: int, dim: int, n_keys: int) -> int:
    """Queries per chunk so that one temporary stays under ``_CHUNK_ELEMENTS`` elements."""
    per_query = batch * max(n_keys, 1) * max(heads, dim)
    return max(1, min(seq_len, _CHUNK_ELEMENTS // per_query))


class _ChunkKeys(NamedTuple):
    """Key/value rows visible to the queries ``[t0, t1)`` of one chunk (C = t1 - t0), in compute dtype."""

    # [B, C, D, W] view into the front-padded kv: slot i of query t holds kv row t - W + 1 + i.
    win: Tensor
    # [B or 1, C, W] bool: slot visible (inside the window, the document and the sequence).
    win_mask: Tensor
    # None (no pool part), [B, Pc, D] (HCA: the first Pc entries, shared by the chunk) or
    # [B, C, K, D] (CSA: rows gathered per query from the top-k indices).
    pool: Optional[Tensor]
    # [B or 1, C, Pc] or [B, C, K] bool: entry visible. None when pool is None.
    pool_mask: Optional[Tensor]
    # CSA only: [B, C, K] int64 row index into pool.reshape(B * P, D) (invisible slots point at row 0).
    pool_index: Optional[Tensor]


def _chunk_keys(
    kv_pad: Tensor,
    pool: Optional[Tensor],
    topk: Optional[Tensor],
    starts: Tensor,
    t0: int,
    t1: int,
    window: int,
    ratio: int,
) -> _ChunkKeys:
    """Gathers the keys of queries ``[t0, t1)``; ``window`` here is already clamped to ``<= S``."""
    device = kv_pad.device
    t = torch.arange(t0, t1, device=device)  # [C]
    start = starts[:, t0:t1]  # [B or 1, C]

    win = kv_pad[:, t0 : t1 + window - 1].unfold(1, window, 1)  # [B, C, D, W]
    key_pos = t[:, None] - (window - 1) + torch.arange(window, device=device)  # [C, W]
    # doc_start >= 0, so this also hides the zero padding at negative positions.
    win_mask = key_pos[None] >= start[..., None]  # [B or 1, C, W]

    if pool is None:
        return _ChunkKeys(win, win_mask, None, None, None)
    batch, n_pool, dim = pool.shape
    n_complete = (t + 1) // ratio  # [C]: entries w < n_complete are causally visible to t

    if topk is None:
        # Entries >= t1 // ratio are invisible to the whole chunk; do not touch them.
        n_cols = min(n_pool, t1 // ratio)
        if n_cols == 0:
            return _ChunkKeys(win, win_mask, None, None, None)
        w = torch.arange(n_cols, device=device)  # [Pc]
        pool_mask = (w < n_complete[:, None])[None] & (w * ratio >= start[..., None])  # [B or 1, C, Pc]
        return _ChunkKeys(win, win_mask, pool[:, :n_cols], pool_mask, None)

    if n_pool == 0:
        return _ChunkKeys(win, win_mask, None, None, None)
    idx = topk[:, t0:t1].long()  # [B, C, K]
    pool_mask = (
        (idx >= 0)
        & (idx < n_pool)
        & (idx < n_complete[None, :, None])
        & (idx * ratio >= start[..., None])
    )
    # Invisible slots read row 0 of their batch; their probability is exactly 0.
    safe = torch.where(pool_mask, idx, 0)
    flat = safe + torch.arange(batch, device=device)[:, None, None] * n_pool  # [B, C, K]
    rows = pool.reshape(batch * n_pool, dim)[flat]  # [B, C, K, D]
    return _ChunkKeys(win, win_mask, rows, pool_mask, flat)


def _dot_keys(x: Tensor, keys: _ChunkKeys) -> Tensor:
    """``x . row`` for every visible-or-not key slot: x ``[B, C, H, D]`` -> ``[B, C, H, W + n_pool]``."""
    parts = [torch.einsum("bchd,bcdw->bchw", x, keys.win)]
    if keys.pool is not None:
        if keys.pool_index is None:
            parts.append(torch.einsum("bchd,bpd->bchp", x, keys.pool))
        else:
            parts.append(torch.einsum("bchd,bckd->bchk", x, keys.pool))
    return torch.cat(parts, dim=-1)


def _weighted_rows(weights: Tensor, keys: _ChunkKeys) -> Tensor:
    """``sum_n weights[..., n] * row_n``: ``[B, C, H, W + n_pool]`` -> ``[B, C, H, D]``."""
    window = keys.win.shape[-1]
    res = torch.einsum("bchw,bcdw->bchd", weights[..., :window], keys.win)
    if keys.pool is not None:
        if keys.pool_index is None:
            res = res + torch.einsum("bchp,bpd->bchd", weights[..., window:], keys.pool)
        else:
            res = res + torch.einsum("bchk,bckd->bchd", weights[..., window:], keys.pool)
    return res


def _masked_logits(qc: Tensor, keys: _ChunkKeys, scale: float) -> Tensor:
    """Scaled logits ``[B, C, H, W + n_pool]`` with invisible slots set to -inf."""
    logits = _dot_keys(qc, keys) * scale
    masks = [keys.win_mask]
    if keys.pool is not None:
        masks.append(keys.pool_mask)
    batch = logits.shape[0]
    mask = torch.cat([m.expand(batch, -1, -1) for m in masks], dim=-1)  # [B, C, n]
    return logits.masked_fill(~mask[:, :, None, :], float("-inf"))


def _lse_with_sink(lse: Tensor, sink: Tensor) -> Tensor:
    """Log of the full softmax denominator, ``log(sum exp(logits) + exp(sink))``, ``[B, C, H]``.

    Clamped to the dtype's lowest finite value so that ``exp(-inf - lse_full)`` is 0, not NaN, for an
    empty row with a -inf sink.
    """
    return torch.logaddexp(lse, sink).clamp_min(torch.finfo(lse.dtype).min)


def _prepare(q: Tensor, kv: Tensor, sink: Tensor, pool: Optional[Tensor], doc_ids: Optional[Tensor], window: int):
    """Compute-dtype copies shared by forward and backward."""
    seq_len = q.shape[1]
    cdt = compute_dtype(q.dtype)
    win = min(window, seq_len)  # keys before position 0 do not exist
    # [B, S + W - 1, D]: W - 1 zero rows in front so that every query has a full window to unfold.
    kv_pad = F.pad(kv.to(cdt), (0, 0, win - 1, 0))
    pool_c = None if pool is None else pool.to(cdt)
    starts = doc_starts(doc_ids, seq_len, q.device)
    return cdt, win, kv_pad, pool_c, sink.to(cdt), starts


def _chunk_size(q: Tensor, pool: Optional[Tensor], topk: Optional[Tensor], win: int, query_chunk: Optional[int]) -> int:
    if query_chunk is not None:
        return query_chunk
    batch, seq_len, heads, dim = q.shape
    n_pool = 0 if pool is None else (topk.shape[-1] if topk is not None else pool.shape[1])
    return default_query_chunk(batch, seq_len, heads, dim, win + n_pool)


def sparse_attention_fwd(inputs: Inputs, query_chunk: Optional[int] = None) -> Outputs:
    """Forward of the op on validated, contiguous inputs (see the module docstring for the rules).

    Args:
        inputs: q ``[B, S, H, D]`` bf16 / fp32 / fp64; kv ``[B, S, D]`` and pool ``[B, P, D]`` (or None)
            in q's dtype; sink ``[H]`` fp32 (or fp64); topk ``[B, S, K]`` int32 or None; doc_ids
            ``[B, S]`` integer or None; window, scale, ratio.
        query_chunk: queries per chunk (None: pick from the shapes). Tests set it small to exercise
            chunk boundaries.
    Returns:
        out ``[B, S, H, D]`` in q's dtype and lse ``[B, S, H]`` in the compute dtype (without the sink).
    """
    q, kv, sink, pool, topk, doc_ids, window, scale, ratio = inputs
    batch, seq_len, heads, dim = q.shape
    cdt, win, kv_pad, pool_c, sink_c, starts = _prepare(q, kv, sink, pool, doc_ids, window)
    chunk = _chunk_size(q, pool, topk, win, query_chunk)

    out = torch.empty(batch, seq_len, heads, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, seq_len, heads, dtype=cdt, device=q.device)
    for t0 in range(0, seq_len, chunk):
        t1 = min(seq_len, t0 + chunk)
        qc = q[:, t0:t1].to(cdt)  # [B, C, H, D]
        keys = _chunk_keys(kv_pad, pool_c, topk, starts, t0, t1, win, ratio)
        logits = _masked_logits(qc, keys, scale)  # [B, C, H, n]
        lse_c = torch.logsumexp(logits, dim=-1)  # [B, C, H]; -inf for an empty row
        probs = torch.exp(logits - _lse_with_sink(lse_c, sink_c)[..., None])
        out[:, t0:t1] = _weighted_rows(probs, keys).to(q.dtype)
        lse[:, t0:t1] = lse_c
    return Outputs(out, lse)


def sparse_attention_bwd(
    inputs: Inputs, grad_out: Tensor, outputs: Outputs, query_chunk: Optional[int] = None
) -> Grads:
    """Flash-attention backward from the saved ``out`` and ``lse`` (no probabilities kept).

    With ``p`` the probabilities (denominator including the sink), ``dP = dO . v``,
    ``delta = sum_d dO * out`` and ``dS = p * (dP - delta)``:
    ``dq = scale * sum_n dS * k_n``; each key row gets ``scale * sum_h dS * q + sum_h p * dO``
    (K = V, so the key and value gradients of a row add up); ``dsink[h] = -sum_{b,t} p_sink * delta``
    with ``p_sink = exp(sink - logaddexp(lse, sink))``. The gradient of ``lse`` is not supported (the
    op marks lse non-differentiable).

    Args:
        inputs: as in :func:`sparse_attention_fwd`.
        grad_out: ``[B, S, H, D]`` in q's dtype.
        outputs: the forward's ``out`` and ``lse``.
    Returns:
        dq (q's dtype), dkv (kv's dtype), dsink (sink's dtype), dpool (pool's dtype, None without pool).
    """
    q, kv, sink, pool, topk, doc_ids, window, scale, ratio = inputs
    out, lse = outputs
    batch, seq_len, heads, dim = q.shape
    cdt, win, kv_pad, pool_c, sink_c, starts = _prepare(q, kv, sink, pool, doc_ids, window)
    chunk = _chunk_size(q, pool, topk, win, query_chunk)
    dq = torch.empty(batch, seq_len, heads, dim, dtype=q.dtype, device=q.device)
    dkv_pad = torch.zeros_like(kv_pad)  # accumulated over chunks; the W - 1 pad rows are dropped
    dpool = None if pool_c is None else torch.zeros_like(pool_c)
    dsink = torch.zeros(heads, dtype=cdt, device=q.device)
    for t0 in range(0, seq_len, chunk):
        t1 = min(seq_len, t0 + chunk)
        n_q = t1 - t0
        qc = q[:, t0:t1].to(cdt)  # [B, C, H, D]
        do = grad_out[:, t0:t1].to(cdt)  # [B, C, H, D]
        keys = _chunk_keys(kv_pad, pool_c, topk, starts, t0, t1, win, ratio)
        lse_full = _lse_with_sink(lse[:, t0:t1].to(cdt), sink_c)  # [B, C, H]
        probs = torch.exp(_masked_logits(qc, keys, scale) - lse_full[..., None])  # [B, C, H, n]
        delta = (do * out[:, t0:t1].to(cdt)).sum(dim=-1)  # [B, C, H]
        dlogits = probs * (_dot_keys(do, keys) - delta[..., None])  # [B, C, H, n]; 0 where invisible
        dq[:, t0:t1] = (scale * _weighted_rows(dlogits, keys)).to(q.dtype)
        dsink -= (torch.exp(sink_c - lse_full) * delta).sum(dim=(0, 1))

        # Gradient of each key slot's row: as a key (through the logits) plus as a value.
        dscores = scale * dlogits
        dwin = torch.einsum("bchw,bchd->bcwd", dscores[..., :win], qc) + torch.einsum(
            "bchw,bchd->bcwd", probs[..., :win], do
        )  # [B, C, W, D]
        # Slot i of query t0 + c is padded row t0 + c + i; overlapping windows add up.
        pad_row = (torch.arange(n_q, device=q.device)[:, None] + torch.arange(win, device=q.device)) + t0
        dkv_pad.index_add_(1, pad_row.reshape(-1), dwin.reshape(batch, n_q * win, dim))
        if keys.pool is None:
            continue
        if keys.pool_index is None:
            n_cols = keys.pool.shape[1]
            dpool[:, :n_cols] += torch.einsum("bchp,bchd->bpd", dscores[..., win:], qc) + torch.einsum(
                "bchp,bchd->bpd", probs[..., win:], do
            )
        else:
            drows = torch.einsum("bchk,bchd->bckd", dscores[..., win:], qc) + torch.einsum(
                "bchk,bchd->bckd", probs[..., win:], do
            )  # [B, C, K, D]; exactly 0 for invisible slots
            dpool.view(-1, dim).index_add_(0, keys.pool_index.reshape(-1), drows.reshape(-1, dim))

    # A fresh tensor (not a view of dkv_pad: an op output must not carry a storage offset).
    dkv = torch.empty_like(kv)
    dkv.copy_(dkv_pad[:, win - 1 :])
    return Grads(dq, dkv, dsink.to(sink.dtype), None if dpool is None else dpool.to(pool.dtype))
