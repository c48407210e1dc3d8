"""Triton kernels of ``v4::mhc_expand`` (HyperConnection.expand) and its backward.

Streams ``x [T, H, D]`` bf16 (T = tokens), sub-layer output ``out [T, D]`` bf16, gates ``post [T, H]``
and ``comb [T, H, H]`` fp32. Both kernels are one pass over the stream-sized tensors, mixing in fp32
registers and rounding once to bf16:

* forward  (tokens x D tiles):  reads x, out; writes new                        = (2H + 1) * D * 2 B/token
* backward (tokens, D looped): reads dnew, x, out; writes dx, dout; the per-token sums dpost and
  dcomb are accumulated elementwise over the D loop and reduced once         = (4H + 2) * D * 2 B/token
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _mhc_expand_fwd_kernel(
    x_ptr, out_ptr, post_ptr, comb_ptr, new_ptr, n_tokens,
    H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """new[t, k, d] = post[t, k] * out[t, d] + sum_j comb[t, j, k] * x[t, j, d]."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < n_tokens
    rows = tokens.to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    streams = tl.arange(0, H)
    tile_ok = token_ok[:, None] & (ds < D)[None, :]

    # [BLOCK_T, H]
    post = tl.load(post_ptr + tokens[:, None] * H + streams[None, :], mask=token_ok[:, None], other=0.0)
    # [BLOCK_T, BLOCK_D]
    out = tl.load(out_ptr + rows[:, None] * D + ds[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    # [BLOCK_T, H, BLOCK_D]
    new = post[:, :, None] * out[:, None, :]
    for j in tl.static_range(H):
        # [BLOCK_T, H]: row j of each token's comb, the weights of input stream j in every new stream
        comb_j = tl.load(comb_ptr + tokens[:, None] * (H * H) + j * H + streams[None, :], mask=token_ok[:, None], other=0.0)
        # [BLOCK_T, BLOCK_D]
        x_j = tl.load(x_ptr + rows[:, None] * (H * D) + j * D + ds[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        new += comb_j[:, :, None] * x_j[:, None, :]
    new_ptrs = new_ptr + rows[:, None, None] * (H * D) + streams[None, :, None] * D + ds[None, None, :]
    tl.store(new_ptrs, new.to(new_ptr.dtype.element_ty), mask=tile_ok[:, None, :])


@triton.jit
def _mhc_expand_bwd_kernel(
    dnew_ptr, x_ptr, out_ptr, post_ptr, comb_ptr, dx_ptr, dout_ptr, dpost_ptr, dcomb_ptr, n_tokens,
    H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx[j] = sum_k comb[j, k] dnew[k]; dout = sum_k post[k] dnew[k]; dpost[k] = dnew[k] . out;
    dcomb[j, k] = x[j] . dnew[k]. One program owns BLOCK_T tokens and walks their whole width.

    Every stream is its own [BLOCK_T, BLOCK_D] tile and the gates are per-token [BLOCK_T] vectors
    (compile-time tuples), so the 4 x 4 mixing is elementwise: nothing moves between threads inside
    the loop. The per-token sums over d are accumulated elementwise and reduced once at the end.
    """
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < n_tokens
    rows = tokens.to(tl.int64)

    # post[k] and comb[j * H + k]: [BLOCK_T] each
    post = ()
    for k in tl.static_range(H):
        post = post + (tl.load(post_ptr + tokens * H + k, mask=token_ok, other=0.0),)
    comb = ()
    for jk in tl.static_range(H * H):
        comb = comb + (tl.load(comb_ptr + tokens * (H * H) + jk, mask=token_ok, other=0.0),)
    # dpost_acc[k], dcomb_acc[j * H + k]: [BLOCK_T, BLOCK_D] each
    dpost_acc = ()
    for k in tl.static_range(H):
        dpost_acc = dpost_acc + (tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32),)
    dcomb_acc = ()
    for jk in tl.static_range(H * H):
        dcomb_acc = dcomb_acc + (tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32),)

    # [1, BLOCK_D] column offsets, built once in the tiles' layout (a 1-D index inside the loop would be
    # converted between layouts every iteration).
    cols = tl.arange(0, BLOCK_D)[None, :]
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + cols
        tile_ok = token_ok[:, None] & (ds < D)
        stream_rows = rows[:, None] * (H * D) + ds
        # [BLOCK_T, BLOCK_D]
        out = tl.load(out_ptr + rows[:, None] * D + ds, mask=tile_ok, other=0.0).to(tl.float32)
        dnew = ()  # dnew[k]: [BLOCK_T, BLOCK_D]
        for k in tl.static_range(H):
            dnew = dnew + (tl.load(dnew_ptr + stream_rows + k * D, mask=tile_ok, other=0.0).to(tl.float32),)

        dout = post[0][:, None] * dnew[0]
        for k in tl.static_range(1, H):
            dout += post[k][:, None] * dnew[k]
        tl.store(dout_ptr + rows[:, None] * D + ds, dout.to(dout_ptr.dtype.element_ty), mask=tile_ok)
        next_dpost = ()
        for k in tl.static_range(H):
            next_dpost = next_dpost + (dpost_acc[k] + dnew[k] * out,)
        dpost_acc = next_dpost

        next_dcomb = ()
        for j in tl.static_range(H):
            # [BLOCK_T, BLOCK_D]
            x_j = tl.load(x_ptr + stream_rows + j * D, mask=tile_ok, other=0.0).to(tl.float32)
            dx_j = comb[j * H][:, None] * dnew[0]
            for k in tl.static_range(1, H):
                dx_j += comb[j * H + k][:, None] * dnew[k]
            tl.store(dx_ptr + stream_rows + j * D, dx_j.to(dx_ptr.dtype.element_ty), mask=tile_ok)
            for k in tl.static_range(H):
                next_dcomb = next_dcomb + (dcomb_acc[j * H + k] + x_j * dnew[k],)
        dcomb_acc = next_dcomb

    for k in tl.static_range(H):
        tl.store(dpost_ptr + tokens * H + k, tl.sum(dpost_acc[k], axis=1), mask=token_ok)
    for jk in tl.static_range(H * H):
        tl.store(dcomb_ptr + tokens * (H * H) + jk, tl.sum(dcomb_acc[jk], axis=1), mask=token_ok)


def _shape(x: torch.Tensor) -> tuple[int, int, int]:
    hc, dim = x.shape[-2:]
    return x.numel() // (hc * dim), hc, dim


def mhc_expand_fwd(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """``x [..., H, D]`` bf16, ``out [..., D]`` bf16, ``post [..., H]`` / ``comb [..., H, H]`` fp32, all
    contiguous -> new streams ``[..., H, D]`` bf16."""
    assert x.dtype == out.dtype == torch.bfloat16 and post.dtype == comb.dtype == torch.float32
    assert x.is_contiguous() and out.is_contiguous() and post.is_contiguous() and comb.is_contiguous()
    n_tokens, hc, dim = _shape(x)
    new = torch.empty_like(x)
    # 4 tokens x 512 columns x H streams per program: 8 KiB of x per program at H=4, enough
    # programs (T/4 * D/512) to fill every SM at 4096 tokens.
    block_t, block_d = 4, min(512, triton.next_power_of_2(dim))
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(dim, block_d))
    _mhc_expand_fwd_kernel[grid](x, out, post, comb, new, n_tokens, H=hc, D=dim, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return new


def mhc_expand_bwd(
    dnew: torch.Tensor, x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`mhc_expand_fwd`: dx ``[..., H, D]`` bf16, dout ``[..., D]`` bf16, dpost
    ``[..., H]`` fp32, dcomb ``[..., H, H]`` fp32 (every element written by exactly one program)."""
    assert dnew.dtype == x.dtype == out.dtype == torch.bfloat16 and post.dtype == comb.dtype == torch.float32
    assert dnew.is_contiguous() and x.is_contiguous() and out.is_contiguous()
    n_tokens, hc, dim = _shape(x)
    dx, dout = torch.empty_like(x), torch.empty_like(out)
    dpost, dcomb = torch.empty_like(post), torch.empty_like(comb)
    # 2 tokens x 256 columns per tile: the H + H*H = 20 accumulator tiles are 80 fp32 per thread with 4
    # warps at H=4; T/2 programs fill the SMs from 4096 tokens on.
    block_t, block_d = 2, min(256, triton.next_power_of_2(dim))
    grid = (triton.cdiv(n_tokens, block_t),)
    _mhc_expand_bwd_kernel[grid](
        dnew, x, out, post, comb, dx, dout, dpost, dcomb, n_tokens, H=hc, D=dim, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4
    )
    return dx, dout, dpost, dcomb
