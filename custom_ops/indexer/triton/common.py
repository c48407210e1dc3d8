"""What the indexer kernels share: the walk over a query's entries, block sizes, the dot precision."""

import torch
import triton
import triton.language as tl


@triton.jit
def _entry_block(idx_row_ptr, n0, n_first, n_vis, N_LISTED, LISTED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Block n0 of one query's entries: (slot offsets, entry ids, valid mask), each [BLOCK_N].

    The query sees entries ``n_first <= s < n_vis`` (n_first: the first entry of its document, >= 0).
    LISTED: slots of the query's index row (``idx_row_ptr``), valid when the index is in that range
    (ignored slots read entry 0, masked). Otherwise entries ``n0 ..`` themselves.
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if LISTED:
        idx = tl.load(idx_row_ptr + offs_n, mask=offs_n < N_LISTED, other=-1)
        valid = (idx >= n_first) & (idx < n_vis)
        entry = tl.where(valid, idx, 0)
    else:
        valid = (offs_n >= n_first) & (offs_n < n_vis)
        entry = offs_n
    return offs_n, entry, valid


@triton.jit
def _visible_range(first_ptr, b, t, stride_fb, P, RATIO, BLOCK_N: tl.constexpr):
    """(n_first, n_vis, n_start) of query t of batch b: it sees entries ``n_first <= s < n_vis``;
    n_start is n_first rounded down to a whole block, where a walk over every entry begins."""
    n_first = tl.load(first_ptr + b * stride_fb + t)
    n_vis = tl.minimum((t + 1) // RATIO, P)
    return n_first, n_vis, (n_first // BLOCK_N) * BLOCK_N


def block(n: int, cap: int | None = None) -> int:
    """A power-of-two block >= n (and >= 16, the smallest tl.dot operand), at most ``cap`` if given."""
    size = max(16, triton.next_power_of_2(n))
    return size if cap is None else min(size, cap)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: exact fp32 products for fp32 inputs (Triton's default would be tf32,
    ~1e-3 relative); irrelevant for bf16 inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        raise TypeError(f"{name} must be one of {allowed} for the Triton kernels, got {tensor.dtype}")


def check_scores_inputs(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> None:
    check_dtype("q", q, (torch.bfloat16, torch.float32))
    check_dtype("keys", keys, (q.dtype,))
    check_dtype("weights", weights, (torch.float32,))
