"""Parameter and training-FLOP count of a DeepSeek-V4 model (the one rule of docs/design.md).

* Matmuls: 6 x the parameters a token touches (routed experts: only the active share; the output
  head once more per MTP depth, since MTP reuses it). Modules without an LM-loss gradient (the
  lightning indexer and its compressor) count forward only: 2 x their parameters.
* Attention: 4 * head_dim * heads per attended (query, key) pair forward, 2.5x that backward,
  where the attended pairs are exactly those the attention op visits (window keys plus the
  selected or causally visible compressed entries), never S^2. Indexer scoring: 2 * index_head_dim
  * index_heads per scored entry, forward only.
* Embedding lookups, norms and the mHC elementwise work are not counted.

`args` below is a `DeepSeekV4ModelArgs` (args.py imports this module, so it is not imported here).
"""

from __future__ import annotations

import math

from torch import nn

from .attn_kinds import CSA, SWA


def visible_pairs_per_query(args, attn_type: str, seq_len: int) -> tuple[float, float]:
    """(attended key entries, indexer-scored pool entries) per query, averaged over positions 0..S-1.

    Attended = local window keys + the pool entries the op attends (all causally visible for HCA,
    at most index_topk for CSA). The indexer scores every causally visible CSA entry.
    """
    s = seq_len
    w = args.window_size
    # sum_{t<S} min(t + 1, W)
    local = w * (w + 1) // 2 + (s - w) * w if s > w else s * (s + 1) // 2
    pooled = scored = 0
    if attn_type != SWA:
        r = args.compress_ratio(attn_type)
        visible = [(t + 1) // r for t in range(s)]
        scored = sum(visible) if attn_type == CSA else 0
        pooled = sum(min(v, args.index_topk) for v in visible) if attn_type == CSA else sum(visible)
    return (local + pooled) / s, scored / s


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
    matmul = 6 * (trained_dense + active_experts + head * args.mtp_depth) + 2 * indexer

    attn_per_pair = 4 * args.head_dim * args.n_heads * 3.5  # forward + 2.5x backward
    score_per_entry = 2 * args.index_head_dim * args.index_n_heads
    attention = 0.0
    for kind in args.attn_types + (SWA,) * args.mtp_depth:
        attended, scored = visible_pairs_per_query(args, kind, seq_len)
        attention += attn_per_pair * attended + score_per_entry * scored
    return nparams, int(matmul + math.ceil(attention))
