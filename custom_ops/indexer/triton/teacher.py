"""Triton kernel of ``v4::indexer_teacher``: the main attention's head-summed probability mass.

Kernel -> launcher. One program per (query, batch element): for a block of entries, the logits of all
H heads ``[H, BLOCK_N]`` (the 512-wide head dim walked in BLOCK_D slices), then
``log_mass[s] = logsumexp_h(scale * q[h] . pool[s] - L[h])`` with ``L = logaddexp(lse, sink)``.
Every visible entry is walked once for ``log_visible`` (an online logsumexp kept per lane of the
block); listed entries (when indices are given) are walked a second time, gathered.
"""

import torch
import triton
import triton.language as tl

from ...documents import first_entries
from ..contract import TeacherInputs, TeacherOutputs, n_listed
from .common import _entry_block, _visible_range, block, check_dtype, dot_precision


@triton.jit
def _head_summed_log_mass(
    q_row_ptr, pool_b_ptr, entry, valid, denom, scale,
    stride_qh, stride_pp,
    H: tl.constexpr, D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``log sum_h exp(scale * q[h] . pool[entry] - denom[h])`` per entry ``[BLOCK_N]``; -inf where not valid."""
    offs_h = tl.arange(0, BLOCK_H)
    # [BLOCK_H, BLOCK_N]
    x = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        # [BLOCK_H, BLOCK_D]
        q = tl.load(
            q_row_ptr + offs_h[:, None] * stride_qh + offs_d[None, :],
            mask=(offs_h[:, None] < H) & (offs_d[None, :] < D), other=0.0,
        )
        # [BLOCK_N, BLOCK_D]
        p = tl.load(
            pool_b_ptr + entry[:, None] * stride_pp + offs_d[None, :],
            mask=valid[:, None] & (offs_d[None, :] < D), other=0.0,
        )
        x += tl.dot(q, tl.trans(p), input_precision=PRECISION)
    # [BLOCK_H, BLOCK_N]
    logp = tl.where(offs_h[:, None] < H, x * scale - denom[:, None], float("-inf"))
    # [BLOCK_N]
    top = tl.max(logp, axis=0)
    mass = top + tl.log(tl.sum(tl.exp(logp - top[None, :]), axis=0))
    return tl.where(valid, mass, float("-inf"))


@triton.jit
def _indexer_teacher_fwd_kernel(
    q_ptr, pool_ptr, lse_ptr, sink_ptr, idx_ptr, first_ptr, mass_ptr, visible_ptr,
    scale, P, N_LISTED, RATIO,
    stride_qb, stride_qs, stride_qh,
    stride_pb, stride_pp,
    stride_lb, stride_ls,
    stride_ib, stride_is,
    stride_fb,
    stride_mb, stride_ms,
    stride_vb,
    H: tl.constexpr, D: tl.constexpr, LISTED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """log_mass (listed entries, or every visible one) and log_visible of query ``program_id(0)``."""
    t = tl.program_id(0)
    b = tl.program_id(1)
    n_first, n_vis, n_start = _visible_range(first_ptr, b, t, stride_fb, P, RATIO, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    # [BLOCK_H]: the attention's full softmax denominator per head, sink included
    lse = tl.load(lse_ptr + b * stride_lb + t * stride_ls + offs_h, mask=offs_h < H, other=0.0)
    sink = tl.load(sink_ptr + offs_h, mask=offs_h < H, other=0.0)
    top = tl.maximum(lse, sink)
    denom = top + tl.log(tl.exp(lse - top) + tl.exp(sink - top))
    q_row_ptr = q_ptr + b * stride_qb + t * stride_qs
    pool_b_ptr = pool_ptr + b * stride_pb
    mass_row_ptr = mass_ptr + b * stride_mb + t * stride_ms

    # Every visible entry: an online logsumexp per lane of the block, [BLOCK_N] each.
    run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(n_start, n_vis, BLOCK_N):
        # [BLOCK_N] each
        offs_n, entry, valid = _entry_block(idx_ptr, n0, n_first, n_vis, N_LISTED, False, BLOCK_N)
        mass = _head_summed_log_mass(
            q_row_ptr, pool_b_ptr, entry, valid, denom, scale, stride_qh, stride_pp,
            H, D, BLOCK_H, BLOCK_D, BLOCK_N, PRECISION,
        )  # fmt: skip
        if not LISTED:
            tl.store(mass_row_ptr + offs_n, mass, mask=valid)
        new_max = tl.maximum(run_max, mass)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # a lane that has seen nothing yet
        run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(mass - safe)
        run_max = new_max
    total_max = tl.max(run_max, axis=0)
    safe_total = tl.where(total_max == float("-inf"), 0.0, total_max)
    log_visible = safe_total + tl.log(tl.sum(run_sum * tl.exp(run_max - safe_total), axis=0))
    tl.store(visible_ptr + b * stride_vb + t, log_visible)

    if LISTED:
        for n0 in range(0, N_LISTED, BLOCK_N):
            # [BLOCK_N] each
            offs_n, entry, valid = _entry_block(
                idx_ptr + b * stride_ib + t * stride_is, n0, n_first, n_vis, N_LISTED, True, BLOCK_N
            )
            mass = _head_summed_log_mass(
                q_row_ptr, pool_b_ptr, entry, valid, denom, scale, stride_qh, stride_pp,
                H, D, BLOCK_H, BLOCK_D, BLOCK_N, PRECISION,
            )  # fmt: skip
            tl.store(mass_row_ptr + offs_n, mass, mask=offs_n < N_LISTED)


def indexer_teacher(inputs: TeacherInputs) -> TeacherOutputs:
    """``v4::indexer_teacher`` on validated contiguous inputs: log_mass ``[B, S, K or P]`` and
    log_visible ``[B, S]``, fp32."""
    q, pool, lse, sink, indices, scale, ratio, doc_ids = inputs
    check_dtype("q", q, (torch.bfloat16, torch.float32))
    check_dtype("pool", pool, (q.dtype,))
    check_dtype("lse", lse, (torch.float32,))
    check_dtype("sink", sink, (torch.float32,))
    batch, seq_len, heads, dim = q.shape
    n_entries = pool.shape[1]
    n = n_listed(indices, n_entries)
    log_mass = torch.full((batch, seq_len, n), float("-inf"), dtype=torch.float32, device=q.device)
    log_visible = torch.empty(batch, seq_len, dtype=torch.float32, device=q.device)
    listed = indices is not None
    idx = indices if listed else log_mass  # any tensor: the LISTED=False kernel never reads it
    block_h = block(heads)
    first = first_entries(doc_ids, batch, seq_len, ratio, q.device)
    _indexer_teacher_fwd_kernel[(seq_len, batch)](
        q, pool, lse, sink, idx, first, log_mass, log_visible,
        scale, n_entries, n, ratio,
        q.stride(0), q.stride(1), q.stride(2),
        pool.stride(0), pool.stride(1),
        lse.stride(0), lse.stride(1),
        idx.stride(0), idx.stride(1),
        first.stride(0),
        log_mass.stride(0), log_mass.stride(1),
        log_visible.stride(0),
        H=heads, D=dim, LISTED=listed,
        # [BLOCK_H, BLOCK_N] fp32 logits live in registers: narrower entry blocks for 128 heads.
        BLOCK_H=block_h, BLOCK_D=block(dim, cap=64), BLOCK_N=32 if block_h > 64 else 64,
        PRECISION=dot_precision(q.dtype), num_warps=4 if block_h <= 64 else 8,
    )  # fmt: skip
    return TeacherOutputs(log_mass, log_visible)
