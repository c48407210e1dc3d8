"""Eager reference of the indexer ops: their specification, and the implementation on the CPU.

Runs on any device and dtype (fp64 as an oracle; bf16 / fp32 computed in fp32). Queries are processed
in chunks so that the largest temporary, the per-head products ``[B, C, H, n]`` of a chunk of C queries
with its n listed (or all) entries, stays under ``_CHUNK_ELEMENTS`` elements: the eager indexer of a
Flash layer would otherwise build ``[S, 64, P]`` fp32 (1 GiB at S = 4096).

Rules (b = batch, t = query, s = entry, h = head; see contract.py):

* entry s is visible to t iff ``s < (t + 1) // ratio`` and, with doc_ids, ``s >= first[t]``, the first
  entry inside t's document (custom_ops/documents.py); listed indices that are negative, ``>= P`` or
  not visible are ignored (-inf score / mass, zero gradient);
* ``indexer_scores``: ``I[t, s] = sum_h weights[t, h] * relu(q[t, h] . keys[s])``;
* ``indexer_topk``: the k visible entries of highest I per query, sorted by descending score, -1 in
  the slots beyond the number of visible entries; ties are broken arbitrarily;
* ``indexer_teacher``: with ``L[t, h] = logaddexp(lse[t, h], sink[h])`` (the attention's full softmax
  denominator, sink included) and ``p[h, t, s] = exp(scale * q[t, h] . pool[s] - L[t, h])`` (the
  probability the attention gives, or would give, entry s), ``log_mass[t, s] = log sum_h p[h, t, s]``
  and ``log_visible[t] = log sum_{s visible} sum_h p[h, t, s]``.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..documents import first_entries
from .contract import ScoresGrads, ScoresInputs, TeacherInputs, TeacherOutputs, TopkInputs, compute_dtype, n_listed

# 2**26 fp32 elements = 256 MiB for the largest per-chunk temporary.
_CHUNK_ELEMENTS = 2**26


def query_chunk(batch: int, seq_len: int, heads: int, n_entries: int) -> int:
    """Queries per chunk so that ``[B, C, H, n]`` stays under ``_CHUNK_ELEMENTS`` elements."""
    return max(1, min(seq_len, _CHUNK_ELEMENTS // max(1, batch * heads * n_entries)))


def n_visible(t0: int, t1: int, ratio: int, device: torch.device) -> Tensor:
    """``[C]`` int64: entries ``s < n_visible[c]`` are visible to query ``t0 + c``."""
    return (torch.arange(t0, t1, device=device) + 1) // ratio


def with_zero_row(table: Tensor) -> Tensor:
    """``[B, P, D]`` -> ``[B, P + 1, D]``: the extra zero row is what ignored index slots read."""
    return F.pad(table, (0, 0, 0, 1))


def _listed_rows(padded: Tensor, indices: Optional[Tensor], first: Tensor, t0: int, t1: int, ratio: int):
    """Rows listed for queries ``[t0, t1)`` and their visibility, from ``padded = with_zero_row(table)``.

    ``indices`` is the chunk's ``[B, C, K]`` slice or None, ``first`` the chunk's ``[B, C]`` first
    entries of the queries' documents. Returns ``(rows, visible, flat)``: without
    indices ``rows`` is the table ``[B, P, D]`` (shared by the chunk), ``visible`` ``[B, C, P]`` and
    ``flat`` None; with indices ``rows`` is ``[B, C, K, D]`` (gathered per query; ignored slots read the
    zero row), ``visible`` ``[B, C, K]`` and ``flat`` ``[B, C, K]`` the row numbers into
    ``padded.reshape(B * (P + 1), D)``.
    """
    batch, n_rows, dim = padded.shape
    n_entries = n_rows - 1
    limit = n_visible(t0, t1, ratio, padded.device)  # [C]
    first = first[:, :, None]  # [B, C, 1]
    if indices is None:
        entries = torch.arange(n_entries, device=padded.device)[None, None, :]
        visible = (entries < limit[None, :, None]) & (entries >= first)
        return padded[:, :n_entries], visible, None
    idx = indices.long()  # [B, C, K]
    visible = (idx >= first) & (idx < n_entries) & (idx < limit[None, :, None])
    flat = torch.where(visible, idx, n_entries) + torch.arange(batch, device=padded.device)[:, None, None] * n_rows
    return padded.reshape(batch * n_rows, dim)[flat], visible, flat


def _chunk(indices: Optional[Tensor], t0: int, t1: int) -> Optional[Tensor]:
    return None if indices is None else indices[:, t0:t1]


def _scores(q: Tensor, weights: Tensor, keys: Tensor, indices: Optional[Tensor], first: Tensor, t0: int, ratio: int) -> Tensor:
    """Scores ``[B, C, n]`` (-inf where not visible) of the C queries starting at position t0; keys
    (``with_zero_row``) and the result in the compute dtype; ``first`` the chunk's ``[B, C]``."""
    cdt = keys.dtype
    rows, visible, _ = _listed_rows(keys, indices, first, t0, t0 + q.shape[1], ratio)  # keys: with_zero_row
    relu = _dots(q.to(cdt), rows).relu()  # [B, C, H, n]
    return torch.einsum("bchn,bch->bcn", relu, weights.to(cdt)).masked_fill(~visible, float("-inf"))


def _dots(x: Tensor, rows: Tensor) -> Tensor:
    """``x . row`` per head: x ``[B, C, H, D]`` with rows ``[B, P, D]`` or ``[B, C, K, D]`` -> ``[B, C, H, n]``."""
    if rows.dim() == 3:
        return torch.einsum("bchd,bpd->bchp", x, rows)
    return torch.einsum("bchd,bckd->bchk", x, rows)


def indexer_scores_fwd(inputs: ScoresInputs, chunk: Optional[int] = None) -> Tensor:
    """Scores ``[B, S, K or P]`` in the compute dtype, -inf where not visible (see the module docstring)."""
    q, weights, keys, indices, ratio, doc_ids = inputs
    batch, seq_len, heads, _ = q.shape
    cdt = compute_dtype(q.dtype)
    n = n_listed(indices, keys.shape[1])
    chunk = chunk or query_chunk(batch, seq_len, heads, n)
    keys_c = with_zero_row(keys.to(cdt))
    first = first_entries(doc_ids, batch, seq_len, ratio, q.device)
    out = torch.empty(batch, seq_len, n, dtype=cdt, device=q.device)
    for t0 in range(0, seq_len, chunk):
        t1 = min(seq_len, t0 + chunk)
        chunk_first = first[:, t0:t1]
        out[:, t0:t1] = _scores(q[:, t0:t1], weights[:, t0:t1], keys_c, _chunk(indices, t0, t1), chunk_first, t0, ratio)
    return out


def indexer_scores_bwd(inputs: ScoresInputs, grad: Tensor, chunk: Optional[int] = None) -> ScoresGrads:
    """Gradients of ``sum(grad * scores)``; ``grad`` at entries that are not visible is ignored.

    With ``x = q[t, h] . keys[s]`` and ``g = grad[t, s]``: ``dweights[t, h] = sum_s g * relu(x)``,
    ``dq[t, h] = sum_s g * w[t, h] * 1[x > 0] * keys[s]``, ``dkeys[s] = sum_{t, h} g * w[t, h] * 1[x > 0] * q[t, h]``.
    """
    q, weights, keys, indices, ratio, doc_ids = inputs
    batch, seq_len, heads, dim = q.shape
    cdt = compute_dtype(q.dtype)
    n = n_listed(indices, keys.shape[1])
    chunk = chunk or query_chunk(batch, seq_len, heads, n)
    keys_c = with_zero_row(keys.to(cdt))
    first = first_entries(doc_ids, batch, seq_len, ratio, q.device)
    dq = torch.empty_like(q)
    dweights = torch.empty_like(weights)
    dkeys = torch.zeros_like(keys_c)  # [B, P + 1, D]: ignored slots add 0 to the zero row
    for t0 in range(0, seq_len, chunk):
        t1 = min(seq_len, t0 + chunk)
        rows, visible, flat = _listed_rows(keys_c, _chunk(indices, t0, t1), first[:, t0:t1], t0, t1, ratio)
        qc, wc = q[:, t0:t1].to(cdt), weights[:, t0:t1].to(cdt)
        g = grad[:, t0:t1].to(cdt).masked_fill(~visible, 0.0)  # [B, C, n]
        x = _dots(qc, rows)  # [B, C, H, n]
        dweights[:, t0:t1] = torch.einsum("bchn,bcn->bch", x.relu(), g).to(weights.dtype)
        coef = (x > 0).to(cdt) * wc[..., None] * g[:, :, None, :]  # [B, C, H, n]
        if flat is None:
            dq[:, t0:t1] = torch.einsum("bchp,bpd->bchd", coef, rows).to(q.dtype)
            dkeys[:, :-1] += torch.einsum("bchp,bchd->bpd", coef, qc)
        else:
            dq[:, t0:t1] = torch.einsum("bchk,bckd->bchd", coef, rows).to(q.dtype)
            drows = torch.einsum("bchk,bchd->bckd", coef, qc)  # [B, C, K, D]; 0 for ignored slots
            dkeys.view(-1, dim).index_add_(0, flat.reshape(-1), drows.reshape(-1, dim))
    # A fresh contiguous tensor, not a view of the padded buffer.
    return ScoresGrads(dq, dweights, torch.empty_like(keys).copy_(dkeys[:, :-1]))


def select_topk(scores: Tensor, k: int) -> Tensor:
    """``[..., P]`` scores (-inf = not visible) -> ``[..., k]`` int32 indices of the k highest, sorted by
    descending score; -1 where fewer than k entries are visible (also when k > P)."""
    n_entries = scores.shape[-1]
    kept = min(k, n_entries)
    values, picks = scores.topk(kept, dim=-1)
    picks = torch.where(values == float("-inf"), -1, picks).to(torch.int32)
    if kept < k:
        picks = torch.cat([picks, picks.new_full((*picks.shape[:-1], k - kept), -1)], dim=-1)
    return picks


def indexer_topk(inputs: TopkInputs, chunk: Optional[int] = None) -> Tensor:
    """Top-k entry ids ``[B, S, k]`` int32 (see the module docstring); scores one query chunk at a time."""
    q, weights, keys, k, ratio, doc_ids = inputs
    batch, seq_len, heads, _ = q.shape
    chunk = chunk or query_chunk(batch, seq_len, heads, keys.shape[1])
    keys_c = with_zero_row(keys.to(compute_dtype(q.dtype)))
    first = first_entries(doc_ids, batch, seq_len, ratio, q.device)
    picks = []
    for t0 in range(0, seq_len, chunk):
        t1 = min(seq_len, t0 + chunk)
        scores = _scores(q[:, t0:t1], weights[:, t0:t1], keys_c, None, first[:, t0:t1], t0, ratio)
        picks.append(select_topk(scores, k))
    return torch.cat(picks, dim=1)


def indexer_teacher(inputs: TeacherInputs, chunk: Optional[int] = None) -> TeacherOutputs:
    """``log_mass [B, S, K or P]`` and ``log_visible [B, S]`` in the compute dtype (module docstring)."""
    q, pool, lse, sink, indices, scale, ratio, doc_ids = inputs
    batch, seq_len, heads, _ = q.shape
    n_entries = pool.shape[1]
    cdt = compute_dtype(q.dtype)
    n = n_listed(indices, n_entries)
    chunk = chunk or query_chunk(batch, seq_len, heads, max(n, n_entries))
    pool_c = with_zero_row(pool.to(cdt))
    denom = torch.logaddexp(lse.to(cdt), sink.to(cdt))  # [B, S, H]
    first = first_entries(doc_ids, batch, seq_len, ratio, q.device)
    log_mass = torch.empty(batch, seq_len, n, dtype=cdt, device=q.device)
    log_visible = torch.empty(batch, seq_len, dtype=cdt, device=q.device)
    for t0 in range(0, seq_len, chunk):
        t1 = min(seq_len, t0 + chunk)
        qc, denom_c = q[:, t0:t1].to(cdt), denom[:, t0:t1, :, None]

        def mass(rows: Tensor, visible: Tensor) -> Tensor:  # log sum_h p, [B, C, n]
            logp = scale * _dots(qc, rows) - denom_c  # [B, C, H, n]
            return torch.logsumexp(logp, dim=2).masked_fill(~visible, float("-inf"))

        chunk_first = first[:, t0:t1]
        every = mass(*_listed_rows(pool_c, None, chunk_first, t0, t1, ratio)[:2])  # [B, C, P]
        log_visible[:, t0:t1] = torch.logsumexp(every, dim=-1)
        if indices is None:
            log_mass[:, t0:t1] = every
        else:
            listed = _listed_rows(pool_c, _chunk(indices, t0, t1), chunk_first, t0, t1, ratio)
            log_mass[:, t0:t1] = mass(*listed[:2])
    return TeacherOutputs(log_mass, log_visible)
