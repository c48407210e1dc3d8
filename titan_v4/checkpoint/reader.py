"""The DCP storage reader torchtitan loads official- or HF-layout checkpoints through.

torchtitan (`[checkpoint] initial_load_in_hf = true`) turns the model's state dict into the HF
layout with the state-dict adapter and calls `dcp.load(hf_state_dict, storage_reader=...)`. DCP
plans, on every rank, one read per tensor slice that rank owns (a DTensor's local shard under
FSDP2 / EP, the whole tensor otherwise); this reader serves each read from the files: only the
rows that slice covers, decoded from FP8 / FP4 on the device of the destination and copied into it
in the destination's dtype. Reads go file by file in storage order, so the files stream through
once; a progress line is logged per file and a summary (time, bytes, peak host and GPU memory) at
the end.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint import StorageReader
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from torchtitan.tools.logging import logger

from titan_v4.model.args import DeepSeekV4ModelArgs

from .directory import CheckpointDirectory, check_config
from .source import Entry

GIB = 2**30


def peak_host_memory_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class CheckpointReader(StorageReader):
    """Reads the HF-layout state dict of `expected` (key -> tensor, meta is enough) from an official-
    or HF-layout directory. Construction checks the directory against the model (config.json,
    then every tensor) and raises CheckpointMismatchError before anything is read."""

    def __init__(self, path: str | os.PathLike, expected: dict[str, torch.Tensor], model_args: DeepSeekV4ModelArgs):
        super().__init__()
        self.path = Path(path)
        self.directory = CheckpointDirectory(self.path)
        if not check_config(self.path, model_args):
            logger.warning(f"checkpoint {self.path} has no config.json: checking tensor names and shapes only")
        self.entries: dict[str, Entry] = self.directory.entries(expected, model_args.n_routed_experts)
        self.load_id = str(self.path)
        logger.info(
            f"checkpoint {self.path}: {self.directory.layout} layout, {len(self.directory.files)} files, "
            f"{self.directory.nbytes / GIB:.2f} GiB, {len(self.entries)} tensors match the model"
        )

    # ------------------------------------------------------------------ StorageReader protocol
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None and Path(checkpoint_id) != self.path:
            raise ValueError(f"this reader reads {self.path}, not {checkpoint_id}")

    def read_metadata(self) -> Metadata:
        """Every tensor of the HF layout as one chunk of its full (decoded) shape."""
        state_dict_metadata, storage_data = {}, {}
        for key, entry in self.entries.items():
            size = torch.Size(entry.shape)
            state_dict_metadata[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=entry.dtype),
                size=size,
                chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(size)), sizes=size)],
            )
            storage_data[MetadataIndex(key, [0] * len(size))] = key
        return Metadata(state_dict_metadata=state_dict_metadata, storage_data=storage_data, storage_meta=StorageMeta(load_id=self.load_id))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Serve this rank's reads, ordered by where their first stored tensor lies."""

        def storage_order(item: ReadItem):
            first = self.entries[item.storage_index.fqn].all_sources()[0].weight
            return first.file.name, first.begin

        items = sorted(plan.items, key=storage_order)
        progress = _Progress(self.path, len({storage_order(item)[0] for item in items}))
        for item in items:
            entry = self.entries[item.storage_index.fqn]
            target = planner.resolve_tensor(item).detach()
            if tuple(target.shape) != tuple(item.lengths):
                raise AssertionError(f"{entry.key}: DCP planned {tuple(item.lengths)} for a destination of {tuple(target.shape)}")
            entry.read_into(target, tuple(item.storage_offsets))
            planner.commit_tensor(item, target)
            progress.advance(storage_order(item)[0], target.numel() * target.element_size())
        progress.finish(len(items))
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return Path(checkpoint_id).is_dir()


class _Progress:
    """One log line per file started, and a summary: time, bytes, peak host / GPU memory."""

    def __init__(self, path: Path, n_files: int):
        self.path, self.n_files = path, n_files
        self.file, self.files_done, self.bytes = None, 0, 0
        self.start = time.monotonic()

    def advance(self, file: str, nbytes: int) -> None:
        if file != self.file:
            self.file, self.files_done = file, self.files_done + 1
            logger.info(
                f"checkpoint: file {self.files_done}/{self.n_files} {file}; {self.bytes / GIB:.2f} GiB loaded, "
                f"{time.monotonic() - self.start:.1f} s"
            )
        self.bytes += nbytes

    def finish(self, n_items: int) -> None:
        gpu = ""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            gpu = (
                f", peak GPU memory {torch.cuda.max_memory_allocated() / GIB:.2f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved() / GIB:.2f} GiB reserved"
            )
        logger.info(
            f"checkpoint: loaded {n_items} tensor slices ({self.bytes / GIB:.3f} GiB in the model's dtypes) from "
            f"{self.n_files} files of {self.path} in {time.monotonic() - self.start:.1f} s; peak host memory "
            f"{peak_host_memory_gib():.2f} GiB{gpu}"
        )
