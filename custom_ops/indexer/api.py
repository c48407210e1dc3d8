"""Public entry points of the indexer ops: argument validation, then the registered op.

Each function raises TypeError / ValueError naming the bad argument. Non-contiguous tensors are made
contiguous (a copy): the ops take contiguous tensors.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from ..checks import check_device, check_doc_ids, check_int, check_same, check_sink, check_tensor
from ..schema import contiguous
from . import ops
from .contract import ScoresInputs, TeacherInputs, TeacherOutputs, TopkInputs, compute_dtype

_FLOAT_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


def indexer_scores(
    q: Tensor, weights: Tensor, keys: Tensor, indices: Optional[Tensor] = None, *, ratio: int, doc_ids: Optional[Tensor] = None
) -> Tensor:
    """Lightning-indexer scores ``I[t, s] = sum_h weights[t, h] * relu(q[t, h] . keys[s])``, differentiable.

    Args:
        q: ``[B, S, H, D]`` indexer queries (roped), bf16 / fp32 / fp64.
        weights: ``[B, S, H]`` per-head weights with every scale folded in, in the compute dtype (fp32 for
            bf16 / fp32 q, fp64 for fp64 q).
        keys: ``[B, P, D]`` the indexer's compressed keys, q's dtype.
        indices: ``[B, S, K]`` int32 entries to score per query, or None for every entry ``0 .. P-1``.
        ratio: tokens per entry; entry s is visible to query t iff ``s < (t + 1) // ratio``.
        doc_ids: ``[B, S]`` integer document labels of packed sequences (custom_ops/documents.py), or
            None; with them entry s is visible to t only if also ``s * ratio >= doc_start(t)``.

    Returns:
        ``[B, S, K]`` (or ``[B, S, P]``) in the compute dtype; -inf where the entry is not visible or the
        index is ignored (negative, ``>= P`` or not visible). Gradients flow to q, weights and keys.
    """
    _check_indexer_inputs(q, weights, keys)
    _check_indices(indices, q)
    check_int("ratio", ratio)
    check_doc_ids(doc_ids, q)
    return ops.indexer_scores_op(*contiguous(ScoresInputs(q, weights, keys, indices, ratio, doc_ids)))


def indexer_topk(q: Tensor, weights: Tensor, keys: Tensor, *, k: int, ratio: int, doc_ids: Optional[Tensor] = None) -> Tensor:
    """The k visible entries of highest indexer score per query (scoring fused with the selection).

    Arguments as :func:`indexer_scores`. Returns ``[B, S, k]`` int32 entry ids sorted by descending
    score, -1 in the slots beyond the number of entries visible to the query. No gradient.
    """
    _check_indexer_inputs(q, weights, keys)
    check_int("k", k)
    check_int("ratio", ratio)
    check_doc_ids(doc_ids, q)
    return ops.indexer_topk_op(*contiguous(TopkInputs(q.detach(), weights.detach(), keys.detach(), k, ratio, doc_ids)))


def indexer_teacher(
    q: Tensor,
    pool: Tensor,
    lse: Tensor,
    sink: Tensor,
    indices: Optional[Tensor] = None,
    *,
    scale: float,
    ratio: int,
    doc_ids: Optional[Tensor] = None,
) -> TeacherOutputs:
    """The indexer's KL target: the main attention's head-summed probability mass per compressed entry.

    Args:
        q: ``[B, S, H, D]`` the attention op's queries (normed, roped), bf16 / fp32 / fp64.
        pool: ``[B, P, D]`` the attention op's compressed entries, q's dtype.
        lse: ``[B, S, H]`` the attention op's lse (without the sink), in the compute dtype.
        sink: ``[H]`` the attention's sink logits, fp32 (fp64 allowed with fp64 q).
        indices: ``[B, S, K]`` int32 entries, or None for every entry ``0 .. P-1``.
        scale: the attention's logit scale; ratio, doc_ids: as :func:`indexer_scores`.

    Returns:
        ``log_mass [B, S, K or P]``: ``log sum_h p[h, t, s]`` with ``p = exp(scale * q . pool[s] - L)`` and
        ``L = logaddexp(lse, sink)`` (the attention's probabilities, sink in the denominator), -inf where
        not visible; ``log_visible [B, S]``: the log of that mass summed over every visible entry. Both in
        the compute dtype, without gradient (a target).
    """
    batch, seq_len, heads, dim = _check_queries(q)
    check_tensor("pool", pool)
    if pool.dim() != 3 or pool.shape[0] != batch or pool.shape[2] != dim:
        raise ValueError(f"pool must be [B, P, D] with B={batch}, D={dim}, got shape {tuple(pool.shape)}")
    check_same("pool", pool, q.dtype, q.device)
    check_tensor("lse", lse)
    if tuple(lse.shape) != (batch, seq_len, heads):
        raise ValueError(f"lse must be [B, S, H] = {(batch, seq_len, heads)}, got shape {tuple(lse.shape)}")
    _check_compute_dtype("lse", lse, q)
    check_sink(sink, heads, q)
    _check_indices(indices, q)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite Python float, got {scale!r}")
    check_int("ratio", ratio)
    check_doc_ids(doc_ids, q)
    inputs = TeacherInputs(q.detach(), pool.detach(), lse.detach(), sink.detach(), indices, float(scale), ratio, doc_ids)
    return TeacherOutputs(*ops.indexer_teacher_op(*contiguous(inputs)))


def _check_queries(q: Tensor) -> tuple[int, int, int, int]:
    check_tensor("q", q)
    if q.dim() != 4 or min(q.shape) < 1:
        raise ValueError(f"q must be [B, S, H, D] with every size >= 1, got shape {tuple(q.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be bfloat16, float32 or float64, got {q.dtype}")
    return tuple(q.shape)


def _check_compute_dtype(name: str, value: Tensor, q: Tensor) -> None:
    dtype = compute_dtype(q.dtype)
    if value.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} (the compute dtype of q's {q.dtype}), got {value.dtype}")
    check_device(name, value, q.device)


def _check_indexer_inputs(q: Tensor, weights: Tensor, keys: Tensor) -> None:
    batch, seq_len, heads, dim = _check_queries(q)
    check_tensor("weights", weights)
    if tuple(weights.shape) != (batch, seq_len, heads):
        raise ValueError(f"weights must be [B, S, H] = {(batch, seq_len, heads)}, got shape {tuple(weights.shape)}")
    _check_compute_dtype("weights", weights, q)
    check_tensor("keys", keys)
    if keys.dim() != 3 or keys.shape[0] != batch or keys.shape[2] != dim:
        raise ValueError(f"keys must be [B, P, D] with B={batch}, D={dim}, got shape {tuple(keys.shape)}")
    check_same("keys", keys, q.dtype, q.device)


def _check_indices(indices: Optional[Tensor], q: Tensor) -> None:
    if indices is None:
        return
    check_tensor("indices", indices)
    if indices.dim() != 3 or tuple(indices.shape[:2]) != tuple(q.shape[:2]):
        raise ValueError(f"indices must be [B, S, K] with B, S = {tuple(q.shape[:2])}, got shape {tuple(indices.shape)}")
    if indices.dtype != torch.int32:
        raise TypeError(f"indices must be int32, got {indices.dtype}")
    check_device("indices", indices, q.device)
