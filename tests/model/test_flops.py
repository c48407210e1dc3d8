"""titan_v4.model.flops: attended pairs against a per-query count, and the whole FLOP rule."""

import pytest
import torch

from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.attn_kinds import CSA, HCA, SWA
from titan_v4.model.flops import indexer_pairs_per_query, visible_pairs_per_query
from titan_v4.model.model import DeepSeekV4Model


def brute_force_pairs(args, kind, s):
    """Per query, from the op's visibility rules, query by query: (attended pairs, CSA entries the
    selection scores, the student scores (fwd + bwd) and the teacher visits) for args.indexer_phase."""
    total = selection = student = teacher = 0
    r = args.compress_ratio(kind)
    phase = args.indexer_phase
    for t in range(s):
        total += min(t + 1, args.window_size)
        if kind == SWA:
            continue
        visible = (t + 1) // r
        selected = min(visible, args.index_topk)
        if kind == HCA or phase in ("dense", "warmup"):
            total += visible
        else:
            total += selected
        if kind != CSA:
            continue
        if phase == "frozen":
            selection += visible
        elif phase == "sparse":
            selection += visible
            student += selected
            teacher += visible + selected
        else:  # dense, warmup: no selection; student and teacher over every visible entry
            student += visible
            teacher += visible
    return total / s, selection / s, student / s, teacher / s


PHASES = ["frozen", "dense", "warmup", "sparse"]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", [SWA, CSA, HCA])
@pytest.mark.parametrize("s", [5, 16, 37, 300])
def test_visible_pairs_count(kind, s, phase):
    args = deepseek_v4_args["debugmodel"].replace(indexer_phase=phase)
    attended, visible, selected = visible_pairs_per_query(args, kind, s)
    expected = brute_force_pairs(args, kind, s)
    assert attended == pytest.approx(expected[0])
    assert indexer_pairs_per_query(args, visible, selected) == pytest.approx(expected[1:])


@pytest.mark.parametrize("phase", PHASES)
def test_flops_follow_design_rule(phase):
    """6 x (trained params per token) + 2 or 6 x indexer params + attention pairs + indexer scoring
    and teacher; embedding excluded."""
    args = deepseek_v4_args["debugmodel"].replace(indexer_phase=phase)
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
    matmul = 6 * (dense + experts * args.n_activated_experts // args.n_routed_experts) + (2 if phase == "frozen" else 6) * idx
    attn = 0.0
    for kind in args.attn_types + (SWA,) * args.mtp_depth:
        pairs, selection, student, teacher = brute_force_pairs(args, kind, s)
        attn += 4 * args.head_dim * args.n_heads * 3.5 * pairs
        attn += 2 * args.index_head_dim * args.index_n_heads * (selection + 3 * student)
        attn += 2 * args.head_dim * args.n_heads * teacher
    assert flops == pytest.approx(matmul + attn, rel=1e-9, abs=1)
