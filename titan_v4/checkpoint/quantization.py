"""Decoding the quantised weights of DeepSeek's checkpoints (docs/deepseek_v4.md, "Checkpoint format").

- FP8: E4M3 values, one scale per 128 x 128 block: `W[r, c] = q[r, c] * scale[r // 128, c // 128]`.
  Scales are E8M0 (the byte b means 2^(b - 127)); the -Base checkpoints store the same powers of
  two as fp32.
- FP4 (routed experts): E2M1 codes packed two per int8 byte, element 2j in the low nibble of byte j,
  one E8M0 scale per 1 x 32 input group: `W[r, c] = e2m1(q[r, c]) * scale[r, c // 32]`.

Both decode exactly into fp32 (and into bf16: 3 and 1 mantissa bits times a power of two).
The functions take a row slice of the stored tensors and return fp32 on the device of their inputs,
so decoding runs where the weights will live.
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128
FP4_GROUP = 32
# E2M1 code -> value: sign bit 3, exponent bits 2-1, mantissa bit 0.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def decode_scales(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 (or fp32) scales -> fp32."""
    if scales.dtype not in (torch.float8_e8m0fnu, torch.float32):
        raise TypeError(f"quantisation scales must be E8M0 or fp32, got {scales.dtype}")
    return scales.float()


def dequantize_fp8(values: torch.Tensor, scales: torch.Tensor, row0: int) -> torch.Tensor:
    """values: float8_e4m3fn [R, C], rows row0 .. row0 + R - 1 of the full weight (all its columns);
    scales: [>= ceil(C / 128)]-column block scales whose first row is block row0 // 128 -> fp32 [R, C]."""
    rows, cols = values.shape
    block_rows = (torch.arange(row0, row0 + rows, device=values.device) // FP8_BLOCK) - row0 // FP8_BLOCK
    block_cols = torch.arange(cols, device=values.device) // FP8_BLOCK
    return values.float() * decode_scales(scales)[block_rows][:, block_cols]


def _fp4_byte_table(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: the two E2M1 values of each byte (low nibble first)."""
    values = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack((values[byte & 0x0F], values[byte >> 4]), dim=-1)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [R, C/2] -> fp32 [R, C] E2M1 values (unscaled)."""
    codes = packed.view(torch.uint8).long()
    return _fp4_byte_table(packed.device)[codes].reshape(packed.shape[0], -1)


def dequantize_fp4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """packed: int8 [R, C/2] (whole rows); scales: E8M0 [R, C/32] -> fp32 [R, C]."""
    values = unpack_fp4(packed)
    rows, cols = values.shape
    return (values.view(rows, cols // FP4_GROUP, FP4_GROUP) * decode_scales(scales).unsqueeze(-1)).view(rows, cols)
