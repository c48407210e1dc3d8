"""Public entry point of the sparse attention op (SWA / HCA / CSA in one contract)."""

import math
from typing import Optional

import torch
from torch import Tensor

from ..checks import check_device as _check_device
from ..checks import check_doc_ids
from ..checks import check_int as _check_int
from ..checks import check_same as _check_same
from ..checks import check_sink as _check_sink
from ..checks import check_tensor as _check_tensor
from ..schema import contiguous
from . import ops
from .contract import Inputs

_FLOAT_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


def sparse_attention(
    q: Tensor,
    kv: Tensor,
    sink: Tensor,
    pool: Optional[Tensor] = None,
    topk: Optional[Tensor] = None,
    *,
    window: int,
    scale: float,
    ratio: int = 1,
    doc_ids: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Sliding-window attention over a single shared latent KV head, plus compressed pool entries.

    One contract for V4's three attention kinds: SWA (``pool=None``), HCA (``pool`` given,
    ``topk=None``: every visible pool entry) and CSA (``pool`` and ``topk``: the selected entries).

    Args:
        q: ``[B, S, H, D]`` queries, already normed and roped. bf16, fp32 or fp64 (bf16 and fp32 are
            computed in fp32, fp64 in fp64).
        kv: ``[B, S, D]`` the single latent head, used as both key and value; q's dtype.
        sink: ``[H]`` per-head attention sink logit, fp32 (fp64 is also accepted when q is fp64, for
            fp64 gradient checks).
        pool: ``[B, P, D]`` compressed entries (q's dtype) or None. Entry w summarises source tokens
            ``[w * ratio, (w + 1) * ratio)``.
        topk: ``[B, S, K]`` int32 pool indices per query, or None. Requires ``pool``.
        window: local window length >= 1, counting the query itself.
        scale: logit scale (typically ``D ** -0.5``).
        ratio: tokens per pool entry, >= 1.
        doc_ids: ``[B, S]`` integer document labels for packed sequences, or None. A document is a
            maximal run of equal consecutive ids.

    Semantics (the reference in ``reference.py`` is the full specification):
        * query t attends to kv rows ``max(t - window + 1, doc_start(t)) .. t``;
        * pool entry w is visible to t iff ``w < (t + 1) // ratio`` and ``w * ratio >= doc_start(t)``
          (all of its source tokens are in t's document and not in its future); with ``topk`` only
          the listed visible entries count. Indices that are negative (-1 = padding), ``>= P`` or
          not visible are ignored, never an error. Valid indices of one query must be distinct (a
          repeat is counted twice);
        * ``logit = scale * q . row``; softmax over all visible logits with the sink adding
          ``exp(sink[h])`` to the denominator only; ``out = sum(p * row)``; a row with nothing
          visible gives 0.

    Returns:
        out: ``[B, S, H, D]`` in q's dtype.
        lse: ``[B, S, H]``, ``logsumexp`` of the visible logits WITHOUT the sink (-inf for a row with
        nothing visible), in the compute dtype: fp32 for bf16 / fp32 q, fp64 for fp64 q. lse carries
        no gradient (it is marked non-differentiable).

    Gradients flow to q, kv, sink and pool. Non-contiguous inputs are made contiguous (a copy), since
    the op takes contiguous tensors. Raises TypeError / ValueError naming the bad argument.
    """
    _check_tensor("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, S, H, D] (4-D), got shape {tuple(q.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be bfloat16, float32 or float64, got {q.dtype}")
    batch, seq_len, heads, dim = q.shape
    if min(q.shape) < 1:
        raise ValueError(f"q must have B, S, H, D >= 1, got shape {tuple(q.shape)}")
    device = q.device

    _check_tensor("kv", kv)
    if tuple(kv.shape) != (batch, seq_len, dim):
        raise ValueError(f"kv must be [B, S, D] = {(batch, seq_len, dim)} to match q, got shape {tuple(kv.shape)}")
    _check_same("kv", kv, q.dtype, device)

    _check_sink(sink, heads, q)

    if pool is not None:
        _check_tensor("pool", pool)
        if pool.dim() != 3 or pool.shape[0] != batch or pool.shape[2] != dim:
            raise ValueError(f"pool must be [B, P, D] with B={batch}, D={dim}, got shape {tuple(pool.shape)}")
        _check_same("pool", pool, q.dtype, device)

    if topk is not None:
        _check_tensor("topk", topk)
        if pool is None:
            raise ValueError("topk was given without pool; top-k indices select pool entries")
        if topk.dim() != 3 or topk.shape[0] != batch or topk.shape[1] != seq_len:
            raise ValueError(f"topk must be [B, S, K] with B={batch}, S={seq_len}, got shape {tuple(topk.shape)}")
        if topk.dtype != torch.int32:
            raise TypeError(f"topk must be int32, got {topk.dtype}")
        _check_device("topk", topk, device)

    check_doc_ids(doc_ids, q)

    _check_int("window", window)
    _check_int("ratio", ratio)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite Python float, got {scale!r}")

    inputs = Inputs(
        q=q, kv=kv, sink=sink, pool=pool, topk=topk, doc_ids=doc_ids, window=window, scale=float(scale), ratio=ratio
    )
    return ops.sparse_attention_op(*contiguous(inputs))

