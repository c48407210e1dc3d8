"""titan_v4.model.compressor: the compressors against a window loop, their causality, and the
indexer's picks against brute-force scores (fp64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.tiny_model import close, randomize_, tiny_args
from titan_v4.model.compressor import Compressor, Indexer
from titan_v4.model.rope import apply_rope, rope_table


def reference_pool(kv, gate, ape, ratio, overlap, head_dim):
    """Loop over windows: entry w = sum_j softmax_j(gate_j + ape_j) * kv_j over its slots (fp64)."""
    b, s, _ = kv.shape
    entries = []
    for w in range(s // ratio):
        rows = list(range(w * ratio, (w + 1) * ratio))
        if overlap:
            slots_kv = [kv[:, j, head_dim:] for j in rows]
            slots_gate = [gate[:, j, head_dim:] + ape[j - w * ratio, head_dim:] for j in rows]
            if w > 0:
                prev = list(range((w - 1) * ratio, w * ratio))
                slots_kv = [kv[:, j, :head_dim] for j in prev] + slots_kv
                slots_gate = [gate[:, j, :head_dim] + ape[j - (w - 1) * ratio, :head_dim] for j in prev] + slots_gate
        else:
            slots_kv = [kv[:, j] for j in rows]
            slots_gate = [gate[:, j] + ape[j - w * ratio] for j in rows]
        weights = torch.softmax(torch.stack(slots_gate, 1), dim=1)
        entries.append((weights * torch.stack(slots_kv, 1)).sum(1))
    return torch.stack(entries, 1)


@pytest.mark.parametrize("overlap", [pytest.param(False, id="hca"), pytest.param(True, id="csa")])
@pytest.mark.parametrize("seq", [pytest.param(19, id="partial-window"), pytest.param(3, id="shorter-than-ratio"), pytest.param(16, id="exact")])
def test_compressor_matches_window_loop(overlap, seq):
    a = tiny_args()
    ratio, d = 4, 10
    comp = Compressor(a.dim, d, ratio, overlap, eps=a.norm_eps).double()
    randomize_(comp, seed=3)
    x = torch.randn(2, seq, a.dim, dtype=torch.float64)
    cos, sin = rope_table(a, a.compress_rope_theta, yarn=True)[:, :seq].double()
    out = comp(x, cos, sin)
    assert out.shape == (2, seq // ratio, d) and out.dtype == torch.float64
    if seq < ratio:
        return
    pooled = reference_pool(comp.wkv(x), comp.wgate(x), comp.ape, ratio, overlap, d)
    normed = pooled * torch.rsqrt(pooled.square().mean(-1, keepdim=True) + a.norm_eps) * comp.norm.weight
    positions = torch.arange(seq // ratio) * ratio
    close(out, apply_rope(normed, cos[positions], sin[positions]))


@pytest.mark.parametrize("overlap", [pytest.param(False, id="hca"), pytest.param(True, id="csa")])
def test_compressor_entry_sees_only_its_windows(overlap):
    """Entry w depends on tokens [w*r, (w+1)*r) (HCA) or [(w-1)*r, (w+1)*r) (CSA), never later ones."""
    a = tiny_args()
    r = 4
    comp = Compressor(a.dim, 8, r, overlap, eps=a.norm_eps).double()
    randomize_(comp, seed=4)
    cos, sin = rope_table(a, a.compress_rope_theta, yarn=True)[:, :24].double()
    x = torch.randn(1, 24, a.dim, dtype=torch.float64)
    base = comp(x, cos, sin)
    for p in range(24):
        y = x.clone()
        y[:, p] += 1.0
        changed = (comp(y, cos, sin) - base).abs().amax(-1)[0] > 0
        first = p // r
        last = first + 1 if overlap else first
        expected = torch.zeros(6, dtype=torch.bool)
        expected[first : min(last, 5) + 1] = True
        assert torch.equal(changed, expected), f"token {p}: entries {changed.nonzero().flatten().tolist()}"


def test_indexer_picks_top_visible_entries_with_sentinel():
    a = tiny_args(index_topk=3)
    idx = Indexer(a).double()
    randomize_(idx, seed=5)
    s = 30
    x = torch.randn(2, s, a.dim, dtype=torch.float64)
    q_latent = torch.randn(2, s, a.q_lora_rank, dtype=torch.float64)
    cos, sin = rope_table(a, a.compress_rope_theta, yarn=True)[:, :s].double()
    picks = idx.select(idx(x, q_latent, cos, sin))
    assert picks.dtype == torch.int32 and picks.shape == (2, s, 3)

    # Independent scores: sum_h w_h relu(q_h . k_s) / sqrt(dI), w = weights_proj(x) / sqrt(nI).
    keys = idx.compressor(x, cos, sin)
    q = apply_rope(idx.wq_b(q_latent).view(2, s, a.index_n_heads, a.index_head_dim), cos, sin)
    w = idx.weights_proj(x) / math.sqrt(a.index_n_heads)
    for b in range(2):
        for t in range(s):
            visible = (t + 1) // a.csa_ratio
            row = picks[b, t].tolist()
            n_valid = min(visible, 3)
            assert sorted(row)[: 3 - n_valid] == [-1] * (3 - n_valid), f"t={t}: {row}"
            valid = [i for i in row if i >= 0]
            assert len(set(valid)) == len(valid) and all(i < visible for i in valid), f"t={t}: {row}"
            if visible == 0:
                continue
            scores = torch.stack([(w[b, t] * F.relu(q[b, t] @ keys[b, e]) / math.sqrt(a.index_head_dim)).sum() for e in range(visible)])
            # Compare score values, not ids: relu makes exact ties (0) common.
            best = scores.topk(n_valid).values
            assert torch.allclose(scores[valid].sort().values, best.sort().values, rtol=1e-9, atol=0), f"t={t}"


def test_indexer_under_autocast_with_bf16_activations():
    """Under single-device autocast the streams (and so x) are bf16 while the parameters are fp32:
    the indexer's fp32 head weights must not mix the two."""
    a = tiny_args()
    idx = Indexer(a)
    randomize_(idx, seed=6)
    x = torch.randn(1, 12, a.dim).bfloat16()
    q_latent = torch.randn(1, 12, a.q_lora_rank).bfloat16()
    cos, sin = rope_table(a, a.compress_rope_theta, yarn=True)[:, :12]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        queries = idx(x, q_latent, cos, sin)
    assert queries.weights.dtype == torch.float32
    expected = F.linear(x.float(), idx.weights_proj.weight) * (a.index_n_heads * a.index_head_dim) ** -0.5
    close(queries.weights, expected, dtype=torch.float32)
