"""Where the values of one HF-layout tensor come from, and reading any slice of it.

A `Source` is one stored tensor with its encoding: `plain` (read as stored), `fp8` (E4M3 weight
+ 128 x 128 block scales) or `fp4` (packed E2M1 weight + 1 x 32 group scales); see
quantization.py. An `Entry` is one tensor of the HF layout: a single source, or (the routed experts
of an official checkpoint) one group of sources per expert, concatenated along rows and stacked
along a new dim 0, e.g. HF's `gate_up_proj [E, 2I, D]` from the official `w1 [I, D]` and
`w3 [I, D]` of every expert.

Reads ask for a box (`offsets`, `lengths` per dim, as DCP plans them); only the rows of dim 0 (of
each expert's tensors) that the box covers are read from disk, and decoding runs on the device the
values are going to (the small scale tensors are decoded to fp32 on the host first, so the device
only needs E4M3 and integer ops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantization import FP8_BLOCK, decode_scales, dequantize_fp4, dequantize_fp8
from .safetensors_file import StoredTensor

PLAIN, FP8, FP4 = "plain", "fp8", "fp4"


@dataclass(frozen=True)
class Source:
    """One stored tensor, decoded to its logical shape (`shape`)."""

    weight: StoredTensor
    scale: StoredTensor | None
    encoding: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        """The narrowest dtype that holds the values exactly: the stored one, or bf16 for quantised
        weights (FP8 and FP4 codes times a power of two fit bf16's 8 mantissa bits)."""
        return self.weight.torch_dtype if self.encoding == PLAIN else torch.bfloat16

    def read(self, offsets: tuple[int, ...], lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The box [offsets, offsets + lengths) of the logical tensor, on `device`: plain sources in
        their stored dtype, quantised ones in fp32 (exact)."""
        if not self.shape:
            return self.weight.read_rows(0, 1).to(device)
        row0, rows = offsets[0], lengths[0]
        if self.encoding == PLAIN:
            values = self.weight.read_rows(row0, row0 + rows).to(device)
        elif self.encoding == FP8:
            first_block, end_block = row0 // FP8_BLOCK, -(-(row0 + rows) // FP8_BLOCK)
            values = dequantize_fp8(
                self.weight.read_rows(row0, row0 + rows).to(device),
                decode_scales(self.scale.read_rows(first_block, end_block)).to(device),
                row0,
            )
        else:
            values = dequantize_fp4(
                self.weight.read_rows(row0, row0 + rows).to(device),
                decode_scales(self.scale.read_rows(row0, row0 + rows)).to(device),
            )
        for dim in range(1, len(self.shape)):
            values = values.narrow(dim, offsets[dim], lengths[dim])
        return values


@dataclass(frozen=True)
class Entry:
    """One tensor of the HF layout. `experts is None`: the values are `sources[0]`. Otherwise
    `experts[e]` are the sources of expert e, concatenated along their dim 0, and the experts are
    stacked along a new dim 0."""

    key: str
    shape: tuple[int, ...]
    sources: tuple[Source, ...]
    experts: tuple[tuple[Source, ...], ...] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.all_sources()[0].dtype

    def all_sources(self) -> tuple[Source, ...]:
        return self.sources if self.experts is None else tuple(s for group in self.experts for s in group)

    def read_into(self, out: torch.Tensor, offsets: tuple[int, ...]) -> None:
        """Fill `out` with the box [offsets, offsets + out.shape) of this tensor, decoding on
        out's device and converting to out's dtype; stacked experts are decoded one at a time."""
        lengths = tuple(out.shape)
        if self.experts is None:
            out.copy_(self.sources[0].read(offsets, lengths, out.device))
            return
        for i in range(lengths[0]):
            out[i].copy_(self._read_expert(offsets[0] + i, offsets[1:], lengths[1:], out.device))

    def read_all(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor on the CPU, in `dtype` (default: `self.dtype`, exact)."""
        out = torch.empty(self.shape, dtype=dtype or self.dtype)
        self.read_into(out, (0,) * len(self.shape))
        return out

    def _read_expert(self, expert: int, offsets, lengths, device) -> torch.Tensor:
        """Rows [offsets[0], offsets[0] + lengths[0]) of expert `expert`'s concatenated sources."""
        start, stop = offsets[0], offsets[0] + lengths[0]
        parts, base = [], 0
        for source in self.experts[expert]:
            lo, hi = max(start, base), min(stop, base + source.shape[0])
            if lo < hi:
                parts.append(source.read((lo - base, *offsets[1:]), (hi - lo, *lengths[1:]), device))
            base += source.shape[0]
        if not parts:  # an empty box
            return self.experts[expert][0].read((0, *offsets[1:]), (0, *lengths[1:]), device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)
