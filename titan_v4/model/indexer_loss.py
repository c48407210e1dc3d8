"""The lightning indexer's KL loss and its recall (docs/deepseek_v4.md, "How the lightning indexer
is trained").

For each query t with at least one visible compressed entry, the target is the main attention's
probability mass on the compared entries, summed over heads and L1-normalised,
``p[t] = normalize(sum_h A[h, t, :])`` (``custom_ops.indexer_teacher`` returns its log), and the student
is the softmax of the indexer's scores over the same entries; the loss is ``KL(p[t] || softmax(I[t]))``
averaged over every query, a query without a visible entry counting 0. Averaging over every query (not
only those with an entry) keeps the loss independent of how a batch is split into microbatches: with
packed documents the number of queries that see an entry differs between sequences. The compared
entries are the selected top-k in the sparse phase and every visible entry in the dense phases.

The recall is the share of the teacher's mass over EVERY visible entry that lies on the indexer's
top-k: how much of what the attention wants the selection keeps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class IndexerLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable w.r.t. the student scores
    recall: torch.Tensor  # scalar, detached


def indexer_kl(
    student: torch.Tensor, log_mass: torch.Tensor, log_visible: torch.Tensor, *, topk: int, listed_are_topk: bool
) -> IndexerLoss:
    """The KL loss and recall of one layer's indexer.

    Args:
        student: ``[B, S, n]`` indexer scores of the compared entries (-inf where not visible), fp32 / fp64.
        log_mass: ``[B, S, n]`` the teacher's log head-summed attention mass of the same entries (-inf
            exactly where not visible); log_visible ``[B, S]``: its log-sum over every visible entry.
        topk: the indexer's top-k (for the recall of the dense phases).
        listed_are_topk: True when the compared entries are the indexer's selection (sparse phase);
            False when they are every entry (dense phases: the recall takes the student's top-k).

    Returns:
        loss (mean over every query, 0 for one without a visible entry) and recall (mean over the
        queries with a visible entry, detached; 0 if none).
    """
    neg_inf = float("-inf")
    valid = torch.isfinite(log_mass)  # [B, S, n]
    has_entry = valid.any(dim=-1)  # [B, S]
    # Rows without an entry are replaced by zeros so that their (unused) softmaxes stay finite in both
    # directions; the masks below drop them.
    rows = has_entry[..., None]
    log_p = torch.where(rows, log_mass, 0.0)
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # -inf where not visible
    log_q = torch.log_softmax(torch.where(rows, torch.where(valid, student, neg_inf), 0.0), dim=-1)
    p = log_p.exp()
    kl = (p * torch.where(valid, log_p - log_q, 0.0)).sum(dim=-1)  # [B, S]
    loss = torch.where(has_entry, kl, 0.0).mean()
    n_queries = has_entry.sum().clamp_min(1)

    with torch.no_grad():
        if listed_are_topk:
            share = torch.exp(torch.logsumexp(torch.where(rows, log_mass, 0.0), dim=-1) - log_visible)
        else:
            picks = student.topk(min(topk, student.shape[-1]), dim=-1).indices
            share = p.gather(-1, picks).sum(dim=-1)
        recall = torch.where(has_entry, share, 0.0).sum() / n_queries
    return IndexerLoss(loss, recall)
