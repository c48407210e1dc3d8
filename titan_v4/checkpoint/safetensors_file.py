"""safetensors files, read a row range at a time and written tensor by tensor.

The format: an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the data: each tensor row-major and little-endian at `8 + N + begin`. Only the rows a reader
asks for are read, so a rank that owns a slice of a tensor never holds the rest of it in memory.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


class SafetensorsFormatError(ValueError):
    """A file that is not valid safetensors (truncated, corrupt header); the message names the file."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor in one safetensors file: its name, dtype string, shape and absolute byte range."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 (elements of a 1-D tensor; the whole of a 0-D one) as a CPU
        tensor of the stored dtype."""
        if not self.shape:
            start, stop, row_shape = 0, 1, ()
        else:
            row_shape = self.shape[1:]
        if not 0 <= start <= stop <= (self.shape[0] if self.shape else 1):
            raise IndexError(f"{self.file}: {self.name} has shape {self.shape}; rows {start}:{stop} are out of range")
        row_bytes = math.prod(row_shape) * DTYPES[self.dtype].itemsize
        out = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        if out.numel():
            with open(self.file, "rb") as f:
                f.seek(self.begin + start * row_bytes)
                got = f.readinto(out.numpy())
            if got != out.numel():
                raise SafetensorsFormatError(f"{self.file}: short read of {self.name} ({got} of {out.numel()} bytes): the file changed or is truncated")
        return out.view(DTYPES[self.dtype]).reshape((stop - start, *row_shape) if self.shape else ())


def read_header(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file, after checking that the header is well formed and that
    the file holds every byte it announces (a truncated download fails here, naming the file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsFormatError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise SafetensorsFormatError(
                f"{path}: the header claims {header_len} bytes but the file has {size} (truncated, or not safetensors)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsFormatError(f"{path}: unreadable safetensors header ({e})") from None
    data_start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype not in DTYPES:
            raise SafetensorsFormatError(f"{path}: {name} has dtype {dtype}; supported: {sorted(DTYPES)}")
        if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
            raise SafetensorsFormatError(f"{path}: {name} ({dtype} {list(shape)}) spans {end - begin} bytes, which does not fit its shape")
        if data_start + end > size:
            raise SafetensorsFormatError(
                f"{path} is truncated: {name} ends at byte {data_start + end} but the file has {size} bytes"
            )
        tensors[name] = StoredTensor(path, name, dtype, shape, data_start + begin, data_start + end)
    return tensors


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` (any device; written in their own dtype) as one safetensors file; returns its
    size in bytes. Tensors are copied to the host one at a time."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in tensors.values():
            f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return 8 + len(encoded) + offset
