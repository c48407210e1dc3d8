"""Local files and Hub datasets as a packed token stream: torchtitan's ``HuggingFaceTextDataset``
(same packing, data-parallel sharding and checkpointable position) with titan_v4's data rules:

* a blank document (empty or whitespace only, e.g. a blank line of a ``.txt`` file) is skipped,
  not turned into a ``BOS EOS`` sample;
* a document that is not a string (null, a number) stops the run at that record with a message
  naming the file and row (local files) or the record (Hub), instead of the tokenizer's
  ``TextInputSequence must be str``;
* a data-parallel rank whose shard holds only blank documents fails instead of looping forever
  without a sample (an empty local shard is refused by build.py before HF's split fails with an
  IndexError).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from datasets import Dataset
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset
from torchtitan.tools.logging import logger

from titan_v4.data.local_files import DataError


def contiguous_shard_start(n_rows: int, rank: int, world_size: int) -> int:
    """First row of ``rank``'s shard under HF ``split_dataset_by_node`` (``Dataset.shard(contiguous=True)``)."""
    div, mod = divmod(n_rows, world_size)
    return div * rank + min(rank, mod)


class V4TextDataset(HuggingFaceTextDataset):
    """``HuggingFaceTextDataset`` that skips blank documents and names the row of a bad one.

    ``describe_row(i)`` names the i-th record of this rank's shard (e.g. "data file X, row 7").
    """

    def __init__(self, *args, describe_row: Callable[[int], str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._describe_row = describe_row
        rank, world = kwargs.get("dp_rank", 0), kwargs.get("dp_world_size", 1)
        self._rank_text = f"data-parallel rank {rank} of {world}"

    def __iter__(self):
        window = 1 + self.seq_len
        empty_passes = 0  # the first pass may be the tail of a resumed one: fail after two
        while True:
            documents = 0
            for sample in self._get_data_iter():
                row = self._sample_idx
                self._sample_idx += 1
                text = self._text_processor(sample)
                if not isinstance(text, str):
                    raise DataError(f"{self._describe_row(row)}: the text is {text!r}; allowed values are text strings")
                if not text.strip():
                    continue  # blank line / empty document: no sample
                documents += 1
                self._token_buffer.extend(self._tokenizer.encode(text, add_bos=True, add_eos=True))
                while len(self._token_buffer) >= window:
                    x = torch.LongTensor(self._token_buffer[:window])
                    self._token_buffer = self._token_buffer[window:]
                    yield {"input": x[:-1]}, x[1:]
            if not self.infinite:
                logger.warning(f"Dataset {self.dataset_name} has run out of data")
                return
            empty_passes = empty_passes + 1 if documents == 0 else 0
            if empty_passes == 2:
                raise DataError(f"{self._rank_text} found no non-blank document in {self.dataset_name} in a full pass")
            self._sample_idx = 0
            logger.warning(f"Dataset {self.dataset_name} is being re-looped")
            if (
                not isinstance(self._data, Dataset)
                and hasattr(self._data, "set_epoch")
                and hasattr(self._data, "epoch")
            ):
                self._data.set_epoch(self._data.epoch + 1)
