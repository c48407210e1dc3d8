"""The document layout of packed samples (``v4.document_masking``, docs/long_context.md).

Both datasets join documents as ``BOS doc EOS BOS doc EOS ...`` and cut the stream into windows of
``seq_len + 1`` tokens, so a document begins exactly at a BOS token. :class:`DocumentLayout` wraps
such a dataset and adds to every sample

* ``doc_ids`` ``[S]`` int32: the document of each input token, counted from 0 at the window's first
  token (which may be the middle of a document); the model keeps attention inside it;
* labels with the targets that are a BOS token set to ``IGNORE_INDEX``: the next token there starts
  another document, which the model cannot (and must not) predict from this one. The loss then also
  drops the MTP targets past that boundary (titan_v4/model/loss.py).

The wrapper holds no state of its own: its checkpoint state is the wrapped dataset's, so checkpoints
written with and without document masking resume each other.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset
from torchtitan.components.loss import IGNORE_INDEX

from titan_v4.data.local_files import DataError


def document_layout(window: torch.Tensor, bos_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One window of ``seq_len + 1`` token ids -> ``({"input", "doc_ids"}, labels)``, each ``[seq_len]``."""
    starts = window == bos_id
    doc_ids = starts.cumsum(dim=0).to(torch.int32)
    labels = window[1:].masked_fill(starts[1:], IGNORE_INDEX)
    return {"input": window[:-1], "doc_ids": doc_ids[:-1]}, labels


def check_documents_begin_with_bos(tokenizer) -> None:
    """The document layout is read from BOS tokens: refuse (naming ``v4.document_masking``) a tokenizer
    whose encoding of a document does not begin with its BOS id, whose packed stream would then have
    no document boundaries."""
    encoded = tokenizer.encode("a", add_bos=True, add_eos=True)
    if encoded[:1] != [tokenizer.bos_id]:
        raise DataError(
            f"v4.document_masking=true needs every document to begin with the tokenizer's BOS token (id "
            f"{tokenizer.bos_id}), but it encodes a document as {encoded}: "
            "the packed stream has no document boundaries. Use a tokenizer that adds its BOS token, or set "
            "v4.document_masking=false"
        )


class DocumentLayout(IterableDataset):
    """A packed dataset whose samples carry their document layout (module docstring).

    ``dataset`` yields ``({"input": x[:-1]}, x[1:])`` for windows ``x`` of its token stream, every
    document beginning with ``bos_id``.
    """

    def __init__(self, dataset: IterableDataset, bos_id: int) -> None:
        self.dataset = dataset
        self.bos_id = bos_id

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for inputs, labels in self.dataset:
            yield document_layout(torch.cat((inputs["input"], labels[-1:])), self.bos_id)

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state_dict)
