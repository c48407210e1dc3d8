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
    dcomb[j, k] = x[j] . dnew[k]. One program owns BLOCK_T tokens and walks their whole width."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < n_tokens
    rows = tokens.to(tl.int64)
    streams = tl.arange(0, H)

    # [BLOCK_T, H]
    post = tl.load(post_ptr + tokens[:, None] * H + streams[None, :], mask=token_ok[:, None], other=0.0)
    # [BLOCK_T, H, H]
    gate_offsets = tokens[:, None, None] * (H * H) + streams[None, :, None] * H + streams[None, None, :]
    comb = tl.load(comb_ptr + gate_offsets, mask=token_ok[:, None, None], other=0.0)
    # Elementwise partial sums over d, reduced once after the loop (no cross-thread reduction per tile).
    # [BLOCK_T, H, BLOCK_D]
    dpost_acc = tl.zeros([BLOCK_T, H, BLOCK_D], dtype=tl.float32)
    # [BLOCK_T, H (j), H (k), BLOCK_D]
    dcomb_acc = tl.zeros([BLOCK_T, H, H, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        tile_ok = token_ok[:, None] & (ds < D)[None, :]
        stream_offsets = rows[:, None, None] * (H * D) + streams[None, :, None] * D + ds[None, None, :]
        # [BLOCK_T, H, BLOCK_D]
        dnew = tl.load(dnew_ptr + stream_offsets, mask=tile_ok[:, None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + stream_offsets, mask=tile_ok[:, None, :], other=0.0).to(tl.float32)
        # [BLOCK_T, BLOCK_D]
        out = tl.load(out_ptr + rows[:, None] * D + ds[None, :], mask=tile_ok, other=0.0).to(tl.float32)

        dout = tl.sum(post[:, :, None] * dnew, axis=1)
        tl.store(dout_ptr + rows[:, None] * D + ds[None, :], dout.to(dout_ptr.dtype.element_ty), mask=tile_ok)
        # [BLOCK_T, H (j), BLOCK_D]
        dx = tl.sum(comb[:, :, :, None] * dnew[:, None, :, :], axis=2)
        tl.store(dx_ptr + stream_offsets, dx.to(dx_ptr.dtype.element_ty), mask=tile_ok[:, None, :])

        dpost_acc += dnew * out[:, None, :]
        dcomb_acc += x[:, :, None, :] * dnew[:, None, :, :]
    tl.store(dpost_ptr + tokens[:, None] * H + streams[None, :], tl.sum(dpost_acc, axis=2), mask=token_ok[:, None])
    tl.store(dcomb_ptr + gate_offsets, tl.sum(dcomb_acc, axis=3), mask=token_ok[:, None, None])


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
    # 2 tokens per program: the [BLOCK_T, H, H, BLOCK_D] dcomb accumulator is 32 fp32 per thread at H=4
    # with 4 warps; T/2 programs fill the SMs from 4096 tokens on.
    block_t, block_d = 2, min(128, triton.next_power_of_2(dim))
    grid = (triton.cdiv(n_tokens, block_t),)
    _mhc_expand_bwd_kernel[grid](
        dnew, x, out, post, comb, dx, dout, dpost, dcomb, n_tokens, H=hc, D=dim, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4
    )
    return dx, dout, dpost, dcomb
