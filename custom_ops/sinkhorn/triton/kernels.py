"""Triton Sinkhorn: the forward and backward of ``v4::sinkhorn`` for a block of tokens per program.

Every token's ``N x N`` matrix lives in registers as a slice of a ``[BLOCK_T, N, N]`` fp32 tile, so a
program normalises ``BLOCK_T`` matrices at once. The two ``sinkhorn_tile_*`` functions hold the math and
are shared with the mHC collapse kernels (custom_ops/mhc/triton), which run the same projection on
the mixing logits of every token.

Backward without a stored trajectory: the forward is recomputed in registers, keeping only the
denominator of every normalisation (``2 * ITERS - 1`` vectors of N values per token, a compile-time
tuple since ITERS is a constexpr). The backward then walks the normalisations in reverse and rebuilds
each step's input from its output, ``x = y * denominator``, which is exact up to one rounding per step.
Keeping the ``2 * ITERS - 1`` matrices themselves would need N times the registers (39 x 16 fp32 per
token at N=4, ITERS=20: they spill); recomputing the forward from the logits for every reverse step
costs ITERS**2 / 2 dependent normalisations, ~20x the forward's latency, which dominates at 4096 tokens.

N must be a power of two (``tl.arange``); contract.py's triton_applies sends other sizes to the reference.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def sinkhorn_tile_fwd(logits, ITERS: tl.constexpr, eps):
    """``[BLOCK_T, N, N]`` fp32 logits -> the Sinkhorn projection of each ``N x N`` slice (HF's order)."""
    probs = tl.exp(logits - tl.expand_dims(tl.max(logits, axis=2), 2))
    c = probs / tl.expand_dims(tl.sum(probs, axis=2), 2) + eps
    c = c / tl.expand_dims(tl.sum(c, axis=1) + eps, 1)  # columns
    for _ in range(ITERS - 1):
        c = c / tl.expand_dims(tl.sum(c, axis=2) + eps, 2)  # rows
        c = c / tl.expand_dims(tl.sum(c, axis=1) + eps, 1)  # columns
    return c


@triton.jit
def sinkhorn_tile_bwd(grad, logits, ITERS: tl.constexpr, eps):
    """Gradient w.r.t. the ``[BLOCK_T, N, N]`` fp32 logits of ``sum(grad * sinkhorn_tile_fwd(logits))``.

    For a step ``y = x / d`` with ``d = sum_dim(x) + eps``: ``dx = (dy - sum_dim(dy * y)) / d``; for the
    softmax ``p``: ``dlogits = p * (dp - sum(dp * p, -1))``; the ``+ eps`` after the softmax passes the
    gradient through.
    """
    probs = tl.exp(logits - tl.expand_dims(tl.max(logits, axis=2), 2))
    probs = probs / tl.expand_dims(tl.sum(probs, axis=2), 2)
    # Forward, keeping the denominators: col_dens[i] [BLOCK_T, 1, N] of column step i (0..ITERS-1),
    # row_dens[i] [BLOCK_T, N, 1] of row step i (1..ITERS-1, stored at i - 1).
    c = probs + eps
    col = tl.expand_dims(tl.sum(c, axis=1) + eps, 1)
    c = c / col
    col_dens = (col,)
    row_dens = ()
    for _ in tl.static_range(ITERS - 1):
        row = tl.expand_dims(tl.sum(c, axis=2) + eps, 2)
        c = c / row
        col = tl.expand_dims(tl.sum(c, axis=1) + eps, 1)
        c = c / col
        row_dens = row_dens + (row,)
        col_dens = col_dens + (col,)
    # Reverse walk; c is the output of the step being differentiated.
    g = grad
    for i in tl.static_range(ITERS - 1, 0, -1):
        g = (g - tl.expand_dims(tl.sum(g * c, axis=1), 1)) / col_dens[i]
        c = c * col_dens[i]
        g = (g - tl.expand_dims(tl.sum(g * c, axis=2), 2)) / row_dens[i - 1]
        c = c * row_dens[i - 1]
    g = (g - tl.expand_dims(tl.sum(g * c, axis=1), 1)) / col_dens[0]
    return probs * (g - tl.expand_dims(tl.sum(g * probs, axis=2), 2))


@triton.jit
def _sinkhorn_tile_offsets(pid, n_tokens, BLOCK_T: tl.constexpr, N: tl.constexpr):
    """Element offsets ``[BLOCK_T, N, N]`` of the tokens of program ``pid`` and their in-bounds mask."""
    tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tl.arange(0, N)
    cols = tl.arange(0, N)
    # [BLOCK_T, N, N]
    offsets = tokens[:, None, None] * (N * N) + rows[None, :, None] * N + cols[None, None, :]
    return offsets, offsets < n_tokens * (N * N)


@triton.jit
def _sinkhorn_fwd_kernel(logits_ptr, out_ptr, n_tokens, eps, N: tl.constexpr, ITERS: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    offsets, mask = _sinkhorn_tile_offsets(tl.program_id(0), n_tokens, BLOCK_T, N)
    # [BLOCK_T, N, N]; out-of-range tokens read 0 (a uniform matrix, finite) and are not stored.
    logits = tl.load(logits_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, sinkhorn_tile_fwd(logits, ITERS, eps), mask=mask)


@triton.jit
def _sinkhorn_bwd_kernel(grad_ptr, logits_ptr, dlogits_ptr, n_tokens, eps, N: tl.constexpr,
                         ITERS: tl.constexpr, BLOCK_T: tl.constexpr):
    offsets, mask = _sinkhorn_tile_offsets(tl.program_id(0), n_tokens, BLOCK_T, N)
    # [BLOCK_T, N, N]
    logits = tl.load(logits_ptr + offsets, mask=mask, other=0.0)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0)
    tl.store(dlogits_ptr + offsets, sinkhorn_tile_bwd(grad, logits, ITERS, eps), mask=mask)


def _block_t(n: int) -> int:
    """Tokens per one-warp program: ``BLOCK_T * N * N`` fp32 per tile, so the block shrinks as N grows.

    The op is latency-bound (2 * ITERS - 1 dependent normalisations), so small one-warp programs spread
    over every SM win. At N=4, ITERS=20 the backward with 8 tokens needs ~220 registers per thread
    (the denominators are replicated across the lanes that share a row or column) and does not
    spill; 16 tokens spills (ptxas, sm_90).
    """
    return max(1, 128 // (n * n))


def sinkhorn_fwd(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """``[..., N, N]`` contiguous fp32 logits (N a power of two) -> the projection, same shape / dtype."""
    assert logits.dtype == torch.float32 and logits.is_contiguous(), (logits.dtype, logits.stride())
    n = logits.shape[-1]
    n_tokens = logits.numel() // (n * n)
    out = torch.empty_like(logits)
    block_t = _block_t(n)
    grid = (triton.cdiv(n_tokens, block_t),)
    _sinkhorn_fwd_kernel[grid](logits, out, n_tokens, eps, N=n, ITERS=iters, BLOCK_T=block_t, num_warps=1)
    return out


def sinkhorn_bwd(grad: torch.Tensor, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Gradient w.r.t. the logits; ``grad`` and ``logits`` as in :func:`sinkhorn_fwd`."""
    assert grad.dtype == logits.dtype == torch.float32 and grad.is_contiguous() and logits.is_contiguous()
    n = logits.shape[-1]
    n_tokens = logits.numel() // (n * n)
    dlogits = torch.empty_like(logits)
    block_t = _block_t(n)
    grid = (triton.cdiv(n_tokens, block_t),)
    _sinkhorn_bwd_kernel[grid](grad, logits, dlogits, n_tokens, eps, N=n, ITERS=iters, BLOCK_T=block_t, num_warps=1)
    return dlogits
