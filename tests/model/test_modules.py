"""Unit tests of the V4 modules against independent math (fp64 eager formulas written here)."""

import math

import pytest
import torch
import torch.nn.functional as F

from tolerances import TOLERANCES, errors
from titan_v4.model.args import CSA, HCA, SWA, DeepSeekV4ModelArgs
from titan_v4.model.model import (
    Attention,
    Compressor,
    DeepSeekV4Model,
    HyperConnection,
    HyperHead,
    Indexer,
    apply_rope,
    rope_inv_freq,
    rope_table,
)
from titan_v4.model.moe import (
    ClampedGroupedExperts,
    V4MoE,
    V4Router,
    clamped_swiglu,
    count_tokens_per_expert,
    sequence_balance_loss,
)


def tiny_args(**changes) -> DeepSeekV4ModelArgs:
    base = dict(
        vocab_size=64, dim=32, n_layers=4, n_heads=4, head_dim=16, rope_head_dim=8, q_lora_rank=24,
        o_groups=2, o_lora_rank=8, window_size=6, attn_types=(SWA, CSA, HCA, CSA), csa_ratio=4,
        hca_ratio=8, index_n_heads=2, index_head_dim=12, index_topk=3, original_seq_len=16,
        n_routed_experts=6, n_activated_experts=2, moe_inter_dim=16, n_hash_layers=1, mtp_depth=1,
        max_seq_len=64, use_grouped_mm=False, route_scale=1.5, swiglu_limit=0.5,
    )  # fmt: skip
    base.update(changes)
    return DeepSeekV4ModelArgs(**base)


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Random non-trivial values for every parameter (biases, sinks, scales included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) / max(p.shape[-1], 1) ** 0.25)


def close(actual, expected, dtype=torch.float64, kind="out"):
    tol = TOLERANCES[(dtype, kind)]
    err = errors(actual, expected)
    assert err.rel_rms <= tol.rel_rms and err.max_rel <= tol.max_rel, f"{err} > {tol}"


# ---------------------------------------------------------------------- RoPE
def test_rope_main_frequencies_are_plain():
    a = tiny_args()
    expected = [1.0 / a.rope_theta ** (2 * i / a.rope_head_dim) for i in range(a.rope_head_dim // 2)]
    assert torch.allclose(rope_inv_freq(a, a.rope_theta, yarn=False).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)


def test_rope_yarn_frequencies_follow_the_yarn_formula():
    """YaRN (paper eq. / official precompute_freqs_cis): high frequencies kept, low ones divided by
    `factor`, a linear ramp between the correction dims (floor / ceil), no mscale."""
    a = tiny_args(head_dim=64, index_head_dim=32, rope_head_dim=32, original_seq_len=4096, rope_factor=16.0, beta_fast=32.0, beta_slow=1.0)
    dim, base = a.rope_head_dim, a.compress_rope_theta
    freqs = [base ** (-2 * i / dim) for i in range(dim // 2)]

    def corr(rot):
        return dim * math.log(a.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr(a.beta_fast)), 0), min(math.ceil(corr(a.beta_slow)), dim - 1)
    expected = []
    for i, f in enumerate(freqs):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        expected.append(f / a.rope_factor * ramp + f * (1 - ramp))
    got = rope_inv_freq(a, base, yarn=True).double()
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    assert got[0] == pytest.approx(freqs[0], rel=1e-6) and got[-1] == pytest.approx(freqs[-1] / 16, rel=1e-6)
    assert 0 < low < high < dim // 2  # the ramp is exercised


def test_apply_rope_is_an_interleaved_complex_rotation_of_the_trailing_channels():
    a = tiny_args()
    cos, sin = rope_table(a, a.rope_theta, yarn=False)[:, :10].double()
    x = torch.randn(2, 10, 3, a.head_dim, dtype=torch.float64)
    out = apply_rope(x, cos, sin)
    r = a.rope_head_dim
    z = torch.view_as_complex(x[..., -r:].reshape(2, 10, 3, r // 2, 2).contiguous())
    rot = torch.view_as_real(z * torch.complex(cos, sin)[:, None]).flatten(-2)
    close(out[..., -r:], rot)
    assert torch.equal(out[..., :-r], x[..., :-r])
    close(apply_rope(out, cos, -sin), x, dtype=torch.float32)  # de-rotation inverts it (fp32 tables)
    assert apply_rope(x.float(), cos.float(), sin.float()).dtype == torch.float32
    assert apply_rope(x.bfloat16(), cos.float(), sin.float()).dtype == torch.bfloat16


def test_roped_dot_products_depend_on_relative_position_only():
    a = tiny_args()
    cos, sin = rope_table(a, a.compress_rope_theta, yarn=True).double()
    q, k = torch.randn(2, a.rope_head_dim, dtype=torch.float64)
    qs = apply_rope(q.expand(1, 40, -1), cos[:40], sin[:40])[0]
    ks = apply_rope(k.expand(1, 40, -1), cos[:40], sin[:40])[0]
    assert torch.allclose(qs[10] @ ks[7], qs[30] @ ks[27], rtol=1e-5)


# ---------------------------------------------------------------------- compressors
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


# ---------------------------------------------------------------------- indexer
def test_indexer_picks_top_visible_entries_with_sentinel():
    a = tiny_args(index_topk=3)
    idx = Indexer(a).double()
    randomize_(idx, seed=5)
    s = 30
    x = torch.randn(2, s, a.dim, dtype=torch.float64)
    q_latent = torch.randn(2, s, a.q_lora_rank, dtype=torch.float64)
    cos, sin = rope_table(a, a.compress_rope_theta, yarn=True)[:, :s].double()
    picks = idx(x, q_latent, cos, sin)
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


def test_indexer_gets_no_gradient():
    a = tiny_args()
    attn = Attention(a, CSA)
    randomize_(attn, seed=6)
    x = torch.randn(1, 24, a.dim, requires_grad=True)
    cos, sin = rope_table(a, a.compress_rope_theta, yarn=True)[:, :24]
    attn(x, cos, sin).sum().backward()
    assert all(p.grad is None for p in attn.indexer.parameters())
    assert all(p.grad is not None for n, p in attn.named_parameters() if "indexer" not in n)


# ---------------------------------------------------------------------- attention (whole layer)
def reference_attention(attn: Attention, x, cos, sin):
    """Dense fp64 re-derivation of one V4 attention layer from its weights (no custom op)."""
    b, s, _ = x.shape
    h, d = attn.n_heads, attn.head_dim
    eps = attn.norm_eps

    def rms(v, weight=None):
        v = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps)
        return v if weight is None else v * weight

    q_latent = rms(x @ attn.wq_a.weight.T, attn.q_norm.weight)
    q = apply_rope(rms((q_latent @ attn.wq_b.weight.T).view(b, s, h, d)), cos, sin)
    kv = apply_rope(rms(x @ attn.wkv.weight.T, attn.kv_norm.weight), cos, sin)
    keys, allowed = [kv], [torch.ones(s, s, dtype=torch.bool).tril() & ~torch.ones(s, s, dtype=torch.bool).tril(-attn.window_size)]
    allowed = allowed[0].expand(b, s, s)
    if attn.compressor is not None and s >= attn.ratio:
        pool = attn.compressor(x, cos, sin)
        t = torch.arange(s)
        causal = torch.arange(pool.shape[1]).view(1, -1) < ((t + 1) // attn.ratio).view(-1, 1)
        pool_ok = causal.expand(b, s, -1).clone()
        if attn.indexer is not None:
            picks = attn.indexer(x, q_latent, cos, sin).long()
            chosen = torch.zeros_like(pool_ok)
            for bi in range(b):
                for ti in range(s):
                    for e in picks[bi, ti].tolist():
                        if e >= 0:
                            chosen[bi, ti, e] = True
            pool_ok &= chosen
        keys.append(pool)
        allowed = torch.cat((allowed, pool_ok), dim=-1)
    keys = torch.cat(keys, dim=1)  # [B, S+P, D]
    logits = torch.einsum("bshd,bkd->bhsk", q, keys) / math.sqrt(d)
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    sink = attn.attn_sink.view(1, h, 1, 1).expand(b, h, s, 1).to(logits.dtype)
    probs = torch.softmax(torch.cat((logits, sink), -1), -1)[..., :-1]
    out = torch.einsum("bhsk,bkd->bshd", probs, keys)
    out = apply_rope(out, cos, -sin).view(b, s, attn.o_groups, -1)
    out = torch.einsum("bsgi,goi->bsgo", out, attn.wo_a.weight.view(attn.o_groups, attn.o_lora_rank, -1)).flatten(2)
    return out @ attn.wo_b.weight.T


@pytest.mark.parametrize("kind", [pytest.param(SWA, id="swa"), pytest.param(CSA, id="csa"), pytest.param(HCA, id="hca")])
def test_attention_layer_matches_dense_reference(kind):
    a = tiny_args()
    attn = Attention(a, kind).double()
    randomize_(attn, seed=7)
    s = 21
    table = rope_table(a, a.rope_theta if kind == SWA else a.compress_rope_theta, yarn=kind != SWA).double()
    cos, sin = table[:, :s]
    x = torch.randn(2, s, a.dim, dtype=torch.float64)
    close(attn(x, cos, sin), reference_attention(attn, x, cos, sin))


# ---------------------------------------------------------------------- hyper-connections
def test_hyper_connection_matches_formula_and_mixer_is_doubly_stochastic():
    a = tiny_args()
    hc = HyperConnection(a).double()
    randomize_(hc, seed=8)
    x = torch.randn(2, 5, a.hc_mult, a.dim, dtype=torch.float64)
    collapsed, post, comb = hc.collapse(x)
    flat = x.flatten(2)
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + a.norm_eps)
    mix = flat @ hc.fn.T
    n = a.hc_mult
    pre = torch.sigmoid(mix[..., :n] * hc.scale[0] + hc.base[:n]) + a.hc_eps
    close(collapsed, (pre.unsqueeze(-1) * x).sum(2), dtype=torch.float32)  # mHC math runs in fp32
    close(post, 2 * torch.sigmoid(mix[..., n : 2 * n] * hc.scale[1] + hc.base[n : 2 * n]), dtype=torch.float32)
    assert post.dtype == comb.dtype == torch.float32 and collapsed.dtype == torch.float64
    assert torch.allclose(comb.sum(-1), torch.ones(()), atol=1e-3) and torch.allclose(comb.sum(-2), torch.ones(()), atol=1e-5)
    out = torch.randn(2, 5, a.dim, dtype=torch.float64)
    expanded = HyperConnection.expand(x, out, post, comb)
    manual = torch.stack([post[..., k, None].double() * out + sum(comb[..., j, k, None].double() * x[:, :, j] for j in range(n)) for k in range(n)], 2)
    close(expanded, manual)


def test_hyper_head_matches_formula():
    a = tiny_args()
    head = HyperHead(a).double()
    randomize_(head, seed=9)
    x = torch.randn(2, 5, a.hc_mult, a.dim, dtype=torch.float64)
    flat = x.flatten(2)
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + a.norm_eps)
    pre = torch.sigmoid(flat @ head.fn.T * head.scale + head.base) + a.hc_eps
    close(head(x), (pre.unsqueeze(-1) * x).sum(2), dtype=torch.float32)
    assert head(x.bfloat16()).dtype == torch.bfloat16


# ---------------------------------------------------------------------- MoE
def test_clamped_swiglu():
    g = torch.tensor([-20.0, -1.0, 0.5, 3.0, 12.0])
    u = torch.tensor([-15.0, 2.0, -11.0, 9.0, 30.0])
    expected = torch.tensor([F.silu(torch.tensor(-20.0)) * -10, F.silu(torch.tensor(-1.0)) * 2, F.silu(torch.tensor(0.5)) * -10, F.silu(torch.tensor(3.0)) * 9, F.silu(torch.tensor(10.0)) * 10])
    assert torch.allclose(clamped_swiglu(g, u, 10.0), expected)
    assert torch.allclose(clamped_swiglu(g, u, 0.0), F.silu(g) * u)  # 0 = no clamp (official Expert)


@pytest.mark.parametrize("hash_routed", [pytest.param(False, id="learned"), pytest.param(True, id="hash")])
def test_router_matches_formula(hash_routed):
    a = tiny_args()
    router = V4Router(a, hash_routed).double()
    randomize_(router, seed=10)
    if hash_routed:
        router.init_hash_table(layer_id=0)
    x = torch.randn(50, a.dim, dtype=torch.float64)
    ids = torch.randint(0, a.vocab_size, (5, 10))
    bias = torch.randn(a.n_routed_experts, dtype=torch.float64)
    weights, selected, counts, scores = router(x, None if hash_routed else bias, ids)
    expected_scores = torch.sqrt(F.softplus((x @ router.gate.weight.T).double()))
    close(scores, expected_scores)
    for t in range(50):
        chosen = router.tid2eid[ids.flatten()[t]] if hash_routed else (expected_scores[t] + bias).topk(2).indices
        assert sorted(selected[t].tolist()) == sorted(chosen.tolist())
        w = expected_scores[t, selected[t]]  # unbiased scores, renormalised, scaled
        close(weights[t], w / w.sum() * a.route_scale)
    assert weights.dtype == scores.dtype == torch.float64 and selected.dtype == torch.int64
    bf16_weights, _, _, bf16_scores = router.bfloat16()(x.bfloat16(), None if hash_routed else bias.float(), ids)
    assert bf16_weights.dtype == bf16_scores.dtype == torch.float32  # routing math stays in fp32
    assert torch.equal(counts, torch.bincount(selected.flatten(), minlength=a.n_routed_experts))


def test_hash_table_is_deterministic_with_distinct_experts():
    a = tiny_args()
    r1, r2 = V4Router(a, True), V4Router(a, True)
    r1.init_hash_table(0)
    r2.init_hash_table(0)
    assert torch.equal(r1.tid2eid, r2.tid2eid)
    assert r1.tid2eid.dtype == torch.int64 and r1.tid2eid.shape == (a.vocab_size, a.n_activated_experts)
    assert all(len(set(row)) == a.n_activated_experts for row in r1.tid2eid.tolist())
    assert r1.tid2eid.min() >= 0 and r1.tid2eid.max() < a.n_routed_experts
    r2.init_hash_table(1)
    assert not torch.equal(r1.tid2eid, r2.tid2eid)
    assert "router.tid2eid" in V4MoE(a, 0, True).state_dict()  # persistent: checkpoints carry it


def test_experts_loop_matches_per_row_formula():
    a = tiny_args()
    ex = ClampedGroupedExperts(a.dim, a.moe_inter_dim, 4, use_grouped_mm=False, swiglu_limit=0.5).double()
    randomize_(ex, seed=11)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(int(counts.sum()), a.dim, dtype=torch.float64)
    out = ex(x, counts)
    owner = torch.repeat_interleave(torch.arange(4), counts)
    for i in range(len(x)):
        e = owner[i]
        ref = clamped_swiglu(ex.w1[e] @ x[i], ex.w3[e] @ x[i], 0.5) @ ex.w2[e].T
        close(out[i], ref)


def test_moe_matches_dense_reference():
    a = tiny_args(seq_balance_loss_weight=0.0)
    moe = V4MoE(a, layer_id=1, hash_routed=False).double()
    randomize_(moe, seed=12)
    moe.expert_bias = 0.1 * torch.randn(a.n_routed_experts, dtype=torch.float64)
    x = torch.randn(2, 7, a.dim, dtype=torch.float64)
    out = moe(x)
    flat = x.view(-1, a.dim)
    weights, selected, _, _ = moe.router(flat, moe.expert_bias)
    ref = []
    for t in range(len(flat)):
        y = sum(weights[t, k] * (clamped_swiglu(moe.experts.w1[e] @ flat[t], moe.experts.w3[e] @ flat[t], a.swiglu_limit) @ moe.experts.w2[e].T) for k, e in enumerate(selected[t].tolist()))
        sh = moe.shared_experts
        ref.append(y + sh.w2(F.silu(sh.w1(flat[t])) * sh.w3(flat[t])))  # shared expert not clamped
    close(out, torch.stack(ref).view_as(out))
    assert torch.equal(moe.tokens_per_expert, count_tokens_per_expert(selected, a.n_routed_experts).to(moe.tokens_per_expert.dtype))


def test_sequence_balance_loss_formula_and_gradient():
    a = tiny_args(seq_balance_loss_weight=0.5)
    moe = V4MoE(a, layer_id=1, hash_routed=False).double().train()
    randomize_(moe, seed=13)
    moe.expert_bias = torch.zeros(a.n_routed_experts, dtype=torch.float64)
    x = torch.randn(3, 8, a.dim, dtype=torch.float64)
    scores = moe.router.scores(x.view(-1, a.dim)).view(3, 8, -1).double()
    selected = moe.router(x.view(-1, a.dim))[1].view(3, 8, -1)
    E, K, S = a.n_routed_experts, a.n_activated_experts, 8
    expected = 0.0
    for b in range(3):
        f = torch.zeros(E, dtype=torch.float64)
        for e in selected[b].flatten().tolist():
            f[e] += E / (K * S)
        p = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
        expected += (f * p).sum() / 3
    assert sequence_balance_loss(scores, selected, E).item() == pytest.approx(expected.item(), rel=1e-6)

    # The loss reaches the router through the output's backward, weighted and scaled.
    moe.aux_loss_scale.fill_(0.25)
    moe(x).sum().backward()
    with_aux = moe.router.gate.weight.grad.clone()
    moe.zero_grad()
    moe.seq_balance_loss_weight = 0.0
    moe(x).sum().backward()
    aux_grad = with_aux - moe.router.gate.weight.grad
    gate = moe.router.gate.weight.detach().clone().requires_grad_(True)
    s = torch.sqrt(F.softplus(x.view(-1, a.dim) @ gate.T)).view(3, 8, -1)
    close(aux_grad, torch.autograd.grad(sequence_balance_loss(s, selected, E) * 0.5 * 0.25, gate)[0], kind="grad")


def test_hash_layer_has_no_balance_loss_and_needs_ids():
    a = tiny_args(seq_balance_loss_weight=1.0)
    moe = V4MoE(a, layer_id=0, hash_routed=True).train()
    randomize_(moe, seed=14)
    moe.router.init_hash_table(0)
    x = torch.randn(1, 4, a.dim)
    with pytest.raises(ValueError, match="token_ids"):
        moe(x)
    ids = torch.randint(0, a.vocab_size, (1, 4))
    assert moe(x, ids).grad_fn.name() != "_AttachAuxLossBackward"


# ---------------------------------------------------------------------- MTP and the model
def test_mtp_shapes_targets_and_causality():
    a = tiny_args()
    torch.manual_seed(0)
    model = DeepSeekV4Model(a).double()
    model.init_weights()
    randomize_(model.mtp, seed=15)
    tokens = torch.randint(0, a.vocab_size, (2, 24))
    logits, (mtp,) = model(tokens)
    assert logits.shape == mtp.shape == (2, 24, a.vocab_size) and mtp.dtype == torch.float64
    # Depth-1 position i sees tokens <= i+1 (it embeds token i+1), never i+2 or later.
    p = 12
    changed = tokens.clone()
    changed[:, p] = (changed[:, p] + 1) % a.vocab_size
    logits2, (mtp2,) = model(changed)
    assert torch.equal(logits2[:, :p], logits[:, :p]) and not torch.equal(logits2[:, p], logits[:, p])
    assert torch.equal(mtp2[:, : p - 1], mtp[:, : p - 1]) and not torch.equal(mtp2[:, p - 1], mtp[:, p - 1])

    from titan_v4.model.loss import V4Loss, mtp_cross_entropy

    labels = torch.roll(tokens, -1, 1)
    ce = lambda lg, lb: F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), reduction="sum")  # noqa: E731
    # position i of depth 1 predicts token i+2 = labels[i+1]
    targets = torch.stack([tokens[:, i + 2] for i in range(22)], 1)  # depth 1, position i -> token i+2
    assert mtp_cross_entropy(mtp[:, :-1], labels[:, :-1], 1).item() == pytest.approx(ce(mtp[:, :22], targets).item())
    assert V4Loss(0.3)((logits, (mtp,)), labels).item() == pytest.approx((ce(logits, labels) + 0.3 * ce(mtp[:, :-1], labels[:, 1:])).item())


def test_model_is_causal_and_dtypes():
    a = tiny_args(mtp_depth=0)
    model = DeepSeekV4Model(a)
    model.init_weights()
    tokens = torch.randint(0, a.vocab_size, (1, 40))
    logits = model(tokens)
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 40, a.vocab_size) and logits.dtype == torch.float32
    for p in (5, 17, 33):
        changed = tokens.clone()
        changed[0, p] = (changed[0, p] + 1) % a.vocab_size
        out = model(changed)
        assert torch.equal(out[:, :p], logits[:, :p]), f"position < {p} saw token {p}"
    assert model.to(torch.bfloat16)(tokens).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")])
def test_module_output_dtypes(dtype):
    """Activations keep the input dtype; routing weights / mHC mixers are fp32; ids are integers."""
    from titan_v4.model.model import TransformerBlock
    from titan_v4.model.mtp import MTPBlock

    a = tiny_args()
    s = 20
    cos, sin = rope_table(a, a.compress_rope_theta, yarn=True)[:, :s]
    x = torch.randn(2, s, a.dim).to(dtype)
    for kind in (SWA, CSA, HCA):
        attn = Attention(a, kind).to(dtype)
        randomize_(attn)
        assert attn(x, cos, sin).dtype == dtype, kind
    comp = Compressor(a.dim, 8, 4, True, a.norm_eps).to(dtype)
    assert comp(x, cos, sin).dtype == dtype
    idx = Indexer(a).to(dtype)
    assert idx(x, torch.randn(2, s, a.q_lora_rank).to(dtype), cos, sin).dtype == torch.int32
    streams = torch.randn(2, s, a.hc_mult, a.dim).to(dtype)
    hc = HyperConnection(a).to(dtype)
    randomize_(hc)
    collapsed, post, comb = hc.collapse(streams)
    assert (collapsed.dtype, post.dtype, comb.dtype) == (dtype, torch.float32, torch.float32)
    moe = V4MoE(a, 1, hash_routed=False).to(dtype)
    randomize_(moe)
    moe.expert_bias = torch.zeros(a.n_routed_experts)
    assert moe(x).dtype == dtype
    block = TransformerBlock(0, a, SWA, hash_routed=True).to(dtype)
    randomize_(block)
    block.moe.router.init_hash_table(0)
    ids = torch.randint(0, a.vocab_size, (2, s))
    assert block(streams, cos, sin, ids).dtype == dtype
    mtp = MTPBlock(4, a).to(dtype)
    randomize_(mtp)
    mtp.moe.expert_bias = torch.zeros(a.n_routed_experts)
    assert mtp(streams, x, cos, sin).dtype == dtype
