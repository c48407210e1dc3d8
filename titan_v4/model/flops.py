"""Parameter and training-FLOP count of a DeepSeek-V4 model (the one rule of docs/design.md).

* Matmuls: 6 x the parameters a token touches (routed experts: only the active share; the output
  head once more per MTP depth, since MTP reuses it). The lightning indexer and its compressor
  count forward only (2 x their parameters) in the frozen phase, where they get no gradient, and
  6 x when their KL loss trains them.
* Attention: 4 * head_dim * heads per attended (query, key) pair forward, 2.5x that backward,
  where the attended pairs are exactly those the attention op visits (window keys plus the
  selected, or in the dense phases every, causally visible compressed entry), never S^2.
* Indexer scoring: 2 * index_head_dim * index_heads per scored (query, entry) pair. The selection
  scores every visible entry, forward only (frozen and sparse phases). The KL's student scores the
  compared entries (the selected ones; every visible one in the dense phases) forward and backward
  (3x: the backward recomputes the products and forms dq and dk).
* The KL's teacher: 2 * head_dim * heads per (query, entry) pair it visits (forward only): every
  visible entry once, plus the selected ones again in the sparse phase.
* Embedding lookups, norms and the mHC elementwise work are not counted.

`args` below is a `DeepSeekV4ModelArgs` (args.py imports this module, so it is not imported here).
"""

from __future__ import annotations

import math

from torch import nn

from titan_v4.config import DENSE, FROZEN, SPARSE, WARMUP

from .attn_kinds import CSA, SWA


def visible_pairs_per_query(args, attn_type: str, seq_len: int) -> tuple[float, float, float]:
    """(attended key entries, visible CSA entries, selected CSA entries) per query, averaged over
    positions 0..S-1.

    Attended = local window keys + the pool entries the op attends (all causally visible for HCA and
    for CSA in the dense phases, at most index_topk for CSA otherwise).
    """
    s = seq_len
    w = args.window_size
    # sum_{t<S} min(t + 1, W)
    local = w * (w + 1) // 2 + (s - w) * w if s > w else s * (s + 1) // 2
    pooled = visible_csa = selected_csa = 0
    if attn_type != SWA:
        r = args.compress_ratio(attn_type)
        visible = [(t + 1) // r for t in range(s)]
        if attn_type == CSA:
            visible_csa = sum(visible)
            selected_csa = sum(min(v, args.index_topk) for v in visible)
        dense = attn_type != CSA or args.indexer_phase in (DENSE, WARMUP)
        pooled = sum(visible) if dense else selected_csa
    return (local + pooled) / s, visible_csa / s, selected_csa / s


def indexer_pairs_per_query(args, visible: float, selected: float) -> tuple[float, float, float]:
    """(selection-scored, student-scored, teacher-visited) entries per query of a CSA layer."""
    phase = args.indexer_phase
    selection = visible if phase in (FROZEN, SPARSE) else 0.0
    student = {FROZEN: 0.0, SPARSE: selected}.get(phase, visible)
    teacher = {FROZEN: 0.0, SPARSE: visible + selected}.get(phase, visible)
    return selection, student, teacher


def count_params_and_flops(args, model: nn.Module, seq_len: int) -> tuple[int, int]:
    """(total parameters, training FLOPs per token) of `model` built from `args`; works on meta."""
    nparams = 0
    trained_dense = indexer = experts = 0
    head = 0
    for name, p in model.named_parameters():
        n = p.numel()
        nparams += n
        if "tok_embeddings" in name:
            continue
        if ".indexer." in name:
            indexer += n
        elif ".moe.experts." in name:
            experts += n
        else:
            trained_dense += n
            if name.startswith("output."):
                head = n
    active_experts = experts * args.n_activated_experts // args.n_routed_experts
    indexer_factor = 2 if args.indexer_phase == FROZEN else 6
    matmul = 6 * (trained_dense + active_experts + head * args.mtp_depth) + indexer_factor * indexer

    attn_per_pair = 4 * args.head_dim * args.n_heads * 3.5  # forward + 2.5x backward
    score_per_entry = 2 * args.index_head_dim * args.index_n_heads
    teacher_per_entry = 2 * args.head_dim * args.n_heads
    attention = 0.0
    for kind in args.attn_types + (SWA,) * args.mtp_depth:
        attended, visible, selected = visible_pairs_per_query(args, kind, seq_len)
        selection, student, teacher = indexer_pairs_per_query(args, visible, selected)
        attention += attn_per_pair * attended + score_per_entry * (selection + 3 * student)
        attention += teacher_per_entry * teacher
    return nparams, int(matmul + math.ceil(attention))
