"""Tile configurations of the sparse-attention kernels, picked by a heuristic from the shapes.

No autotuning: a first call at a new shape compiles one variant of each kernel (seconds), and
``benchmarks/sparse_attention.py --sweep`` times a small grid of :class:`Tiles` on a GPU so that the
heuristics below can be set from measurements.
"""

from typing import NamedTuple

import torch
import triton


class Tiles(NamedTuple):
    """Block sizes and launch options of one kernel launch (all block sizes powers of two, >= 16).

    "D" below is the head dim padded to a power of two (``triton.next_power_of_2(D)``).
    """

    # Query heads per program, packed into the matrix M dimension: all heads of a query share one
    # key row, so one loaded row serves block_h heads. H < block_h is padded with masked heads.
    block_h: int
    # Query-major kernels (forward, dq): key rows per inner-loop block. Key-major kernels (dkv,
    # deterministic dpool): key rows owned by one program.
    block_n: int
    # block_d == D ("whole rows"): the operand that stays fixed over a program's loop (the query
    # tile [block_h, D] in query-major kernels, the key tile [block_n, D] in key-major ones) is
    # loaded once and kept on chip, and each key row tile is loaded once and used both as K and V.
    # block_d < D ("chunked"): the q . k products are accumulated over D in chunks re-read from
    # L1/L2, for when the whole tiles do not fit in shared memory / registers.
    block_d: int
    # Slice of D that one program accumulates and writes (out, dq, dkv, dpool): D // block_dv
    # programs share a (query, head block) or a key block and each recompute the logits. Smaller
    # slices: fewer registers for the fp32 accumulator, more programs, more recompute.
    block_dv: int
    num_warps: int
    num_stages: int
    # Deterministic dpool kernel only: queries walked by one program (partial sums are reduced in a
    # fixed order afterwards).
    block_t: int = 256


def _head_block(heads: int) -> int:
    """All heads of a query in one program up to 64 (64 x 512 is FlashMLA's tile); more are split."""
    return max(16, min(64, triton.next_power_of_2(heads)))


def _whole_rows_fit(dim: int, dtype: torch.dtype) -> bool:
    """Whether [64, D] query and [32, D] key tiles fit the forward's shared memory (227 KiB on H100)."""
    return triton.next_power_of_2(dim) <= (512 if dtype == torch.bfloat16 else 128)


# Resource figures quoted below: these kernels compiled for sm_90 with triton 3.9 on a CPU (shared
# memory from the kernel metadata, registers / spills from cuobjdump), at H = 64, D = 512, bf16,
# CSA with the atomic dpool (the heaviest variant). Speed is for benchmarks/sparse_attention.py
# --sweep to decide.


def fwd_tiles(heads: int, dim: int, dtype: torch.dtype) -> Tiles:
    """Forward: whole rows, the query tile on chip, each key tile used as K and V (FlashMLA's way).

    At D = 512: q [64, 512] and two pipelined [64, 512] key tiles, 192 KiB of shared memory; the
    [64, 512] fp32 accumulator is 128 registers per thread at 8 warps (two warpgroups, each owning
    half of D). The sweep at the Flash CSA shape found 64-row key tiles faster than 32-row ones,
    and both splitting D into two output slices (the logits computed twice) and reading D in 64-wide
    chunks slower: timings in docs/perf/sparse_attention_kernels.md.
    """
    d_pad = triton.next_power_of_2(dim)
    whole = _whole_rows_fit(dim, dtype)
    return Tiles(
        block_h=_head_block(heads),
        block_n=64,
        block_d=d_pad if whole else 64,
        block_dv=d_pad if whole else min(d_pad, 128),
        num_warps=8 if d_pad >= 256 else 4,
        num_stages=2,
    )


def bwd_dq_tiles(heads: int, dim: int, dtype: torch.dtype) -> Tiles:
    """dq (and the atomic dpool scatter): query and dO tiles re-read in 64-wide chunks of D.

    Whole [64, 512] q and dO tiles would take 300+ KiB of shared memory with the key tiles and the
    scatter's operands. One program per (query, head block) writes all of D (block_dv = 512): two or
    four output slices would each recompute the logits, and the sweep at the Flash CSA shape found
    them slower (docs/perf/sparse_attention_kernels.md).
    """
    d_pad = triton.next_power_of_2(dim)
    return Tiles(
        block_h=_head_block(heads),
        block_n=32,
        block_d=min(64, d_pad),
        block_dv=d_pad if dtype == torch.bfloat16 else min(d_pad, 128),
        num_warps=8 if d_pad >= 256 else 4,
        num_stages=2,
    )


def bwd_dkv_tiles(heads: int, dim: int, dtype: torch.dtype) -> Tiles:
    """dkv (window) and deterministic dpool: 32 key rows per program, query tiles in 64-wide chunks.

    A program of 32 window rows walks 32 + window - 1 queries (80 % of them useful at window 128;
    64 rows: 67 %). At D = 512: two 256-wide slices. Three pipeline stages beat two at the Flash
    shape, for the SWA backward and the deterministic dpool (docs/perf/sparse_attention_kernels.md).
    """
    d_pad = triton.next_power_of_2(dim)
    return Tiles(
        block_h=_head_block(heads),
        block_n=32,
        block_d=min(64, d_pad),
        block_dv=min(d_pad, 256 if dtype == torch.bfloat16 else 128),
        num_warps=8 if d_pad >= 256 else 4,
        num_stages=3,
    )


def check_tiles(tiles: Tiles, dim: int) -> None:
    """Raises ValueError for tiles the kernels cannot run at head dim ``dim``."""
    d_pad = triton.next_power_of_2(dim)
    for name in ("block_h", "block_n", "block_d", "block_dv"):
        value = getattr(tiles, name)
        if value < 16 or value & (value - 1):
            # 16: the smallest reduction dim of tl.dot for 16-bit operands; all four are one somewhere.
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    if tiles.block_t < 1:
        raise ValueError(f"block_t must be >= 1, got {tiles.block_t}")
    if tiles.block_d > d_pad or tiles.block_dv > d_pad:
        raise ValueError(f"block_d {tiles.block_d} and block_dv {tiles.block_dv} must be <= {d_pad} (D = {dim})")
