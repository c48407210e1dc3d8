"""Forward Triton kernel of ``v4::sparse_attention`` and its launcher.

Same semantics as :func:`custom_ops.sparse_attention.reference.sparse_attention_fwd` (the
specification: window, pool visibility, top-k validity, sink, documents, empty rows).

Tile schedule (FlashMLA's layout): the H query heads of one query share a single latent KV row
(K = V), so one program takes one query t and ``BLOCK_H`` of its heads as the M dimension of every
product. It walks its visible keys in blocks of ``BLOCK_N`` rows -- first the local window
``max(t - window + 1, doc_start) .. t``, then the pool: every visible entry (HCA) or the top-k list
gathered by index (CSA) -- with an online softmax. Each key tile is loaded once for all heads and,
with whole rows (see config.Tiles), used both as K (logits) and V (output). A program writes a
``BLOCK_DV`` slice of the output; programs of the other slices recompute the same logits. Programs run from the last query to the first: later
queries see more keys, so the long programs start first and the grid's tail is short.
"""

import torch
import triton
import triton.language as tl

from ...documents import doc_starts
from ..contract import Inputs, Outputs
from .config import Tiles, check_tiles, fwd_tiles

# How a query's pool entries are enumerated (constexpr POOL of the kernels).
NO_POOL = tl.constexpr(0)  # sliding window only
ALL_POOL = tl.constexpr(1)  # HCA: every visible entry, a contiguous range
TOPK_POOL = tl.constexpr(2)  # CSA: the entries listed in topk[b, t]

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FP32_MIN = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _load_rows(ptr, rows, row_mask, cols, D):
    """``[len(rows), len(cols)]`` tile of a row-major ``[*, D]`` tensor; 0 outside the rows / D."""
    mask = row_mask[:, None] & (cols[None, :] < D)
    return tl.load(ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _pool_visible(w, t, start, n_pool, ratio):
    """Pool entry w exists, is complete at query t and lies in t's document (starting at start)."""
    # Written so that a garbage index cannot overflow into a false positive: w < n_pool is and-ed in.
    return (w >= 0) & (w < n_pool) & (w < (t + 1) // ratio) & (w * ratio >= start)


@triton.jit
def _log_denominator(lse, sink):
    """``log(exp(lse) + exp(sink))``: the log of the full softmax denominator, sink included.

    Clamped to fp32's lowest finite value, as the reference does, so that an empty row (lse = -inf)
    with a -inf sink gives probabilities 0, not NaN.
    """
    top = tl.maximum(lse, sink)
    top = tl.where(top == float("-inf"), 0.0, top)
    return tl.maximum(top + tl.log(tl.exp(lse - top) + tl.exp(sink - top)), FP32_MIN)


@triton.jit
def _scores(
    q, q_row, heads, head_mask, k, k_ptr, rows, row_mask, D,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``q[h] . row[n]`` for BLOCK_H heads of one query and BLOCK_N key rows: ``[BLOCK_H, BLOCK_N]`` fp32.

    Whole rows (BLOCK_D == D_PAD): one product of the tiles ``q`` [BLOCK_H, D_PAD] and ``k``
    [BLOCK_N, D_PAD] the caller holds. Chunked: ``q`` and ``k`` are unused and the product is
    accumulated over D in BLOCK_D chunks read from ``q_row`` / ``k_ptr``.
    """
    if BLOCK_D == D_PAD:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    else:
        s = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            # [BLOCK_H, BLOCK_D]
            q_chunk = _load_rows(q_row, heads, head_mask, d, D)
            # [BLOCK_N, BLOCK_D]
            k_chunk = _load_rows(k_ptr, rows, row_mask, d, D)
            s = tl.dot(q_chunk, tl.trans(k_chunk), s, input_precision=DOT_PRECISION)
    return s


@triton.jit
def _attend_block(
    acc, m, l, q, q_row, heads, head_mask, k_ptr, rows, row_mask, dv, qk_scale, D,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over the key rows ``rows`` (visible where ``row_mask``).

    ``m`` is the running max of the logits in log2 units, ``l`` the running sum of
    ``2^(logit - m)`` and ``acc`` [BLOCK_H, BLOCK_DV] the running ``sum 2^(logit - m) * v``.
    """
    if BLOCK_D == D_PAD:
        # [BLOCK_N, D_PAD]: loaded once, used as K here and as V below when BLOCK_DV == D_PAD.
        k = _load_rows(k_ptr, rows, row_mask, tl.arange(0, D_PAD), D)
    else:
        k = None
    # [BLOCK_H, BLOCK_N] logits in log2 units, -inf at invisible slots
    s = _scores(q, q_row, heads, head_mask, k, k_ptr, rows, row_mask, D, BLOCK_H, BLOCK_N, BLOCK_D, D_PAD, DOT_PRECISION)
    s = tl.where(row_mask[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    # Until a visible key has been seen m_new is -inf: shift by 0 instead so that no -inf - -inf = NaN.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - shift)
    # [BLOCK_H, BLOCK_N]
    p = tl.exp2(s - shift[:, None])
    l = l * alpha + tl.sum(p, 1)
    if BLOCK_D == D_PAD and BLOCK_DV == D_PAD:
        v = k
    else:
        # [BLOCK_N, BLOCK_DV]: this program's slice of the same rows, as values (an L1/L2 hit).
        v = _load_rows(k_ptr, rows, row_mask, dv, D)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l


@triton.jit
def _sparse_attention_fwd_kernel(
    q_ptr, kv_ptr, sink_ptr, pool_ptr, topk_ptr, starts_ptr, out_ptr, lse_ptr,
    S, H, D, P, K, window, ratio, qk_scale,
    POOL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid ``(S * cdiv(H, BLOCK_H) * cdiv(D, BLOCK_DV), B)``: one query, head block and D slice each.

    q/out ``[B, S, H, D]``, kv ``[B, S, D]``, pool ``[B, P, D]``, topk ``[B, S, K]`` int32, starts
    ``[B, S]`` int32 (document start of each query), sink ``[H]`` fp32, lse ``[B, S, H]`` fp32.
    ``qk_scale`` = scale * log2(e): logits are kept in log2 units for exp2.
    """
    n_hb = tl.cdiv(H, BLOCK_H)
    n_dv = tl.cdiv(D, BLOCK_DV)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = S - 1 - pid // (n_hb * n_dv)  # last query first: it has the most keys
    hb = (pid // n_dv) % n_hb
    dv_block = pid % n_dv
    dv = dv_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < H

    row = b * S + t  # flat (batch, query) index
    q_row = q_ptr + row * H * D  # this query's [H, D] block
    kv_b = kv_ptr + b * S * D
    start = tl.load(starts_ptr + row)
    if BLOCK_D == D_PAD:
        # [BLOCK_H, D_PAD]: the query tile, kept on chip for the whole key loop.
        q = _load_rows(q_row, heads, head_mask, tl.arange(0, D_PAD), D)
    else:
        q = None

    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    # [BLOCK_H, BLOCK_DV]
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)

    # Local window: rows max(t - window + 1, doc start) .. t.
    for n0 in range(tl.maximum(t - window + 1, start), t + 1, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        acc, m, l = _attend_block(
            acc, m, l, q, q_row, heads, head_mask, kv_b, rows, rows <= t, dv, qk_scale, D,
            BLOCK_H, BLOCK_N, BLOCK_D, BLOCK_DV, D_PAD, DOT_PRECISION,
        )
    pool_b = pool_ptr + b * P * D
    if POOL == ALL_POOL:
        # Visible entries form the range [ceil(start / ratio), min(P, (t + 1) // ratio)).
        w_end = tl.minimum(P, (t + 1) // ratio)
        for n0 in range((start + ratio - 1) // ratio, w_end, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            acc, m, l = _attend_block(
                acc, m, l, q, q_row, heads, head_mask, pool_b, rows, rows < w_end, dv, qk_scale, D,
                BLOCK_H, BLOCK_N, BLOCK_D, BLOCK_DV, D_PAD, DOT_PRECISION,
            )
    if POOL == TOPK_POOL:
        for k0 in range(0, K, BLOCK_N):
            slots = k0 + tl.arange(0, BLOCK_N)
            idx = tl.load(topk_ptr + row * K + slots, mask=slots < K, other=-1)
            visible = _pool_visible(idx, t, start, P, ratio)
            # Invisible slots read row 0 (in bounds) and get probability 0; repeats count each time.
            acc, m, l = _attend_block(
                acc, m, l, q, q_row, heads, head_mask, pool_b, tl.where(visible, idx, 0), visible, dv,
                qk_scale, D, BLOCK_H, BLOCK_N, BLOCK_D, BLOCK_DV, D_PAD, DOT_PRECISION,
            )

    lse = (m + tl.log2(l)) * LN2  # natural log; -inf for a row with nothing visible (l = 0)
    sink = tl.load(sink_ptr + heads, mask=head_mask, other=0.0)
    # out = acc * 2^m / (e^lse + e^sink); an empty row (l = 0) gives exactly 0.
    norm = tl.where(l > 0, tl.exp2(m - _log_denominator(lse, sink) * LOG2E), 0.0)
    out = acc * norm[:, None]
    out_mask = head_mask[:, None] & (dv[None, :] < D)
    tl.store(out_ptr + row * H * D + heads[:, None] * D + dv[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)
    if dv_block == 0:  # every D slice computes the same lse; the first one writes it
        tl.store(lse_ptr + row * H + heads, lse, mask=head_mask)


def pool_kind(pool: torch.Tensor | None, topk: torch.Tensor | None) -> int:
    """NO_POOL, ALL_POOL or TOPK_POOL; an empty pool (P = 0) has nothing to attend."""
    if pool is None or pool.shape[1] == 0:
        return NO_POOL.value
    return ALL_POOL.value if topk is None else TOPK_POOL.value


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs (tests) get full-precision products; tf32 would cost ~1e-3 relative error."""
    return "ieee" if dtype == torch.float32 else "tf32"


def document_starts(doc_ids: torch.Tensor | None, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """``[B, S]`` int32 first position of each query's document (all 0 without doc_ids)."""
    return doc_starts(doc_ids, seq_len, device).expand(batch, seq_len).to(torch.int32).contiguous()


def check_inputs(q, kv, sink, pool, topk, doc_ids) -> None:
    """Asserts the dtypes, shapes and contiguity the kernels assume (api.py has validated the rest)."""
    assert q.dtype in (torch.bfloat16, torch.float32), f"kernels take bf16 (or fp32 for tests), got {q.dtype}"
    assert q.dim() == 4 and q.shape[-1] % 16 == 0, f"q must be [B, S, H, D] with D % 16 == 0, got {tuple(q.shape)}"
    assert kv.dtype == q.dtype and (pool is None or pool.dtype == q.dtype), "kv and pool must have q's dtype"
    assert sink.dtype == torch.float32, f"sink must be fp32, got {sink.dtype}"
    assert topk is None or (topk.dtype == torch.int32 and pool is not None), "topk must be int32, with a pool"
    for name, x in (("q", q), ("kv", kv), ("sink", sink), ("pool", pool), ("topk", topk), ("doc_ids", doc_ids)):
        assert x is None or (x.is_contiguous() and x.device == q.device), f"{name} must be contiguous on q's device"


def sparse_attention_fwd(inputs: Inputs) -> Outputs:
    """Forward of the op: same inputs, dtypes and semantics as ``reference.sparse_attention_fwd``.

    Args:
        inputs: q ``[B, S, H, D]`` bf16 (fp32 accepted, for tests), D a multiple of 16; kv ``[B, S, D]``
            q's dtype; sink ``[H]`` fp32; pool ``[B, P, D]`` q's dtype or None; topk ``[B, S, K]`` int32
            or None; doc_ids ``[B, S]`` integer or None; window, scale, ratio as in the reference.
    Returns:
        out ``[B, S, H, D]`` in q's dtype, lse ``[B, S, H]`` fp32 (without the sink; -inf for a row
        with nothing visible).
    """
    q = inputs.q
    return fwd_with_tiles(inputs, fwd_tiles(q.shape[2], q.shape[3], q.dtype))


def fwd_with_tiles(inputs: Inputs, tiles: Tiles) -> Outputs:
    """:func:`sparse_attention_fwd` with explicit tiles (tests and the benchmark sweep)."""
    q, kv, sink, pool, topk, doc_ids, window, scale, ratio = inputs
    check_inputs(q, kv, sink, pool, topk, doc_ids)
    batch, seq_len, heads, dim = q.shape
    check_tiles(tiles, dim)
    out = torch.empty_like(q)
    lse = torch.empty(batch, seq_len, heads, dtype=torch.float32, device=q.device)
    kind = pool_kind(pool, topk)
    grid = (seq_len * triton.cdiv(heads, tiles.block_h) * triton.cdiv(dim, tiles.block_dv), batch)
    _sparse_attention_fwd_kernel[grid](
        q, kv, sink,
        kv if pool is None else pool,  # a valid pointer when there is no pool (never read)
        kv if topk is None else topk,
        document_starts(doc_ids, batch, seq_len, q.device), out, lse,
        seq_len, heads, dim,
        0 if pool is None else pool.shape[1], 0 if topk is None else topk.shape[2],
        min(window, seq_len), ratio, scale * 1.4426950408889634,
        POOL=kind, BLOCK_H=tiles.block_h, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
        BLOCK_DV=tiles.block_dv, D_PAD=triton.next_power_of_2(dim), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return Outputs(out, lse)
