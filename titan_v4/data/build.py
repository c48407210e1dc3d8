"""TrainSpec builders: ``build_tokenizer_fn=build_v4_tokenizer``, ``build_dataloader_fn=build_v4_dataloader``.

Both read the ``[v4]`` section of the job config (``titan_v4/config.py``):

* ``dataset = "synthetic"`` (default): the corpus and tokenizer shipped in ``assets/``; no download,
  no HF ``datasets``.
* ``dataset = "local"``: ``.jsonl``/``.json``, ``.txt`` or ``.parquet`` files (one file or a directory)
  read with HF ``datasets``; ``dataset = "hub"``: a Hugging Face Hub dataset, streamed. Both go
  through torchtitan's ``HuggingFaceTextDataset`` (same packing, DP sharding and checkpointable
  state), registered under a titan_v4 name in torchtitan's ``DATASETS`` table, its extension point.
"""

import operator
import os
from dataclasses import asdict
from functools import partial

from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger

from titan_v4.config import V4, v4_settings
from titan_v4.data.dataset import ASSETS_DIR, PackedDocumentDataset, load_synthetic_documents
from titan_v4.data.documents import DocumentLayout, check_documents_begin_with_bos
from titan_v4.data.local_files import LOCAL_FORMATS, DataError, load_local_files, locate_row  # noqa: F401


def build_v4_tokenizer(job_config: JobConfig) -> HuggingFaceTokenizer:
    """The tokenizer named by ``v4.tokenizer_path``; else the one in ``model.hf_assets_path`` when
    that folder holds a ``tokenizer.json`` (torchtitan's convention); else the shipped 2048-token BPE.

    ``v4.tokenizer_path`` is a ``tokenizer.json`` file or a directory holding one; a
    ``tokenizer_config.json`` beside it must name ``bos_token`` and ``eos_token``, which the
    dataset puts around every document.
    """
    path, setting = v4_settings(job_config).tokenizer_path, "v4.tokenizer_path"
    if not path:
        assets = job_config.model.hf_assets_path
        if assets and os.path.isfile(os.path.join(assets, "tokenizer.json")):
            path, setting = assets, "model.hf_assets_path"
        else:
            path, setting = ASSETS_DIR, "the bundled tokenizer"
    if os.path.isdir(path):
        directory = path
    elif os.path.isfile(path):
        if os.path.basename(path) != "tokenizer.json":
            raise ValueError(
                f"{setting}={path!r} is invalid: allowed values are a file named tokenizer.json "
                "or a directory that holds one"
            )
        directory = os.path.dirname(path) or "."
    else:
        raise FileNotFoundError(f"{setting}={path!r} does not exist")
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise FileNotFoundError(f"{setting}={path!r}: no tokenizer.json in {directory!r}")

    try:
        tokenizer = HuggingFaceTokenizer(directory)
    except Exception as e:
        raise ValueError(
            f"{setting}={path!r}: {os.path.join(directory, 'tokenizer.json')} (or tokenizer_config.json beside it) "
            f"is not a valid Hugging Face tokenizers file: {type(e).__name__}: {e}"
        ) from e
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise ValueError(
            f"{setting}={path!r}: the tokenizer has no BOS/EOS token (bos_id={tokenizer.bos_id}, "
            f"eos_id={tokenizer.eos_id}); put a tokenizer_config.json naming bos_token and eos_token "
            "next to tokenizer.json"
        )
    logger.info(
        f"Tokenizer {os.path.join(directory, 'tokenizer.json')} ({setting}): {tokenizer.get_vocab_size()} tokens, "
        f"bos={tokenizer.bos_id} eos={tokenizer.eos_id}"
    )
    return tokenizer


def build_v4_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: HuggingFaceTokenizer,
    job_config: JobConfig,
    infinite: bool = True,
) -> ParallelAwareDataloader:
    """The training dataloader: batches of ``({"input": LongTensor[B, S]}, labels LongTensor[B, S])``,
    plus ``"doc_ids"`` int32 ``[B, S]`` with ``v4.document_masking`` (titan_v4/data/documents.py).

    ``B = training.local_batch_size``, ``S = training.seq_len``; rank ``dp_rank`` of
    ``dp_world_size`` reads its own shard; the loader's state goes into torchtitan's checkpoints.
    """
    settings = v4_settings(job_config)
    if job_config.training.dataset_path:
        raise ValueError(
            f"training.dataset_path={job_config.training.dataset_path!r} is not used by titan_v4: "
            "set v4.dataset and v4.dataset_path instead"
        )
    seq_len = job_config.training.seq_len
    if settings.dataset == "synthetic":
        documents = load_synthetic_documents()
        dataset: IterableDataset = PackedDocumentDataset(
            documents, tokenizer, seq_len, dp_rank=dp_rank, dp_world_size=dp_world_size, infinite=infinite
        )
        logger.info(
            f"Data: synthetic corpus {len(documents)} documents, data-parallel rank {dp_rank} of {dp_world_size}"
        )
    else:
        dataset = _hf_text_dataset(settings, tokenizer, seq_len, dp_rank, dp_world_size, infinite)
    if settings.document_masking:
        check_documents_begin_with_bos(tokenizer)
        dataset = DocumentLayout(dataset, tokenizer.bos_id)
        logger.info(f"Data: document masking on (documents begin at BOS id {tokenizer.bos_id})")

    return ParallelAwareDataloader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        **asdict(job_config.training.dataloader),
        batch_size=job_config.training.local_batch_size,
    )


def _load_hub(name: str, split: str, path: str):
    """Streamed HF Hub dataset: nothing is downloaded up front; resumable via its state_dict."""
    from datasets import load_dataset

    return load_dataset(path, name=name or None, split=split, streaming=True)


def _hf_text_dataset(
    settings: V4, tokenizer: HuggingFaceTokenizer, seq_len: int, dp_rank: int, dp_world_size: int, infinite: bool
) -> IterableDataset:
    """torchtitan's HuggingFaceTextDataset (as V4TextDataset) over a local or Hub dataset."""
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS

    from titan_v4.data.hf_text import V4TextDataset, contiguous_shard_start

    column = settings.text_column
    if settings.dataset == "local":
        ds, builder, files, column = load_local_files(settings.dataset_path, column)
        loader = lambda _path: ds  # noqa: E731  (already loaded and checked)
        shard_start = contiguous_shard_start(len(ds), dp_rank, dp_world_size)
        if contiguous_shard_start(len(ds), dp_rank + 1, dp_world_size) == shard_start:
            raise DataError(
                f"data-parallel rank {dp_rank} of {dp_world_size} gets no documents: {settings.dataset_path} has "
                f"only {len(ds)} rows; use fewer data-parallel ranks or more data"
            )

        def describe_row(row: int) -> str:
            file, file_row = locate_row(shard_start + row, builder, files)
            return f"data file {file}, row {file_row + 1}, column {column!r}"

        logger.info(
            f"Data: {len(files)} local {builder} file(s) under {settings.dataset_path}, {len(ds)} rows, column {column!r}"
        )
    else:
        hub_loader = partial(_load_hub, settings.dataset_subset, settings.dataset_split)

        def loader(path: str):
            ds = hub_loader(path)
            columns = ds.column_names  # None for some streamed datasets: nothing to check then
            if columns is not None and column not in columns:
                raise ValueError(f"v4.text_column={column!r} is invalid: allowed values are the columns {columns}")
            return ds

        def describe_row(row: int) -> str:
            return (
                f"Hub dataset {settings.dataset_path} (split {settings.dataset_split}), record {row + 1} of "
                f"data-parallel rank {dp_rank}'s stream, column {column!r}"
            )

        logger.info(
            f"Data: Hub dataset {settings.dataset_path} subset={settings.dataset_subset or None} "
            f"split={settings.dataset_split} (streamed), column {column!r}"
        )

    name = f"titan_v4_{settings.dataset}"
    DATASETS[name] = DatasetConfig(path=settings.dataset_path, loader=loader, sample_processor=operator.itemgetter(column))
    return V4TextDataset(
        dataset_name=name,
        dataset_path=None,
        tokenizer=tokenizer,
        seq_len=seq_len,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        infinite=infinite,
        describe_row=describe_row,
    )
