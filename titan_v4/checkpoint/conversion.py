"""Converting DeepSeek-V4 checkpoints between the official, HF and torchtitan DCP layouts, one block
at a time (the command line is titan_v4/tools/convert.py, which documents the formats).

:func:`convert` reads the model from the input's config.json or a flavor, checks the input against
it before anything is converted, and streams one block (a layer, an MTP depth, or the embedding /
head group) at a time: the host memory it needs is about one block plus the file being written.
Progress is logged per block, and the peak host memory at the end. Every input tensor is checked
for NaN / inf as its block is read (NonFiniteValueError names the stored tensor and file).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titan_v4.checkpoint import names
from titan_v4.checkpoint.directory import CONFIG_FILE, HF, INDEX_FILE, CheckpointDirectory, CheckpointMismatchError, check_config
from titan_v4.checkpoint.hf_config import args_from_hf_config, hf_config_from_args
from titan_v4.checkpoint.quantization import decode_scales
from titan_v4.checkpoint.reader import GIB, peak_host_memory_gib
from titan_v4.checkpoint.safetensors_file import write_file
from titan_v4.checkpoint.source import Entry
from titan_v4.checkpoint.state_dict_adapter import DeepSeekV4StateDictAdapter, expected_hf_tensors
from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.args import DeepSeekV4ModelArgs, ModelArgsError
from titan_v4.model.model import DeepSeekV4Model

DCP = "dcp"
# Files next to the weights that an HF-layout directory keeps (tokenizer, generation defaults).
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# Top-level entries of a torchtitan training checkpoint that are not model weights.
TRAINING_STATE = ("optimizer", "lr_scheduler", "dataloader", "train_state")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Elements per isfinite pass: the mask it allocates stays at 16 MiB whatever the tensor's size.
FINITE_CHUNK = 1 << 24


class NonFiniteValueError(ValueError):
    """An input tensor holds a NaN or an infinity; the message names the stored tensor (for a
    quantised weight, the weight or its scale), its file, how many and the first index."""


def log(message: str) -> None:
    print(f"convert: {message}", flush=True)


def block_of(key: str) -> str:
    """The streaming unit of a titan or HF key: `layers.L`, `mtp.K`, or `top`."""
    m = names.TITAN_BLOCK.match(key) or names.HF_BLOCK.match(key)
    return "top" if m is None else f"{'layers' if m.group(1) != 'mtp' else 'mtp'}.{m.group(2)}"


def blocks_in_order(keys) -> list[str]:
    seen: dict[str, None] = {}
    for key in keys:
        seen.setdefault(block_of(key))
    return list(seen)


# ---------------------------------------------------------------------------------- model args
def model_args(input_dir: Path, flavor: str | None) -> DeepSeekV4ModelArgs:
    """From `--flavor` or the input's config.json; with both, they must agree."""
    if not input_dir.is_dir():
        raise CheckpointMismatchError(f"{input_dir} is not a directory" if input_dir.exists() else f"{input_dir} does not exist")
    config_path = input_dir / CONFIG_FILE
    if flavor is not None:
        args = deepseek_v4_args[flavor]
        if config_path.is_file():
            check_config(input_dir, args)
        return args
    if not config_path.is_file():
        raise CheckpointMismatchError(f"{input_dir} has no {CONFIG_FILE}: name the model with --flavor (one of {sorted(deepseek_v4_args)})")
    try:
        return args_from_hf_config(json.loads(config_path.read_text()))
    except (ModelArgsError, json.JSONDecodeError) as e:  # a config the model cannot be built from
        raise CheckpointMismatchError(f"{config_path}: {e}") from None


# ---------------------------------------------------------------------------------- finite values
def all_finite(values: torch.Tensor) -> bool:
    """True unless a floating tensor holds a NaN or an infinity; FINITE_CHUNK elements at a time."""
    if not values.is_floating_point():
        return True
    flat = values.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + FINITE_CHUNK]).all()) for i in range(0, flat.numel(), FINITE_CHUNK))


def non_finite(values: torch.Tensor) -> str | None:
    """None for a tensor of finite values, else "holds N non-finite value(s) (NaN or inf), the first
    at [i, j, ...]"."""
    if all_finite(values):
        return None
    flat = values.reshape(-1)
    count, first = 0, None
    for i in range(0, flat.numel(), FINITE_CHUNK):
        bad = ~torch.isfinite(flat[i : i + FINITE_CHUNK])
        if first is None and bad.any():
            first = i + int(bad.nonzero()[0])
        count += int(bad.sum())
    index = [int(i) for i in torch.unravel_index(torch.tensor(first), values.shape)]
    return f"holds {count} non-finite value{'s' if count > 1 else ''} (NaN or inf), the first at {index}"


def refuse_non_finite_entry(entry: Entry, dtype: torch.dtype) -> None:
    """Raise NonFiniteValueError for the first stored tensor of `entry` whose values, read as `dtype`,
    are not all finite: a quantised weight's scales (E8M0 has a NaN code, fp32 scales may be
    anything), its decoded values (E4M3 has NaN codes), then the cast to `dtype` (fp32 beyond
    bf16's range rounds to inf)."""
    for source in entry.all_sources():
        if source.scale is not None:
            scales = decode_scales(source.scale.read_rows(0, source.scale.shape[0]))
            if (found := non_finite(scales)) is not None:
                raise NonFiniteValueError(f"{source.scale.file}: {source.scale.name} {found}")
        values = source.read((0,) * len(source.shape), source.shape, torch.device("cpu"))
        if (found := non_finite(values)) is not None:
            raise NonFiniteValueError(f"{source.weight.file}: {source.weight.name} {found}")
        if (found := non_finite(values.to(dtype))) is not None:
            raise NonFiniteValueError(f"{source.weight.file}: {source.weight.name} {found} once cast to {dtype}")
    raise AssertionError(f"{entry.key} read as {dtype} is not finite, but none of its stored tensors is")


# ---------------------------------------------------------------------------------- inputs
class SafetensorsInput:
    """An official or HF-layout directory; yields each block as an HF-layout dict."""

    def __init__(self, path: Path, layout: str, args: DeepSeekV4ModelArgs):
        self.directory = CheckpointDirectory(path)
        if self.directory.layout != layout:
            raise CheckpointMismatchError(f"--input-format {layout}, but {path} is in the {self.directory.layout} layout")
        self.entries = self.directory.entries(expected_hf_tensors(args), args.n_routed_experts)
        self.order = blocks_in_order(self.entries)

    def hf_block(self, block: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The block's tensors, every value finite (else NonFiniteValueError)."""
        tensors = {}
        for key, entry in self.entries.items():
            if block_of(key) == block:
                tensors[key] = entry.read_all(cast(entry.dtype, dtype))
                if not all_finite(tensors[key]):
                    refuse_non_finite_entry(entry, tensors[key].dtype)
        return tensors


class DcpInput:
    """A torchtitan DCP checkpoint folder; yields each block as a titan dict. Training state
    (optimizer, LR schedule, data position) is skipped, and said so."""

    def __init__(self, path: Path, args: DeepSeekV4ModelArgs):
        self.path = path
        stored_metadata = FileSystemReader(str(path)).read_metadata()
        self.storage = stored_metadata.storage_data  # where each tensor's chunks are: file, bytes
        metadata = stored_metadata.state_dict_metadata
        with torch.device("meta"):
            expected = DeepSeekV4Model(args).state_dict()
        skipped = sorted({k.split(".")[0] for k in metadata if k.split(".")[0] in TRAINING_STATE})
        if skipped:
            log(f"{path}: not converting the training state {skipped} (model weights only)")
        unexpected = [k for k in metadata if k not in expected and k.split(".")[0] not in TRAINING_STATE]
        if unexpected:
            raise CheckpointMismatchError(f"{path}: {len(unexpected)} stored tensor(s) are not part of the model; the first: {unexpected[0]}")
        self.stored: dict[str, TensorStorageMetadata] = {}
        for key, want in expected.items():
            md = metadata.get(key)
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointMismatchError(f"{path}: {key} is missing (the model's has shape {list(want.shape)})")
            if tuple(md.size) != tuple(want.shape):
                raise CheckpointMismatchError(f"{path}: {key} has shape {list(md.size)}, but the model's is {list(want.shape)}")
            self.stored[key] = md
        self.order = blocks_in_order(self.stored)

    def titan_block(self, block: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The block's tensors, every value finite (else NonFiniteValueError)."""
        wanted = {
            k: torch.empty(md.size, dtype=cast(md.properties.dtype, dtype)) for k, md in self.stored.items() if block_of(k) == block
        }
        dcp.load(wanted, checkpoint_id=str(self.path), no_dist=True)
        for key, values in wanted.items():
            if not all_finite(values):
                self.refuse_non_finite(key, values)
        return wanted

    def refuse_non_finite(self, key: str, values: torch.Tensor) -> None:
        """Raise NonFiniteValueError naming `key`, the .distcp file(s) that hold it and its values
        as stored, or, when those are finite, the cast to `values.dtype` (--dtype)."""
        files = sorted({info.relative_path for index, info in self.storage.items() if index.fqn == key})
        where = ", ".join(str(self.path / f) for f in files)
        stored_dtype = self.stored[key].properties.dtype
        if values.dtype != stored_dtype:
            as_stored = {key: torch.empty(values.shape, dtype=stored_dtype)}
            dcp.load(as_stored, checkpoint_id=str(self.path), no_dist=True)
            if (found := non_finite(as_stored[key])) is not None:
                raise NonFiniteValueError(f"{where}: {key} {found}")
            raise NonFiniteValueError(f"{where}: {key} {non_finite(values)} once cast to {values.dtype}")
        raise NonFiniteValueError(f"{where}: {key} {non_finite(values)}")


def cast(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """`--dtype` applies to floating tensors only (hash tables stay int64)."""
    return requested if requested is not None and stored.is_floating_point else stored


# ---------------------------------------------------------------------------------- outputs
def write_hf(output: Path, args: DeepSeekV4ModelArgs, blocks: Iterator[tuple[str, dict[str, torch.Tensor]]], n_blocks: int) -> None:
    """One safetensors file per block, the index, and config.json."""
    weight_map, total, dtypes = {}, 0, set()
    for i, (block, tensors) in enumerate(blocks):
        file = f"model-{i + 1:05d}-of-{n_blocks:05d}.safetensors"
        write_file(output / file, tensors, metadata={"format": "pt"})
        weight_map.update({k: file for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        dtypes |= {t.dtype for t in tensors.values() if t.is_floating_point() and t.dim() == 2}
    (output / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = hf_config_from_args(args)
    config["torch_dtype"] = "bfloat16" if dtypes == {torch.bfloat16} else "float32"
    (output / CONFIG_FILE).write_text(json.dumps(config, indent=2))


class _LazySavePlanner(DefaultSavePlanner):
    """DCP's planner over placeholders: each tensor is produced when the writer asks for it
    (SavePlanner.resolve_data is documented as the place to allocate lazily)."""

    def __init__(self, produce: Callable[[str], torch.Tensor]):
        super().__init__()
        self.produce = produce

    def resolve_data(self, write_item):
        return self.produce(write_item.index.fqn)


def write_dcp(output: Path, placeholders: dict[str, torch.Tensor], titan_block: Callable[[str], dict[str, torch.Tensor]]) -> None:
    """A model-only torchtitan checkpoint, written block by block in `placeholders` order."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def produce(key: str) -> torch.Tensor:
        block = block_of(key)
        if block not in cache:
            cache.clear()
            cache[block] = titan_block(block)
        return cache[block].pop(key) if key in cache[block] else titan_block(block)[key]

    # One file per tensor: torch's FileSystemWriter holds every tensor of a file until the file is
    # closed, so one file for everything (its default) would hold the whole model.
    writer = FileSystemWriter(str(output), single_file_per_rank=False, thread_count=1)
    try:
        dcp.save(placeholders, storage_writer=writer, planner=_LazySavePlanner(produce), no_dist=True)
    except CheckpointException as e:  # what `produce` raised for a bad input, wrapped by dcp.save
        bad_input = [exc for exc, _ in e.failures.values() if isinstance(exc, (CheckpointMismatchError, NonFiniteValueError))]
        if bad_input:
            raise bad_input[0] from None
        raise


# ---------------------------------------------------------------------------------- conversion
def convert(input_dir: Path, input_format: str, output: Path, output_format: str, flavor: str | None = None, dtype: torch.dtype | None = None) -> None:
    start, memory_at_start = time.monotonic(), peak_host_memory_gib()
    args = model_args(input_dir, flavor)
    adapter = DeepSeekV4StateDictAdapter(args, None)
    source = DcpInput(input_dir, args) if input_format == DCP else SafetensorsInput(input_dir, input_format, args)
    n = len(source.order)

    def titan_block(block: str) -> dict[str, torch.Tensor]:
        if isinstance(source, DcpInput):
            return source.titan_block(block, dtype)
        titan = adapter.from_hf(source.hf_block(block, dtype))
        if block.startswith("layers.") and args.is_hash_layer(int(block.split(".")[1])):
            titan[f"{block}.moe.expert_bias"] = torch.zeros(args.n_routed_experts)  # unused; the model's init value
        return titan

    def hf_block(block: str) -> dict[str, torch.Tensor]:
        if isinstance(source, DcpInput):
            return adapter.to_hf(source.titan_block(block, dtype))
        return source.hf_block(block, dtype)

    def progress(i: int, block: str, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        log(f"[{i + 1}/{n}] {block}: {len(tensors)} tensors, {size / GIB:.2f} GiB, {time.monotonic() - start:.1f} s")

    output.mkdir(parents=True, exist_ok=True)
    if output_format == HF:

        def blocks():
            for i, block in enumerate(source.order):
                tensors = hf_block(block)
                progress(i, block, tensors)
                yield block, tensors

        write_hf(output, args, blocks(), n)
        for name in COPIED_FILES:
            if (input_dir / name).is_file():
                shutil.copy2(input_dir / name, output / name)
                log(f"copied {name}")
    else:
        # The model's own dtypes (fp32 weights, as torchtitan saves them), or --dtype.
        with torch.device("meta"):
            model_state = DeepSeekV4Model(args).state_dict()
        order = {block: i for i, block in enumerate(source.order)}
        placeholders = {
            k: torch.empty(v.shape, dtype=cast(v.dtype, dtype), device="meta")
            for k, v in sorted(model_state.items(), key=lambda kv: order[block_of(kv[0])])
        }

        def dcp_block(block: str) -> dict[str, torch.Tensor]:
            tensors = {k: t.to(placeholders[k].dtype) for k, t in titan_block(block).items()}
            progress(order[block], block, tensors)
            return tensors

        write_dcp(output, placeholders, dcp_block)
    peak = peak_host_memory_gib()
    log(
        f"wrote {output} ({output_format}) in {time.monotonic() - start:.1f} s; peak host memory {peak:.3f} GiB "
        f"({peak - memory_at_start:.3f} GiB above the start)"
    )
