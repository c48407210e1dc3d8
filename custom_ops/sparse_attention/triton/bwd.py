"""Backward Triton kernels of ``v4::sparse_attention`` and their launcher.

Same semantics as :func:`custom_ops.sparse_attention.reference.sparse_attention_bwd`: flash-attention
backward from the saved ``out`` and ``lse``, the probabilities recomputed, never stored. With ``p``
the probabilities (sink in the denominator), ``dP = dO . v``, ``delta = dO . out`` and
``dS = p * (dP - delta)``: ``dq = scale * sum_n dS * k_n``; a key row (K = V) gets
``sum_h scale * dS * q + p * dO`` from every query that attends it; ``dsink = -sum p_sink * delta``.

Kernels, in launch order:

1. ``_sparse_attention_bwd_preprocess_kernel``, one program per (query, head block): delta, the log2
   softmax denominator (sink included) and the query's term of dsink.
2. ``_sparse_attention_bwd_dq_kernel``, query-major with the forward's schedule (one query x BLOCK_H
   heads, window then pool keys): dq. Outside deterministic mode it also scatters each pool row's
   gradient (heads reduced in the kernel) into an fp32 dpool with atomic adds.
3. ``_sparse_attention_bwd_dkv_kernel``, key-major: BLOCK_N consecutive kv rows per program, walking
   the queries ``j .. j + window - 1`` that can see them, so each dkv element has one writer.
4. ``_sparse_attention_bwd_dpool_kernel`` (deterministic mode only), key-major: BLOCK_N pool entries x
   BLOCK_T queries per program, each query weighting an entry by how often it attends it (1 if
   visible for HCA; its number of occurrences in the query's top-k list for CSA); the per-query-block
   partial sums are reduced in a fixed order.

Determinism: dq, dkv and dsink are always bitwise reproducible (one writer per element, fixed loop
orders, dsink a fixed-shape torch sum). dpool is reproducible only when
``torch.are_deterministic_algorithms_enabled()``: otherwise the order of its fp32 atomic adds varies
between runs (differences of a few fp32 ulps before the cast to the pool's dtype).
"""

import torch
import triton
import triton.language as tl

from ..contract import Grads, Inputs, Outputs
from .config import Tiles, bwd_dkv_tiles, bwd_dq_tiles, check_tiles
from .fwd import (
    ALL_POOL, FP32_MIN, LOG2E, NO_POOL, TOPK_POOL, _load_rows, _log_denominator, _pool_visible,
    check_inputs, document_starts, dot_precision, pool_kind,
)

# Top-k slots compared at once when counting how often a query lists an entry (deterministic dpool).
_TOPK_CHUNK = 64


@triton.jit
def _sparse_attention_bwd_preprocess_kernel(
    out_ptr, do_ptr, lse_ptr, sink_ptr, delta_ptr, lse2_ptr, dsink_rows_ptr,
    H, D, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(B * S, cdiv(H, BLOCK_H))``. out/dO ``[B, S, H, D]``; lse, and the outputs, ``[B, S, H]`` fp32.

    delta = dO . out; lse2 = log2 of the softmax denominator ``e^lse + e^sink`` (clamped finite);
    dsink_rows = ``-p_sink * delta`` with ``p_sink = e^sink / (e^lse + e^sink)``.
    """
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < H
    delta = tl.zeros([BLOCK_H], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        # [BLOCK_H, BLOCK_D]
        o = _load_rows(out_ptr + row * H * D, heads, head_mask, d, D).to(tl.float32)
        # [BLOCK_H, BLOCK_D]
        g = _load_rows(do_ptr + row * H * D, heads, head_mask, d, D).to(tl.float32)
        delta += tl.sum(o * g, 1)
    lse = tl.load(lse_ptr + row * H + heads, mask=head_mask, other=0.0)
    sink = tl.load(sink_ptr + heads, mask=head_mask, other=0.0)
    log_den = _log_denominator(lse, sink)
    tl.store(delta_ptr + row * H + heads, delta, mask=head_mask)
    # Clamped again after the change of base: an empty row's FP32_MIN times log2(e) would be -inf.
    tl.store(lse2_ptr + row * H + heads, tl.maximum(log_den * LOG2E, FP32_MIN), mask=head_mask)
    tl.store(dsink_rows_ptr + row * H + heads, -tl.exp(sink - log_den) * delta, mask=head_mask)


@triton.jit
def _scores_pair(
    q, do, q_row, do_row, heads, head_mask, k, k_ptr, rows, row_mask, D,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``(q . k, dO . k)`` for BLOCK_H heads of one query and BLOCK_N key rows, ``[BLOCK_H, BLOCK_N]`` fp32 each.

    Whole rows (BLOCK_D == D_PAD): products of the tiles q, do [BLOCK_H, D_PAD] and k [BLOCK_N, D_PAD]
    held by the caller. Chunked: those are unused and D is walked in BLOCK_D chunks, each key chunk
    read once for both products.
    """
    if BLOCK_D == D_PAD:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(k), input_precision=DOT_PRECISION)
    else:
        s = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
        dp = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            # [BLOCK_D, BLOCK_N]
            k_chunk = tl.trans(_load_rows(k_ptr, rows, row_mask, d, D))
            # [BLOCK_H, BLOCK_D] each
            s = tl.dot(_load_rows(q_row, heads, head_mask, d, D), k_chunk, s, input_precision=DOT_PRECISION)
            dp = tl.dot(_load_rows(do_row, heads, head_mask, d, D), k_chunk, dp, input_precision=DOT_PRECISION)
    return s, dp


@triton.jit
def _dlogits(s, dp, row_mask, lse2, delta, qk_scale):
    """p (0 at invisible slots) and dS = p * (dP - delta), ``[BLOCK_H, BLOCK_N]`` fp32 each."""
    p = tl.exp2(tl.where(row_mask[None, :], s * qk_scale, float("-inf")) - lse2[:, None])
    return p, p * (dp - delta[:, None])


@triton.jit
def _key_rows_grad(acc, p, ds, q_dv, do_dv, scale, DOT_PRECISION: tl.constexpr):
    """``acc [BLOCK_N, BLOCK_DV] += sum_h scale * dS[h, n] * q[h] + p[h, n] * dO[h]``.

    The gradient of a key row as a key (through the logits) plus as a value (K = V), reduced over the
    heads by the products themselves (heads are their reduction dim).
    """
    acc = tl.dot(tl.trans(ds * scale).to(q_dv.dtype), q_dv, acc, input_precision=DOT_PRECISION)
    return tl.dot(tl.trans(p).to(do_dv.dtype), do_dv, acc, input_precision=DOT_PRECISION)


@triton.jit
def _dq_block(
    acc, q, do, q_row, do_row, heads, head_mask, k_ptr, rows, row_mask, dv, lse2, delta, qk_scale, D,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq's step over one key block: ``acc [BLOCK_H, BLOCK_DV] += dS @ k``; also returns p and dS."""
    if BLOCK_D == D_PAD:
        # [BLOCK_N, D_PAD]
        k = _load_rows(k_ptr, rows, row_mask, tl.arange(0, D_PAD), D)
    else:
        k = None
    s, dp = _scores_pair(q, do, q_row, do_row, heads, head_mask, k, k_ptr, rows, row_mask, D, BLOCK_H, BLOCK_N, BLOCK_D, D_PAD, DOT_PRECISION)
    p, ds = _dlogits(s, dp, row_mask, lse2, delta, qk_scale)
    if BLOCK_D == D_PAD and BLOCK_DV == D_PAD:
        k_dv = k
    else:
        # [BLOCK_N, BLOCK_DV]
        k_dv = _load_rows(k_ptr, rows, row_mask, dv, D)
    acc = tl.dot(ds.to(k_dv.dtype), k_dv, acc, input_precision=DOT_PRECISION)
    return acc, p, ds


@triton.jit
def _scatter_rows_grad(
    dpool_b, rows, row_mask, dv, D, p, ds, q_dv, do_dv, scale,
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Atomically adds the gradient of the pool rows ``rows`` from one query into the fp32 dpool."""
    # [BLOCK_N, BLOCK_DV]
    drows = _key_rows_grad(tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32), p, ds, q_dv, do_dv, scale, DOT_PRECISION)
    mask = row_mask[:, None] & (dv[None, :] < D)
    # Repeated rows within the block are separate atomic adds, so a repeat counts twice (as specified).
    tl.atomic_add(dpool_b + rows[:, None] * D + dv[None, :], drows, mask=mask, sem="relaxed")


@triton.jit
def _sparse_attention_bwd_dq_kernel(
    q_ptr, kv_ptr, pool_ptr, topk_ptr, starts_ptr, do_ptr, lse2_ptr, delta_ptr, dq_ptr, dpool_ptr,
    S, H, D, P, K, window, ratio, qk_scale, scale,
    POOL: tl.constexpr, DPOOL_ATOMIC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid ``(S * cdiv(H, BLOCK_H) * cdiv(D, BLOCK_DV), B)``, the forward's decomposition.

    dq ``[B, S, H, D]``; dpool ``[B, P, D]`` fp32, accumulated with atomics when DPOOL_ATOMIC.
    lse2, delta ``[B, S, H]`` fp32 from the preprocess kernel. Other arguments as in the forward.
    """
    n_hb = tl.cdiv(H, BLOCK_H)
    n_dv = tl.cdiv(D, BLOCK_DV)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = S - 1 - pid // (n_hb * n_dv)  # last query first: it has the most keys
    hb = (pid // n_dv) % n_hb
    dv = (pid % n_dv) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < H

    row = b * S + t
    q_row = q_ptr + row * H * D
    do_row = do_ptr + row * H * D
    kv_b = kv_ptr + b * S * D
    start = tl.load(starts_ptr + row)
    # Padded heads get lse2 = +inf, hence p = 0.
    lse2 = tl.load(lse2_ptr + row * H + heads, mask=head_mask, other=float("inf"))
    delta = tl.load(delta_ptr + row * H + heads, mask=head_mask, other=0.0)
    if BLOCK_D == D_PAD:
        # [BLOCK_H, D_PAD] each, kept on chip for the whole key loop
        q = _load_rows(q_row, heads, head_mask, tl.arange(0, D_PAD), D)
        do = _load_rows(do_row, heads, head_mask, tl.arange(0, D_PAD), D)
    else:
        q = None
        do = None
    # [BLOCK_H, BLOCK_DV]
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)

    for n0 in range(tl.maximum(t - window + 1, start), t + 1, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        acc, p, ds = _dq_block(
            acc, q, do, q_row, do_row, heads, head_mask, kv_b, rows, rows <= t, dv, lse2, delta, qk_scale, D,
            BLOCK_H, BLOCK_N, BLOCK_D, BLOCK_DV, D_PAD, DOT_PRECISION,
        )

    pool_b = pool_ptr + b * P * D
    dpool_b = dpool_ptr + b * P * D
    if DPOOL_ATOMIC:
        if BLOCK_D == D_PAD and BLOCK_DV == D_PAD:
            q_dv = q
            do_dv = do
        else:
            # [BLOCK_H, BLOCK_DV] each: this program's D slice of q and dO, for the pool rows' gradient
            q_dv = _load_rows(q_row, heads, head_mask, dv, D)
            do_dv = _load_rows(do_row, heads, head_mask, dv, D)
    if POOL == ALL_POOL:
        w_end = tl.minimum(P, (t + 1) // ratio)
        for n0 in range((start + ratio - 1) // ratio, w_end, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            row_mask = rows < w_end
            acc, p, ds = _dq_block(
                acc, q, do, q_row, do_row, heads, head_mask, pool_b, rows, row_mask, dv, lse2, delta, qk_scale, D,
                BLOCK_H, BLOCK_N, BLOCK_D, BLOCK_DV, D_PAD, DOT_PRECISION,
            )
            if DPOOL_ATOMIC:
                _scatter_rows_grad(dpool_b, rows, row_mask, dv, D, p, ds, q_dv, do_dv, scale, BLOCK_N, BLOCK_DV, DOT_PRECISION)
    if POOL == TOPK_POOL:
        for k0 in range(0, K, BLOCK_N):
            slots = k0 + tl.arange(0, BLOCK_N)
            idx = tl.load(topk_ptr + row * K + slots, mask=slots < K, other=-1)
            visible = _pool_visible(idx, t, start, P, ratio)
            rows = tl.where(visible, idx, 0)
            acc, p, ds = _dq_block(
                acc, q, do, q_row, do_row, heads, head_mask, pool_b, rows, visible, dv, lse2, delta, qk_scale, D,
                BLOCK_H, BLOCK_N, BLOCK_D, BLOCK_DV, D_PAD, DOT_PRECISION,
            )
            if DPOOL_ATOMIC:
                _scatter_rows_grad(dpool_b, rows, visible, dv, D, p, ds, q_dv, do_dv, scale, BLOCK_N, BLOCK_DV, DOT_PRECISION)

    dq = acc * scale
    tl.store(
        dq_ptr + row * H * D + heads[:, None] * D + dv[None, :], dq.to(dq_ptr.dtype.element_ty),
        mask=head_mask[:, None] & (dv[None, :] < D),
    )


@triton.jit
def _key_block_query_step(
    acc, k, k_ptr, rows, weight, q_ptr, do_ptr, lse2_ptr, delta_ptr, row, H, D, dv, qk_scale, scale,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Adds query ``row``'s contribution (all its heads) to the gradient of the key rows ``rows``.

    ``weight`` [BLOCK_N] fp32: 0 where the query does not see the row, else how many times it
    attends it. ``k`` is the key tile [BLOCK_N, D_PAD] in whole-rows mode (None when chunked).
    """
    row_mask = weight > 0
    q_row = q_ptr + row * H * D
    do_row = do_ptr + row * H * D
    for h0 in range(0, H, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        head_mask = heads < H
        lse2 = tl.load(lse2_ptr + row * H + heads, mask=head_mask, other=float("inf"))
        delta = tl.load(delta_ptr + row * H + heads, mask=head_mask, other=0.0)
        if BLOCK_D == D_PAD:
            # [BLOCK_H, D_PAD] each
            q = _load_rows(q_row, heads, head_mask, tl.arange(0, D_PAD), D)
            do = _load_rows(do_row, heads, head_mask, tl.arange(0, D_PAD), D)
        else:
            q = None
            do = None
        s, dp = _scores_pair(q, do, q_row, do_row, heads, head_mask, k, k_ptr, rows, row_mask, D, BLOCK_H, BLOCK_N, BLOCK_D, D_PAD, DOT_PRECISION)
        p, ds = _dlogits(s, dp, row_mask, lse2, delta, qk_scale)
        if BLOCK_D == D_PAD and BLOCK_DV == D_PAD:
            q_dv = q
            do_dv = do
        else:
            # [BLOCK_H, BLOCK_DV] each
            q_dv = _load_rows(q_row, heads, head_mask, dv, D)
            do_dv = _load_rows(do_row, heads, head_mask, dv, D)
        acc = _key_rows_grad(acc, p * weight[None, :], ds * weight[None, :], q_dv, do_dv, scale, DOT_PRECISION)
    return acc


@triton.jit
def _sparse_attention_bwd_dkv_kernel(
    q_ptr, kv_ptr, starts_ptr, do_ptr, lse2_ptr, delta_ptr, dkv_ptr,
    S, H, D, window, qk_scale, scale,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid ``(cdiv(S, BLOCK_N) * cdiv(D, BLOCK_DV), B)``: BLOCK_N consecutive kv rows and a D slice each.

    Row j is seen by the queries j .. j + window - 1 of its document (``window`` <= S here); the
    program walks the queries that can see any of its rows, so every dkv element has one writer.
    dkv ``[B, S, D]`` in kv's dtype.
    """
    n_dv = tl.cdiv(D, BLOCK_DV)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    j0 = (pid // n_dv) * BLOCK_N
    dv = (pid % n_dv) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    rows = j0 + tl.arange(0, BLOCK_N)
    row_mask = rows < S
    kv_b = kv_ptr + b * S * D
    if BLOCK_D == D_PAD:
        # [BLOCK_N, D_PAD]: this program's key rows, kept on chip for the whole query loop
        k = _load_rows(kv_b, rows, row_mask, tl.arange(0, D_PAD), D)
    else:
        k = None
    # [BLOCK_N, BLOCK_DV]
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for t in range(j0, tl.minimum(S, j0 + BLOCK_N - 1 + window)):
        row = b * S + t
        start = tl.load(starts_ptr + row)
        visible = row_mask & (rows <= t) & (rows > t - window) & (rows >= start)
        acc = _key_block_query_step(
            acc, k, kv_b, rows, visible.to(tl.float32), q_ptr, do_ptr, lse2_ptr, delta_ptr, row, H, D, dv,
            qk_scale, scale, BLOCK_H, BLOCK_N, BLOCK_D, BLOCK_DV, D_PAD, DOT_PRECISION,
        )
    tl.store(
        dkv_ptr + b * S * D + rows[:, None] * D + dv[None, :], acc.to(dkv_ptr.dtype.element_ty),
        mask=row_mask[:, None] & (dv[None, :] < D),
    )


@triton.jit
def _topk_count(topk_row, rows, K, BLOCK_N: tl.constexpr, TOPK_CHUNK: tl.constexpr):
    """How many times each entry in ``rows`` is listed in one query's top-k row: ``[BLOCK_N]`` fp32."""
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, TOPK_CHUNK):
        slots = k0 + tl.arange(0, TOPK_CHUNK)
        idx = tl.load(topk_row + slots, mask=slots < K, other=-1)
        # [BLOCK_N, TOPK_CHUNK]
        hits = (rows[:, None] == idx[None, :]).to(tl.int32)
        count += tl.sum(hits, 1)
    return count.to(tl.float32)


@triton.jit
def _sparse_attention_bwd_dpool_kernel(
    q_ptr, pool_ptr, topk_ptr, starts_ptr, do_ptr, lse2_ptr, delta_ptr, dpool_part_ptr,
    B, S, H, D, P, K, ratio, qk_scale, scale,
    TOPK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr, D_PAD: tl.constexpr, TOPK_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid ``(cdiv(S, BLOCK_T) * cdiv(P, BLOCK_N) * cdiv(D, BLOCK_DV), B)``: deterministic dpool.

    Each program takes BLOCK_N pool entries, a D slice and the queries of one BLOCK_T block, and
    writes its partial sum to ``dpool_part [cdiv(S, BLOCK_T), B, P, D]`` fp32 (zeros when none of
    those queries sees the entries); the launcher sums the partials over the first dim.
    """
    n_dv = tl.cdiv(D, BLOCK_DV)
    n_jb = tl.cdiv(P, BLOCK_N)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tb = pid // (n_jb * n_dv)
    w0 = ((pid // n_dv) % n_jb) * BLOCK_N
    dv = (pid % n_dv) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    rows = w0 + tl.arange(0, BLOCK_N)
    row_mask = rows < P
    pool_b = pool_ptr + b * P * D
    if BLOCK_D == D_PAD:
        # [BLOCK_N, D_PAD]: this program's pool entries, kept on chip for the whole query loop
        k = _load_rows(pool_b, rows, row_mask, tl.arange(0, D_PAD), D)
    else:
        k = None
    # [BLOCK_N, BLOCK_DV]
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # Entry w is complete from query (w + 1) * ratio - 1 on; no earlier query can see the block.
    for t in range(tl.maximum(tb * BLOCK_T, (w0 + 1) * ratio - 1), tl.minimum(S, (tb + 1) * BLOCK_T)):
        row = b * S + t
        start = tl.load(starts_ptr + row)
        weight = _pool_visible(rows, t, start, P, ratio).to(tl.float32)
        if TOPK:
            weight = weight * _topk_count(topk_ptr + row * K, rows, K, BLOCK_N, TOPK_CHUNK)
        acc = _key_block_query_step(
            acc, k, pool_b, rows, weight, q_ptr, do_ptr, lse2_ptr, delta_ptr, row, H, D, dv,
            qk_scale, scale, BLOCK_H, BLOCK_N, BLOCK_D, BLOCK_DV, D_PAD, DOT_PRECISION,
        )
    part_b = dpool_part_ptr + (tb * B + b) * P * D
    tl.store(part_b + rows[:, None] * D + dv[None, :], acc, mask=row_mask[:, None] & (dv[None, :] < D))


def sparse_attention_bwd(inputs: Inputs, grad_out: torch.Tensor, outputs: Outputs) -> Grads:
    """Backward of the op: same arguments, dtypes and semantics as ``reference.sparse_attention_bwd``.

    Args:
        inputs: as in :func:`custom_ops.sparse_attention.triton.sparse_attention_fwd`.
        grad_out: ``[B, S, H, D]`` in q's dtype.
        outputs: the forward's ``out`` and ``lse``.
    Returns:
        dq (q's dtype), dkv (kv's dtype), dsink (fp32), dpool (pool's dtype; None without a pool).
        dpool is bitwise reproducible only under ``torch.use_deterministic_algorithms(True)`` (see the
        module docstring); everything else always is.
    """
    heads, dim, dtype = inputs.q.shape[2], inputs.q.shape[3], inputs.q.dtype
    return bwd_with_tiles(
        inputs, grad_out, outputs, bwd_dq_tiles(heads, dim, dtype), bwd_dkv_tiles(heads, dim, dtype),
        torch.are_deterministic_algorithms_enabled(),
    )


def bwd_with_tiles(
    inputs: Inputs, grad_out: torch.Tensor, outputs: Outputs, dq_tiles: Tiles, dkv_tiles: Tiles, deterministic: bool
) -> Grads:
    """:func:`sparse_attention_bwd` with explicit tiles (dq_tiles for the query-major dq kernel,
    dkv_tiles for the key-major dkv and dpool kernels) and determinism (tests, benchmark sweep)."""
    q, kv, sink, pool, topk, doc_ids, window, scale, ratio = inputs
    out, lse = outputs
    check_inputs(q, kv, sink, pool, topk, doc_ids)
    for name, x in (("grad_out", grad_out), ("out", out)):
        assert x.dtype == q.dtype and x.shape == q.shape and x.is_contiguous(), f"{name} must be contiguous like q"
    assert lse.dtype == torch.float32 and lse.is_contiguous(), "lse must be contiguous fp32"
    batch, seq_len, heads, dim = q.shape
    check_tiles(dq_tiles, dim)
    check_tiles(dkv_tiles, dim)
    window = min(window, seq_len)  # keys before position 0 do not exist; keeps the loop bounds in int32
    d_pad = triton.next_power_of_2(dim)
    n_pool = 0 if pool is None else pool.shape[1]
    kind = pool_kind(pool, topk)
    starts = document_starts(doc_ids, batch, seq_len, q.device)
    qk_scale = scale * 1.4426950408889634
    precision = dot_precision(q.dtype)

    delta = torch.empty(batch, seq_len, heads, dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    dsink_rows = torch.empty_like(delta)
    _sparse_attention_bwd_preprocess_kernel[(batch * seq_len, triton.cdiv(heads, 16))](
        out, grad_out, lse, sink, delta, lse2, dsink_rows, heads, dim, BLOCK_H=16, BLOCK_D=min(64, d_pad),
    )

    atomic = kind != NO_POOL.value and not deterministic
    dq = torch.empty_like(q)
    # Without the atomic scatter the kernel never touches dpool: any fp32 tensor will do as its pointer.
    dpool_acc = torch.zeros(batch, n_pool, dim, dtype=torch.float32, device=q.device) if atomic else delta
    tiles = dq_tiles
    grid = (seq_len * triton.cdiv(heads, tiles.block_h) * triton.cdiv(dim, tiles.block_dv), batch)
    _sparse_attention_bwd_dq_kernel[grid](
        q, kv, kv if pool is None else pool, kv if topk is None else topk, starts, grad_out, lse2, delta,
        dq, dpool_acc, seq_len, heads, dim, n_pool, 0 if topk is None else topk.shape[2],
        window, ratio, qk_scale, scale,
        POOL=kind, DPOOL_ATOMIC=atomic, BLOCK_H=tiles.block_h, BLOCK_N=tiles.block_n,
        BLOCK_D=tiles.block_d, BLOCK_DV=tiles.block_dv, D_PAD=d_pad, DOT_PRECISION=precision,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )

    dkv = torch.empty_like(kv)
    tiles = dkv_tiles
    grid = (triton.cdiv(seq_len, tiles.block_n) * triton.cdiv(dim, tiles.block_dv), batch)
    _sparse_attention_bwd_dkv_kernel[grid](
        q, kv, starts, grad_out, lse2, delta, dkv, seq_len, heads, dim, window, qk_scale, scale,
        BLOCK_H=tiles.block_h, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d, BLOCK_DV=tiles.block_dv,
        D_PAD=d_pad, DOT_PRECISION=precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )

    if pool is None:
        dpool = None
    elif kind == NO_POOL.value:  # an empty pool
        dpool = torch.zeros_like(pool)
    elif atomic:
        dpool = dpool_acc.to(pool.dtype)
    else:
        n_tb = triton.cdiv(seq_len, tiles.block_t)
        part = torch.empty(n_tb, batch, n_pool, dim, dtype=torch.float32, device=q.device)
        grid = (n_tb * triton.cdiv(n_pool, tiles.block_n) * triton.cdiv(dim, tiles.block_dv), batch)
        _sparse_attention_bwd_dpool_kernel[grid](
            q, pool, kv if topk is None else topk, starts, grad_out, lse2, delta, part,
            batch, seq_len, heads, dim, n_pool, 0 if topk is None else topk.shape[2], ratio, qk_scale, scale,
            TOPK=kind == TOPK_POOL.value, BLOCK_H=tiles.block_h, BLOCK_N=tiles.block_n,
            BLOCK_D=tiles.block_d, BLOCK_DV=tiles.block_dv, BLOCK_T=tiles.block_t, D_PAD=d_pad,
            TOPK_CHUNK=_TOPK_CHUNK, DOT_PRECISION=precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
        dpool = part.sum(dim=0).to(pool.dtype)  # fixed-order reduction of the query blocks
    return Grads(dq, dkv, dsink_rows.sum(dim=(0, 1)), dpool)
