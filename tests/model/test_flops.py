"""titan_v4.model.flops: attended pairs against a per-query count, and the whole FLOP rule."""

import pytest
import torch

from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.attn_kinds import CSA, HCA, SWA
from titan_v4.model.flops import visible_pairs_per_query
from titan_v4.model.model import DeepSeekV4Model


def brute_force_pairs(args, kind, s):
    """Count attended (query, key) pairs from the op's visibility rules, query by query."""
    total = scored = 0
    r = args.compress_ratio(kind)
    for t in range(s):
        total += min(t + 1, args.window_size)
        if kind != SWA:
            visible = (t + 1) // r
            total += min(visible, args.index_topk) if kind == CSA else visible
            scored += visible if kind == CSA else 0
    return total / s, scored / s


@pytest.mark.parametrize("kind", [SWA, CSA, HCA])
@pytest.mark.parametrize("s", [5, 16, 37, 300])
def test_visible_pairs_count(kind, s):
    args = deepseek_v4_args["debugmodel"]
    assert visible_pairs_per_query(args, kind, s) == pytest.approx(brute_force_pairs(args, kind, s))


def test_flops_follow_design_rule():
    """6 x (trained params per token) + 2 x indexer params + attention pairs; embedding excluded."""
    args = deepseek_v4_args["debugmodel"]
    with torch.device("meta"):
        model = DeepSeekV4Model(args)
    s = 64
    nparams, flops = args.get_nparams_and_flops(model, s)
    assert nparams == sum(p.numel() for p in model.parameters())
    named = dict(model.named_parameters())
    emb = named["tok_embeddings.weight"].numel()
    idx = sum(p.numel() for n, p in named.items() if ".indexer." in n)
    experts = sum(p.numel() for n, p in named.items() if ".moe.experts." in n)
    dense = nparams - emb - idx - experts + named["output.weight"].numel() * args.mtp_depth
    matmul = 6 * (dense + experts * args.n_activated_experts // args.n_routed_experts) + 2 * idx
    attn = 0.0
    for kind in args.attn_types + (SWA,) * args.mtp_depth:
        pairs, scored = brute_force_pairs(args, kind, s)
        attn += 4 * args.head_dim * args.n_heads * 3.5 * pairs + 2 * args.index_head_dim * args.index_n_heads * scored
    assert flops == pytest.approx(matmul + attn, rel=1e-9, abs=1)
