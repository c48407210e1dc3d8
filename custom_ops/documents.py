"""Packed documents, shared by every op that takes ``doc_ids``.

``doc_ids[b]`` labels the documents packed into row b; a document is a maximal run of equal
consecutive ids, and ``doc_start(b, t)`` is the first position of the run that contains t. Without
doc_ids the whole row is one document (``doc_start = 0``). A compressed entry w (source tokens
``[w * ratio, (w + 1) * ratio)``) lies in t's document iff ``w * ratio >= doc_start(b, t)``, i.e.
``w >= ceil(doc_start(b, t) / ratio)`` (:func:`first_entries`).
"""

from typing import Optional

import torch
from torch import Tensor


def doc_starts(doc_ids: Optional[Tensor], seq_len: int, device: torch.device) -> Tensor:
    """First position of the document that contains each token.

    Args:
        doc_ids: ``[B, S]`` integer or None.
    Returns:
        ``[B, S]`` int64 (``[1, S]`` zeros when doc_ids is None, broadcasting over the batch).
    """
    if doc_ids is None:
        return torch.zeros(1, seq_len, dtype=torch.long, device=device)
    pos = torch.arange(seq_len, device=device)
    new_doc = torch.ones(doc_ids.shape, dtype=torch.bool, device=device)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # The start of t's run is the last position <= t where a new run began.
    return torch.where(new_doc, pos, 0).cummax(dim=1).values


def first_entries(doc_ids: Optional[Tensor], batch: int, seq_len: int, ratio: int, device: torch.device) -> Tensor:
    """``[B, S]`` int32: the first compressed entry inside each query's document, ``ceil(doc_start / ratio)``
    (all 0 without doc_ids). Contiguous, for the kernels."""
    starts = doc_starts(doc_ids, seq_len, device)
    return ((starts + ratio - 1) // ratio).expand(batch, seq_len).to(torch.int32).contiguous()
