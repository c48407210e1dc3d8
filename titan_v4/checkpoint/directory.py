"""A checkpoint directory in the official or the HF layout, checked against the configured model.

The layout is told by the embedding's name: the official `embed.weight` or HF's
`model.embed_tokens.weight` (names.py has both spellings of every tensor). Before any weight is
read, `check_config` compares the directory's config.json with the model's args field by field,
and `CheckpointDirectory.entries` matches every tensor the model needs, in model order, to its
stored tensors (name, shape, dtype kind, quantisation scales) and refuses leftovers; the first
mismatch raises CheckpointMismatchError naming the tensor or field and both shapes or values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from titan_v4.checkpoint.hf_config import config_fields
from titan_v4.model.args import DeepSeekV4ModelArgs, ModelArgsError

from . import names
from .quantization import FP4_GROUP, FP8_BLOCK
from .safetensors_file import StoredTensor, read_header
from .source import FP4, FP8, PLAIN, Entry, Source

OFFICIAL, HF = "official", "hf"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the configured model; the message names the first mismatching
    config field or tensor, with the checkpoint's and the model's value or shape."""


def check_config(path: Path, model_args: DeepSeekV4ModelArgs) -> bool:
    """Compare `path/config.json` (HF or official names) with the model's architecture fields;
    False when the directory has no config.json (then only the tensors are checked)."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return False
    try:
        fields = config_fields(json.loads(config_path.read_text()))
    except (ModelArgsError, json.JSONDecodeError) as e:
        raise CheckpointMismatchError(f"{config_path}: {e}") from None
    for name, value in fields.items():
        mine = getattr(model_args, name)
        if value != mine:
            raise CheckpointMismatchError(f"{config_path}: {name} = {value!r}, but the configured model has {name} = {mine!r}")
    return True


class CheckpointDirectory:
    """The safetensors files of one directory, their tensors (headers only) and layout."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        self.files = sorted(self.path.glob("*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"{self.path}: no *.safetensors files")
        self.tensors: dict[str, StoredTensor] = {}
        for file in self.files:
            for name, stored in read_header(file).items():
                if name in self.tensors:
                    raise CheckpointMismatchError(f"{self.path}: {name} is stored twice, in {self.tensors[name].file.name} and {file.name}")
                self.tensors[name] = stored
        self._check_index()
        self.layout = self._detect_layout()

    def _check_index(self) -> None:
        """The shard index, when there is one, must agree with the files (a missing shard is named)."""
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            return
        weight_map = json.loads(index_path.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{index_path} lists {len(missing)} shard(s) that are not in {self.path}; the first: {missing[0]}")
        for name, file in weight_map.items():
            stored = self.tensors.get(name)
            if stored is None or stored.file.name != file:
                found = "absent" if stored is None else f"in {stored.file.name}"
                raise CheckpointMismatchError(f"{index_path} places {name} in {file}, but it is {found}")

    def _detect_layout(self) -> str:
        official = "embed.weight" in self.tensors
        hf = names.TOP_TITAN_TO_HF["tok_embeddings.weight"] in self.tensors
        if hf and "head.weight" in self.tensors:
            raise CheckpointMismatchError(
                f"{self.path} looks like the output of transformers' save_pretrained (`model.embed_tokens.weight` "
                "next to the official `head.weight`): transformers 5.x writes its own mix of names there, which "
                "is not supported; save the model's state_dict() with safetensors instead (HF names), or load "
                "the official checkpoint"
            )
        if official == hf:
            raise CheckpointMismatchError(
                f"{self.path}: cannot tell the layout: expected the official `embed.weight` or HF's "
                f"`model.embed_tokens.weight`, found {'both' if official else 'neither'}"
            )
        return OFFICIAL if official else HF

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    # ------------------------------------------------------------------ matching the model
    def entries(self, expected: dict[str, torch.Tensor], n_experts: int) -> dict[str, Entry]:
        """One Entry per tensor of `expected` (the model's HF-layout state dict, meta tensors are
        enough), in its order. Raises CheckpointMismatchError at the first tensor that is missing,
        shaped or typed differently, or quantised inconsistently, then for stored tensors the
        model does not have."""
        used: set[str] = set()
        entries = {}
        for key, want in expected.items():
            groups = names.official_experts_of_hf(key, n_experts) if self.layout == OFFICIAL else None
            if groups is None:
                name = key if self.layout == HF else names.official_name_of_hf(key)
                source = self._source(name, key, want, used)
                entry = Entry(key, source.shape, (source,))
                what = name
            else:
                experts = tuple(tuple(self._source(n, key, want, used) for n in group) for group in groups)
                entry = Entry(key, self._stacked_shape(key, experts), (), experts)
                what = f"{groups[0][0]} (stacked as {key})"
            if entry.shape != tuple(want.shape):
                raise CheckpointMismatchError(
                    f"{self.path}: {what} has shape {list(entry.shape)}, but the configured model's {key} is {list(want.shape)}"
                )
            stored_float = any(s.encoding != PLAIN or s.weight.torch_dtype.is_floating_point for s in entry.all_sources())
            if stored_float != want.dtype.is_floating_point:
                raise CheckpointMismatchError(
                    f"{self.path}: {what} is stored as {entry.all_sources()[0].weight.dtype}, but the configured model's {key} is {want.dtype}"
                )
            entries[key] = entry
        unexpected = [t for name, t in self.tensors.items() if name not in used]
        if unexpected:
            t = unexpected[0]
            raise CheckpointMismatchError(
                f"{self.path}: {len(unexpected)} stored tensor(s) are not part of the configured model; the first: "
                f"{t.name} ({t.dtype} {list(t.shape)} in {t.file.name})"
            )
        return entries

    def _source(self, name: str, key: str, want: torch.Tensor, used: set[str]) -> Source:
        """The stored tensor `name` (and its `.scale` if quantised), for the model's `key`."""
        weight = self.tensors.get(name)
        if weight is None:
            raise CheckpointMismatchError(
                f"{self.path}: {name} is missing (the configured model's {key} has shape {list(want.shape)})"
            )
        used.add(name)
        scale_name = name.removesuffix(".weight") + ".scale" if name.endswith(".weight") else None
        scale = self.tensors.get(scale_name) if scale_name else None
        where = f"{weight.file.name}: {name}"
        if scale is None:
            if weight.dtype in ("F8_E4M3", "I8"):
                raise CheckpointMismatchError(f"{where} is quantised ({weight.dtype}) but {scale_name} is missing")
            return Source(weight, None, PLAIN, weight.shape)
        used.add(scale_name)
        if len(weight.shape) != 2:
            raise CheckpointMismatchError(f"{where} has a scale but {len(weight.shape)} dims; quantised weights are 2-D")
        rows, cols = weight.shape
        if weight.dtype == "F8_E4M3":
            encoding, shape, scale_dtypes = FP8, (rows, cols), ("F8_E8M0", "F32")
            scale_shape = (math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))
        elif weight.dtype == "I8":
            encoding, shape, scale_dtypes = FP4, (rows, 2 * cols), ("F8_E8M0",)
            scale_shape = (rows, math.ceil(2 * cols / FP4_GROUP))
        else:
            raise CheckpointMismatchError(f"{where} has a scale ({scale_name}) but is stored as {weight.dtype}; quantised weights are F8_E4M3 or I8 (packed FP4)")
        if scale.dtype not in scale_dtypes or scale.shape != scale_shape:
            raise CheckpointMismatchError(
                f"{where}: {encoding} weight {list(weight.shape)} needs a {'/'.join(scale_dtypes)} scale of shape "
                f"{list(scale_shape)}; {scale_name} is {scale.dtype} {list(scale.shape)}"
            )
        return Source(weight, scale, encoding, shape)

    def _stacked_shape(self, key: str, experts: tuple[tuple[Source, ...], ...]) -> tuple[int, ...]:
        """[E, sum of rows, cols] of per-expert sources, which must all agree with expert 0's."""
        first = [s.shape for s in experts[0]]
        for group in experts[1:]:
            shapes = [s.shape for s in group]
            if shapes != first:
                raise CheckpointMismatchError(
                    f"{self.path}: {group[0].weight.name} has shape {list(shapes[0])} but expert 0's is {list(first[0])} ({key})"
                )
        if len({shape[1:] for shape in first}) != 1:
            raise CheckpointMismatchError(f"{self.path}: the per-expert tensors of {key} differ in width: {first}")
        return (len(experts), sum(shape[0] for shape in first), *first[0][1:])
