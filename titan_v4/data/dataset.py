"""The packed, resumable token stream over an in-memory list of documents (no HF ``datasets``).

Used for the synthetic corpus shipped in ``assets/corpus.txt``. Real data goes through torchtitan's
``HuggingFaceTextDataset`` instead (see ``build.py``); both produce the same samples.
"""

import os
from collections.abc import Sequence
from typing import Any, Iterator, Protocol

import torch
from torch.utils.data import IterableDataset

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
SYNTHETIC_CORPUS = os.path.join(ASSETS_DIR, "corpus.txt")


class _Tokenizer(Protocol):
    """What the dataset needs from a tokenizer (torchtitan's HuggingFaceTokenizer has it)."""

    def encode(self, text: str, *, add_bos: bool, add_eos: bool) -> list[int]: ...


def load_synthetic_documents(path: str = SYNTHETIC_CORPUS) -> list[str]:
    """The shipped corpus: one document per non-empty line."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


class PackedDocumentDataset(IterableDataset):
    """Tokenize documents, join them as ``BOS doc EOS BOS doc EOS ...`` and cut the stream into
    windows of ``seq_len + 1`` tokens.

    Yields ``({"input": x[:-1]}, x[1:])`` with ``x`` a LongTensor of ``seq_len + 1`` ids, so the
    labels are the inputs shifted by one. Windows do not overlap (the last label of one window is
    not the first input of the next), exactly like torchtitan's ``HuggingFaceTextDataset``.

    Blank documents (empty or whitespace only) are skipped.

    Data parallelism: rank ``r`` of ``w`` reads documents ``r, r + w, r + 2w, ...``. With
    ``infinite=True`` it starts over from its first document when they run out (same order every
    epoch), otherwise it stops; the token remainder carries over between epochs.

    Checkpointing: ``state_dict()`` / ``load_state_dict()`` hold the position (next document,
    epoch, the not-yet-emitted tokens). torchtitan's ``ParallelAwareDataloader``
    (``StatefulDataLoader``) saves them with the training checkpoint, so a resumed run continues
    with exactly the batch that would have come next.
    """

    def __init__(
        self,
        documents: Sequence[str],
        tokenizer: _Tokenizer,
        seq_len: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        infinite: bool = True,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} is invalid: must be >= 1")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank={dp_rank} is invalid for dp_world_size={dp_world_size}")
        # Blank documents (empty or whitespace only) would become BOS EOS samples: skip them.
        self._documents = [d for d in documents[dp_rank::dp_world_size] if d.strip()]
        if not self._documents:
            raise ValueError(
                f"data-parallel rank {dp_rank} of {dp_world_size} gets no documents (blank ones do not count): the corpus has "
                f"only {len(documents)}; use fewer data-parallel ranks or a larger corpus"
            )
        self._tokenizer = tokenizer
        self.seq_len = seq_len
        self.infinite = infinite
        # Position in this rank's shard; everything needed to resume.
        self._next_document = 0
        self._epoch = 0
        self._buffer: list[int] = []

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        window = self.seq_len + 1
        while True:
            # Drain full windows before reading the next document: the buffer stays under one
            # window plus one document, and a restored buffer is emitted before anything new.
            while len(self._buffer) >= window:
                x = torch.tensor(self._buffer[:window], dtype=torch.long)
                del self._buffer[:window]
                yield {"input": x[:-1]}, x[1:]
            if self._next_document == len(self._documents):
                if not self.infinite:
                    return
                self._next_document = 0
                self._epoch += 1
            text = self._documents[self._next_document]
            self._buffer.extend(self._tokenizer.encode(text, add_bos=True, add_eos=True))
            self._next_document += 1

    @property
    def epoch(self) -> int:
        """How many times this rank has started over from its first document."""
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        return {"next_document": self._next_document, "epoch": self._epoch, "buffer": list(self._buffer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        next_document = state_dict["next_document"]
        if not 0 <= next_document <= len(self._documents):
            raise ValueError(
                f"dataset checkpoint points at document {next_document}, but this rank's shard has "
                f"{len(self._documents)}: the corpus or the data-parallel degree changed since it was saved"
            )
        self._next_document = next_document
        self._epoch = state_dict["epoch"]
        self._buffer = list(state_dict["buffer"])
