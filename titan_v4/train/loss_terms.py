"""The step's loss terms for the training log: one line after torchtitan's step line,

    step:  5  lm_loss: 2.3102  mtp_loss: 2.4410  balance_loss: 1.0213  indexer_loss: 0.4127  indexer_recall: 0.8316

``lm_loss`` and ``mtp_loss`` are the next-token and MTP cross-entropies per token (the logged ``loss`` is
``lm_loss + mtp_loss_weight * mtp_loss``), recorded by the loss function (titan_v4/model/loss.py);
``balance_loss`` (the sequence-wise balance loss, mean over learned-routing MoE layers), ``indexer_loss``
(the indexer's KL, mean over CSA layers) and ``indexer_recall`` (the share of the attention's mass on
compressed entries that the indexer's top-k keeps, mean over CSA layers) are recorded by the layers
(titan_v4/model/aux_loss.py). Each is averaged over the steps since the last log line and over every
rank. A term that did not run (no MTP, frozen indexer, balance weight 0) is left out.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from titan_v4.model.aux_loss import read_aux_values

#: Every term, in log order. Every rank reduces all of them (a pipeline stage may hold none of some).
TERMS = ("lm_loss", "mtp_loss", "balance_loss", "indexer_loss", "indexer_recall")


@torch.no_grad()
def read_loss_terms(model_parts: list[nn.Module], loss_fn, device: torch.device) -> dict[str, float]:
    """``{term: mean}`` over the steps since the last call and over every rank; resets the records.

    Collective: every rank must call it at the same step (it all-reduces once when distributed).
    """
    totals = read_aux_values(model_parts)
    if hasattr(loss_fn, "read_values"):
        totals.update(loss_fn.read_values())
    sums = torch.zeros(2, len(TERMS), dtype=torch.float64, device=device)
    for i, term in enumerate(TERMS):
        if term in totals:
            total, count = totals[term]
            sums[0, i], sums[1, i] = total, count
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    return {term: (sums[0, i] / sums[1, i]).item() for i, term in enumerate(TERMS) if sums[1, i] > 0}


def format_loss_terms(step: int, terms: dict[str, float]) -> str:
    return f"step: {step:2}  " + "  ".join(f"{name}: {value:.4f}" for name, value in terms.items())
