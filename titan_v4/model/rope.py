"""Rotary position embedding of DeepSeek-V4: interleaved, on the trailing `rope_head_dim` channels.

Two tables per model (docs/deepseek_v4.md): "main" (plain, `rope_theta`) for sliding-window-only
layers and the MTP block, "compress" (`compress_rope_theta`, plain or YaRN as
`compress_rope_type` says) for CSA and HCA layers, their compressors and the indexer. The
released models' compress table is YaRN at unit magnitude (`yarn_attention_factor` 1, no mscale);
HF transformers computes both tables the same way from a config.json.
"""

from __future__ import annotations

import math

import torch

from .args import DeepSeekV4ModelArgs
from .precision import compute_dtype


def rope_inv_freq(args: DeepSeekV4ModelArgs, theta: float, yarn: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[rope_head_dim // 2] inverse frequencies (fp32 as HF computes them); YaRN (HF / official, no
    mscale) when `yarn`."""
    dim = args.rope_head_dim
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=dtype) / dim)
    inv_freq = 1.0 / pos_freqs
    if not yarn:
        return inv_freq

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(args.original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(args.beta_fast)), 0)
    high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=dtype) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # 1 = keep the original frequency (high-frequency dims)
    interpolated = 1.0 / (args.rope_factor * pos_freqs)
    return interpolated * (1 - extrapolation_weight) + inv_freq * extrapolation_weight


def rope_table(args: DeepSeekV4ModelArgs, theta: float, yarn: bool, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[2, max_seq_len, rope_head_dim // 2]: cos and sin of position x inverse frequency, with
    `yarn` times `args.yarn_attention_factor` (as HF scales its YaRN cos / sin). Computed in `dtype`:
    fp32 as HF does; fp64 tables make the rotation shift-invariant to fp64 rounding (the tests of
    packed documents at different offsets use them)."""
    inv_freq = rope_inv_freq(args, theta, yarn, dtype).to(device)
    positions = torch.arange(args.max_seq_len, dtype=dtype, device=device)
    angles = torch.outer(positions, inv_freq)
    table = torch.stack((angles.cos(), angles.sin()))
    return table * args.yarn_attention_factor if yarn else table


def main_rope_table(args: DeepSeekV4ModelArgs, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The table of sliding-window-only layers and the MTP block."""
    return rope_table(args, args.rope_theta, yarn=False, device=device, dtype=dtype)


def compress_rope_table(args: DeepSeekV4ModelArgs, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The table of CSA / HCA layers (attention, compressors, indexer): YaRN or plain, as
    `args.compress_rope_type` says."""
    yarn = args.compress_rope_type == "yarn"
    return rope_table(args, args.compress_rope_theta, yarn=yarn, device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the trailing `2 * cos.shape[-1]` channels of x, in compute_dtype.

    x [B, S, D] or [B, S, H, D]; cos / sin [S, R/2] for x's positions. Channel pair (2i, 2i+1) of
    the rope slice is rotated by angle i. `apply_rope(x, cos, -sin)` undoes it when the table has
    unit magnitude (else it scales the rope slice by the magnitude squared, as HF does too).
    """
    r = 2 * cos.shape[-1]
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    nope, rope = x[..., :-r], x[..., -r:]
    pairs = rope.to(compute_dtype(x.dtype)).unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((nope, rotated.to(x.dtype)), dim=-1)
