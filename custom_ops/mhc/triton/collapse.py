"""Triton kernels of ``v4::mhc_collapse`` (HyperConnection.collapse), ``v4::mhc_head`` (HyperHead)
and their backward.

Streams ``x [T, H, D]`` bf16 (T = tokens), ``K = H * D``; mixing weights ``fn [M, K]`` fp32 with
M = (2 + H) * H mixes for the collapse (pre, post, comb) or M = H for the head (pre only; the
constexpr WITH_MIX switches the post / comb parts off). The rms statistic commutes with the linear
map, ``logits = (flat(x) @ fn.T) * rstd``, so one pass over x gives both.

Forward, two passes over x:
  1. ``_mhc_collapse_fwd_dots_kernel`` (token blocks x split-K): the skinny GEMM ``x @ fn.T`` and
     ``sum(x**2)`` as fp32 split-K partials (reads x once: 2K B/token).
  2. ``_mhc_collapse_fwd_kernel`` (token blocks): reduces the partials in a fixed order, applies the
     gates and the Sinkhorn projection per token in registers, writes post / comb / logits / rstd and
     the weighted stream sum (reads x again, writes collapsed: 2K + 2D B/token).
Backward, two passes:
  3. ``_mhc_collapse_bwd_gates_kernel`` (token blocks): ``dpre = dcollapsed . x[h]`` (reads x and
     dcollapsed: 2K + 2D B/token), then per token the gate / Sinkhorn backward giving the gradient
     of the raw mixes ``dmix [T, M]``, pre, the rms coefficient ``xcoef`` and per-block partial sums
     of dbase / dscale.
  4. ``_mhc_collapse_bwd_dx_kernel`` (column blocks of one stream, all tokens in a loop):
     ``dx = pre * dcollapsed + dmix @ fn + xcoef * x`` (reads x, dcollapsed, writes dx: 4K + 2D
     B/token) and ``dfn = dmix.T @ x`` accumulated in registers over the token loop, so dfn is a
     deterministic fixed-order sum without atomics or an fp32 copy of x.

Matmul precision: x is bf16, fn and dmix are fp32. A fp32 operand is split exactly into three bf16
pieces (8 + 8 + 8 significand bits) and multiplied piece by piece on the tensor cores with fp32
accumulation, which is an fp32 GEMM up to the accumulation order (``dx`` keeps the three largest of
the nine products of two split operands: 2**-16 relative, far below its bf16 rounding).
"""

import torch
import triton
import triton.language as tl

from ...sinkhorn.triton import sinkhorn_tile_bwd, sinkhorn_tile_fwd


@triton.jit
def _bf16_pieces(v):
    """fp32 ``v`` -> bf16 ``(p0, p1, p2)`` with ``v == p0 + p1 + p2`` exactly (normal range)."""
    p0 = v.to(tl.bfloat16)
    rest = v - p0.to(tl.float32)
    p1 = rest.to(tl.bfloat16)
    p2 = (rest - p1.to(tl.float32)).to(tl.bfloat16)
    return p0, p1, p2


@triton.jit
def _load_logits(dots_ptr, logits_ptr, rows, cols, mask, rstd, n_tokens, M: tl.constexpr, M_PAD: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    """``logits[row, col] = rstd * sum_s dots[s, row, col]`` (fixed split order); stored and returned."""
    partials = dots_ptr + rows * M_PAD + cols
    dots = tl.load(partials, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        dots += tl.load(partials + s * n_tokens * M_PAD, mask=mask, other=0.0)
    logits = dots * rstd
    tl.store(logits_ptr + rows * M + cols, logits, mask=mask)
    return logits


@triton.jit
def _mhc_collapse_fwd_dots_kernel(
    x_ptr, fn_ptr, dots_ptr, sumsq_ptr, n_tokens,
    K: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Split-K partials over the K columns ``split, split + SPLIT_K, ...`` (in BLOCK_K chunks):
    ``dots[split, t, m] = sum_k x[t, k] * fn[m, k]`` and ``sumsq[split, t] = sum_k x[t, k]**2``."""
    split = tl.program_id(1)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < n_tokens
    mixes = tl.arange(0, M_PAD)
    x_rows = x_ptr + tokens.to(tl.int64)[:, None] * K
    # [BLOCK_T, M_PAD]
    dots = tl.zeros([BLOCK_T, M_PAD], dtype=tl.float32)
    # [BLOCK_T]
    sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(split * BLOCK_K, K, SPLIT_K * BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        # [BLOCK_T, BLOCK_K] bf16
        x = tl.load(x_rows + ks[None, :], mask=token_ok[:, None] & (ks < K)[None, :], other=0.0)
        # [BLOCK_K, M_PAD] fp32, fn transposed; padded mixes read 0
        fn = tl.load(fn_ptr + mixes[None, :] * K + ks[:, None], mask=(mixes < M)[None, :] & (ks < K)[:, None], other=0.0)
        fn0, fn1, fn2 = _bf16_pieces(fn)
        dots = tl.dot(x, fn0, dots)
        dots = tl.dot(x, fn1, dots)
        dots = tl.dot(x, fn2, dots)
        xf = x.to(tl.float32)
        sumsq += tl.sum(xf * xf, axis=1)
    out_rows = split * n_tokens + tokens
    tl.store(dots_ptr + out_rows[:, None] * M_PAD + mixes[None, :], dots, mask=token_ok[:, None])
    tl.store(sumsq_ptr + out_rows, sumsq, mask=token_ok)


@triton.jit
def _mhc_collapse_fwd_kernel(
    x_ptr, dots_ptr, sumsq_ptr, base_ptr, scale_ptr,
    out_ptr, post_ptr, comb_ptr, logits_ptr, rstd_ptr,
    n_tokens, hc_eps, norm_eps,
    H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr, SPLIT_K: tl.constexpr,
    ITERS: tl.constexpr, WITH_MIX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gates of BLOCK_T tokens from the split-K partials, then ``out = sum_h pre[h] * x[h]``."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < n_tokens
    streams = tl.arange(0, H)

    # [BLOCK_T]
    sumsq = tl.load(sumsq_ptr + tokens, mask=token_ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        sumsq += tl.load(sumsq_ptr + s * n_tokens + tokens, mask=token_ok, other=0.0)
    rstd = tl.rsqrt(sumsq / (H * D) + norm_eps)
    tl.store(rstd_ptr + tokens, rstd, mask=token_ok)

    # [BLOCK_T, H]
    logits_pre = _load_logits(dots_ptr, logits_ptr, tokens[:, None], streams[None, :], token_ok[:, None],
                              rstd[:, None], n_tokens, M, M_PAD, SPLIT_K)
    pre = tl.sigmoid(logits_pre * tl.load(scale_ptr) + tl.load(base_ptr + streams)[None, :]) + hc_eps
    if WITH_MIX:
        # [BLOCK_T, H]
        logits_post = _load_logits(dots_ptr, logits_ptr, tokens[:, None], H + streams[None, :], token_ok[:, None],
                                   rstd[:, None], n_tokens, M, M_PAD, SPLIT_K)
        post = 2.0 * tl.sigmoid(logits_post * tl.load(scale_ptr + 1) + tl.load(base_ptr + H + streams)[None, :])
        tl.store(post_ptr + tokens[:, None] * H + streams[None, :], post, mask=token_ok[:, None])
        # [BLOCK_T, H, H]; comb entry (i, j) is mix 2H + i * H + j
        comb_cols = 2 * H + streams[:, None] * H + streams[None, :]
        logits_comb = _load_logits(dots_ptr, logits_ptr, tokens[:, None, None], comb_cols[None, :, :],
                                   token_ok[:, None, None], rstd[:, None, None], n_tokens, M, M_PAD, SPLIT_K)
        comb_in = logits_comb * tl.load(scale_ptr + 2) + tl.load(base_ptr + comb_cols)[None, :, :]
        comb = sinkhorn_tile_fwd(comb_in, ITERS, hc_eps)
        comb_offsets = tokens[:, None, None] * (H * H) + streams[None, :, None] * H + streams[None, None, :]
        tl.store(comb_ptr + comb_offsets, comb, mask=token_ok[:, None, None])

    rows = tokens.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        tile_ok = token_ok[:, None] & (ds < D)[None, :]
        # [BLOCK_T, H, BLOCK_D]
        x = tl.load(x_ptr + rows[:, None, None] * (H * D) + streams[None, :, None] * D + ds[None, None, :],
                    mask=tile_ok[:, None, :], other=0.0)
        # [BLOCK_T, BLOCK_D]
        out = tl.sum(pre[:, :, None] * x.to(tl.float32), axis=1)
        tl.store(out_ptr + rows[:, None] * D + ds[None, :], out.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _mhc_collapse_bwd_gates_kernel(
    dcollapsed_ptr, dpost_ptr, dcomb_ptr, x_ptr, base_ptr, scale_ptr, logits_ptr, rstd_ptr,
    dmix_ptr, pre_ptr, xcoef_ptr, dbase_part_ptr, dscale_part_ptr,
    n_tokens, hc_eps,
    H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, ITERS: tl.constexpr, WITH_MIX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per token: dpre = dcollapsed . x[h], the gate / Sinkhorn backward, and what pass 4 needs:
    ``dmix = dlogits * rstd`` (gradient of the raw mixes), ``pre`` and
    ``xcoef = -(dlogits . logits) * rstd**2 / K``; plus this block's partial sums of
    ``dbase = sum_t dz`` and ``dscale[g] = sum_t dz_g . logits_g`` (dz: gradient of the gate inputs)."""
    pid = tl.program_id(0)
    tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < n_tokens
    rows = tokens.to(tl.int64)
    streams = tl.arange(0, H)

    # dpre_acc[h]: [BLOCK_T, BLOCK_D] elementwise partial products over d, reduced once after the loop
    # (one tile per stream: no data moves between threads inside the loop).
    dpre_acc = ()
    for h in tl.static_range(H):
        dpre_acc = dpre_acc + (tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32),)
    # [1, BLOCK_D] column offsets, built once in the tiles' layout.
    cols = tl.arange(0, BLOCK_D)[None, :]
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + cols
        tile_ok = token_ok[:, None] & (ds < D)
        # [BLOCK_T, BLOCK_D]
        dcollapsed = tl.load(dcollapsed_ptr + rows[:, None] * D + ds, mask=tile_ok, other=0.0).to(tl.float32)
        next_acc = ()
        for h in tl.static_range(H):
            x_h = tl.load(x_ptr + rows[:, None] * (H * D) + h * D + ds, mask=tile_ok, other=0.0)
            next_acc = next_acc + (dpre_acc[h] + x_h.to(tl.float32) * dcollapsed,)
        dpre_acc = next_acc
    # [BLOCK_T, H]
    dpre = tl.zeros([BLOCK_T, H], dtype=tl.float32)
    for h in tl.static_range(H):
        dpre = tl.where(streams[None, :] == h, tl.sum(dpre_acc[h], axis=1)[:, None], dpre)
    # [BLOCK_T]
    rstd = tl.load(rstd_ptr + tokens, mask=token_ok, other=0.0)

    # Masked tokens read zero gradients, so they add nothing to the partial sums below.
    # [BLOCK_T, H]
    pre_offsets = tokens[:, None] * M + streams[None, :]
    logits_pre = tl.load(logits_ptr + pre_offsets, mask=token_ok[:, None], other=0.0)
    scale_pre = tl.load(scale_ptr)
    sig_pre = tl.sigmoid(logits_pre * scale_pre + tl.load(base_ptr + streams)[None, :])
    tl.store(pre_ptr + tokens[:, None] * H + streams[None, :], sig_pre + hc_eps, mask=token_ok[:, None])
    dz_pre = dpre * sig_pre * (1.0 - sig_pre)
    tl.store(dmix_ptr + pre_offsets, dz_pre * scale_pre * rstd[:, None], mask=token_ok[:, None])
    tl.store(dbase_part_ptr + pid * M + streams, tl.sum(dz_pre, axis=0))
    # [BLOCK_T]: dlogits . logits, summed over the groups
    dlogits_dot_logits = tl.sum(dz_pre * scale_pre * logits_pre, axis=1)
    if WITH_MIX:
        tl.store(dscale_part_ptr + pid * 3, tl.sum(tl.sum(dz_pre * logits_pre, axis=1), axis=0))
        # [BLOCK_T, H]
        post_offsets = tokens[:, None] * M + H + streams[None, :]
        logits_post = tl.load(logits_ptr + post_offsets, mask=token_ok[:, None], other=0.0)
        scale_post = tl.load(scale_ptr + 1)
        sig_post = tl.sigmoid(logits_post * scale_post + tl.load(base_ptr + H + streams)[None, :])
        dpost = tl.load(dpost_ptr + tokens[:, None] * H + streams[None, :], mask=token_ok[:, None], other=0.0)
        dz_post = dpost * 2.0 * sig_post * (1.0 - sig_post)
        tl.store(dmix_ptr + post_offsets, dz_post * scale_post * rstd[:, None], mask=token_ok[:, None])
        tl.store(dbase_part_ptr + pid * M + H + streams, tl.sum(dz_post, axis=0))
        tl.store(dscale_part_ptr + pid * 3 + 1, tl.sum(tl.sum(dz_post * logits_post, axis=1), axis=0))
        dlogits_dot_logits += tl.sum(dz_post * scale_post * logits_post, axis=1)

        # [BLOCK_T, H, H]
        comb_cols = 2 * H + streams[:, None] * H + streams[None, :]
        comb_offsets = tokens[:, None, None] * M + comb_cols[None, :, :]
        logits_comb = tl.load(logits_ptr + comb_offsets, mask=token_ok[:, None, None], other=0.0)
        scale_comb = tl.load(scale_ptr + 2)
        comb_in = logits_comb * scale_comb + tl.load(base_ptr + comb_cols)[None, :, :]
        gate_offsets = tokens[:, None, None] * (H * H) + streams[None, :, None] * H + streams[None, None, :]
        dcomb = tl.load(dcomb_ptr + gate_offsets, mask=token_ok[:, None, None], other=0.0)
        dz_comb = sinkhorn_tile_bwd(dcomb, comb_in, ITERS, hc_eps)
        tl.store(dmix_ptr + comb_offsets, dz_comb * scale_comb * rstd[:, None, None], mask=token_ok[:, None, None])
        tl.store(dbase_part_ptr + pid * M + comb_cols, tl.sum(dz_comb, axis=0))
        tl.store(dscale_part_ptr + pid * 3 + 2, tl.sum(tl.sum(tl.sum(dz_comb * logits_comb, axis=2), axis=1), axis=0))
        dlogits_dot_logits += tl.sum(tl.sum(dz_comb * scale_comb * logits_comb, axis=2), axis=1)
    else:
        tl.store(dscale_part_ptr + pid, tl.sum(tl.sum(dz_pre * logits_pre, axis=1), axis=0))
    tl.store(xcoef_ptr + tokens, -dlogits_dot_logits * rstd * rstd / (H * D), mask=token_ok)


@triton.jit
def _mhc_collapse_bwd_dx_kernel(
    dcollapsed_ptr, x_ptr, fn_ptr, dmix_ptr, pre_ptr, xcoef_ptr, dx_ptr, dfn_ptr, n_tokens,
    H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Columns ``h * D + [d0, d0 + BLOCK_D)`` of stream h, every token:
    ``dx = pre[h] * dcollapsed + dmix @ fn + xcoef * x`` and ``dfn = sum_t dmix[t].T x[t]``."""
    # The H programs of one column block are neighbours, so they share dcollapsed through L2.
    h = tl.program_id(0) % H
    ds = (tl.program_id(0) // H) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    ks = h * D + ds
    mixes = tl.arange(0, M_PAD)
    mix_ok = mixes < M
    # [M_PAD, BLOCK_D]
    fn = tl.load(fn_ptr + mixes[:, None] * (H * D) + ks[None, :], mask=mix_ok[:, None] & d_ok[None, :], other=0.0)
    fn0, fn1, _ = _bf16_pieces(fn)
    # dfn transposed: the column block is the dot's M dimension (>= 64 rows, a Hopper warpgroup MMA
    # with x^T from shared memory; M_PAD = 32 rows would fall back to the older MMA in registers).
    # [BLOCK_D, M_PAD]
    dfn_t = tl.zeros([BLOCK_D, M_PAD], dtype=tl.float32)
    for t0 in range(0, n_tokens, BLOCK_T):
        tokens = t0 + tl.arange(0, BLOCK_T)
        token_ok = tokens < n_tokens
        rows = tokens.to(tl.int64)
        tile_ok = token_ok[:, None] & d_ok[None, :]
        # [BLOCK_T, BLOCK_D]
        x = tl.load(x_ptr + rows[:, None] * (H * D) + ks[None, :], mask=tile_ok, other=0.0)
        dcollapsed = tl.load(dcollapsed_ptr + rows[:, None] * D + ds[None, :], mask=tile_ok, other=0.0)
        # [BLOCK_T, M_PAD]
        dmix = tl.load(dmix_ptr + tokens[:, None] * M + mixes[None, :], mask=token_ok[:, None] & mix_ok[None, :], other=0.0)
        # [BLOCK_T]
        pre = tl.load(pre_ptr + tokens * H + h, mask=token_ok, other=0.0)
        xcoef = tl.load(xcoef_ptr + tokens, mask=token_ok, other=0.0)

        dmix0, dmix1, dmix2 = _bf16_pieces(dmix)
        # [BLOCK_T, BLOCK_D]
        mixed = tl.dot(dmix0, fn0)
        mixed = tl.dot(dmix0, fn1, mixed)
        mixed = tl.dot(dmix1, fn0, mixed)
        dx = pre[:, None] * dcollapsed.to(tl.float32) + mixed + xcoef[:, None] * x.to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * (H * D) + ks[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        # Masked tokens have dmix = 0 and x = 0: they add nothing.
        # [BLOCK_D, BLOCK_T]
        x_t = tl.trans(x)
        dfn_t = tl.dot(x_t, dmix0, dfn_t)
        dfn_t = tl.dot(x_t, dmix1, dfn_t)
        dfn_t = tl.dot(x_t, dmix2, dfn_t)
    tl.store(dfn_ptr + mixes[None, :] * (H * D) + ks[:, None], dfn_t, mask=mix_ok[None, :] & d_ok[:, None])


# ---------------------------------------------------------------------------------- launchers
def _num_sms(device: torch.device) -> int:
    # The interpreter (CPU tensors) has no SM count; 1 keeps its grids small but still split-K.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _check(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor) -> tuple[int, int, int, int]:
    assert x.dtype == torch.bfloat16 and fn.dtype == base.dtype == scale.dtype == torch.float32, (x.dtype, fn.dtype)
    assert x.is_contiguous() and fn.is_contiguous() and base.is_contiguous() and scale.is_contiguous()
    hc, dim = x.shape[-2:]
    return x.numel() // (hc * dim), hc, dim, fn.shape[0]


def _m_pad(mixes: int) -> int:
    return max(16, triton.next_power_of_2(mixes))  # tl.dot needs every dim >= 16


def _collapse_fwd(x, fn, base, scale, hc_eps, norm_eps, sinkhorn_iters, with_mix):
    n_tokens, hc, dim, mixes = _check(x, fn, base, scale)
    width, m_pad = hc * dim, _m_pad(mixes)
    lead = x.shape[:-2]

    # Pass 1. 64 tokens per program reuse each fn tile 64 times (fn is 1.5 MiB at Flash width, read
    # from L2 once per token block); split K until there are ~2 programs per SM (4096 tokens: 4 splits).
    block_t, block_k = 64, min(128, max(16, triton.next_power_of_2(width)))
    token_blocks, chunks = triton.cdiv(n_tokens, block_t), triton.cdiv(width, block_k)
    split_k = max(1, min(chunks, 8, triton.cdiv(2 * _num_sms(x.device), token_blocks)))
    dots = torch.empty((split_k, n_tokens, m_pad), dtype=torch.float32, device=x.device)
    sumsq = torch.empty((split_k, n_tokens), dtype=torch.float32, device=x.device)
    _mhc_collapse_fwd_dots_kernel[(token_blocks, split_k)](
        x, fn, dots, sumsq, n_tokens, K=width, M=mixes, M_PAD=m_pad, BLOCK_T=block_t, BLOCK_K=block_k,
        SPLIT_K=split_k, num_warps=4, num_stages=3,
    )

    # Pass 2. 4 tokens per program: the Sinkhorn tile [4, H, H] and an x tile of [4, H, 256].
    out = x.new_empty((*lead, dim))
    logits = torch.empty((*lead, mixes), dtype=torch.float32, device=x.device)
    rstd = torch.empty(lead, dtype=torch.float32, device=x.device)
    post = torch.empty((*lead, hc), dtype=torch.float32, device=x.device) if with_mix else None
    comb = torch.empty((*lead, hc, hc), dtype=torch.float32, device=x.device) if with_mix else None
    block_t, block_d = 4, min(256, triton.next_power_of_2(dim))
    _mhc_collapse_fwd_kernel[(triton.cdiv(n_tokens, block_t),)](
        x, dots, sumsq, base, scale, out, post, comb, logits, rstd, n_tokens, hc_eps, norm_eps,
        H=hc, D=dim, M=mixes, M_PAD=m_pad, SPLIT_K=split_k, ITERS=sinkhorn_iters, WITH_MIX=with_mix,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return out, post, comb, logits, rstd


def _collapse_bwd(dcollapsed, dpost, dcomb, x, fn, base, scale, logits, rstd, hc_eps, sinkhorn_iters, with_mix):
    n_tokens, hc, dim, mixes = _check(x, fn, base, scale)
    assert dcollapsed.dtype == torch.bfloat16 and dcollapsed.is_contiguous()
    device = x.device

    # Pass 3. 4 tokens per program (the Sinkhorn backward tile is [4, H, H]).
    block_t, block_d = 4, min(256, triton.next_power_of_2(dim))
    blocks = triton.cdiv(n_tokens, block_t)
    dmix = torch.empty((n_tokens, mixes), dtype=torch.float32, device=device)
    pre = torch.empty((n_tokens, hc), dtype=torch.float32, device=device)
    xcoef = torch.empty(n_tokens, dtype=torch.float32, device=device)
    dbase_part = torch.empty((blocks, mixes), dtype=torch.float32, device=device)
    dscale_part = torch.empty((blocks, scale.numel()), dtype=torch.float32, device=device)
    _mhc_collapse_bwd_gates_kernel[(blocks,)](
        dcollapsed, dpost, dcomb, x, base, scale, logits, rstd, dmix, pre, xcoef, dbase_part, dscale_part,
        n_tokens, hc_eps, H=hc, D=dim, M=mixes, ITERS=sinkhorn_iters, WITH_MIX=with_mix,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )

    # Pass 4. One program per (stream, 64 columns): H * D / 64 = 256 programs at Flash width, each
    # streaming all tokens in blocks of 64 with a pipelined loop. 64 x 64 tiles with 4 warps fit the
    # registers (255, no spills with ptxas for sm_90); 64 x 128 spills.
    dx, dfn = torch.empty_like(x), torch.empty_like(fn)
    block_t, block_d = 64, min(64, max(16, triton.next_power_of_2(dim)))
    _mhc_collapse_bwd_dx_kernel[(hc * triton.cdiv(dim, block_d),)](
        dcollapsed, x, fn, dmix, pre, xcoef, dx, dfn, n_tokens, H=hc, D=dim, M=mixes, M_PAD=_m_pad(mixes),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4, num_stages=3,
    )
    # Fixed-order sums of the per-block partials: deterministic.
    return dx, dfn, dbase_part.sum(0), dscale_part.sum(0)


def mhc_collapse_fwd(x, fn, base, scale, hc_eps: float, norm_eps: float, sinkhorn_iters: int):
    """``x [..., H, D]`` bf16, fn ``[(2+H)H, HD]`` / base / scale ``[3]`` fp32, all contiguous ->
    collapsed ``[..., D]`` bf16, post ``[..., H]``, comb ``[..., H, H]``, logits ``[..., (2+H)H]``,
    rstd ``[...]`` fp32 (reference.collapse_fwd)."""
    return _collapse_fwd(x, fn, base, scale, hc_eps, norm_eps, sinkhorn_iters, with_mix=True)


def mhc_collapse_bwd(dcollapsed, dpost, dcomb, x, fn, base, scale, logits, rstd, hc_eps: float, sinkhorn_iters: int):
    """dx ``[..., H, D]`` bf16, dfn, dbase, dscale fp32 (reference.collapse_bwd); no fp32 copy of x."""
    assert dpost.dtype == dcomb.dtype == torch.float32 and dpost.is_contiguous() and dcomb.is_contiguous()
    return _collapse_bwd(dcollapsed, dpost, dcomb, x, fn, base, scale, logits, rstd, hc_eps, sinkhorn_iters, with_mix=True)


def mhc_head_fwd(x, fn, base, scale, hc_eps: float, norm_eps: float):
    """``x [..., H, D]`` bf16, fn ``[H, HD]`` / base ``[H]`` / scale ``[1]`` fp32 -> out ``[..., D]``
    bf16, logits ``[..., H]``, rstd ``[...]`` fp32 (reference.head_fwd)."""
    out, _, _, logits, rstd = _collapse_fwd(x, fn, base, scale, hc_eps, norm_eps, 1, with_mix=False)
    return out, logits, rstd


def mhc_head_bwd(dout, x, fn, base, scale, logits, rstd, hc_eps: float):
    """dx bf16, dfn, dbase, dscale fp32 (reference.head_bwd)."""
    return _collapse_bwd(dout, None, None, x, fn, base, scale, logits, rstd, hc_eps, 1, with_mix=False)
