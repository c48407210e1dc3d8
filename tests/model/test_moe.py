"""titan_v4.model.moe: clamped SwiGLU, routers, hash table, experts and the whole MoE against
per-token formulas (fp64), the sequence-wise balance loss and its injected gradient."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.tiny_model import close, randomize_, tiny_args
from titan_v4.checkpoint.hf_config import args_from_hf_config
from titan_v4.flavors import deepseek_v4_args
from titan_v4.model import moe as moe_module
from titan_v4.model.moe import (
    ClampedGroupedExperts,
    V4MoE,
    V4Router,
    clamped_swiglu,
    count_tokens_per_expert,
    grouped_mm_applies,
    sequence_balance_loss,
)


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


def test_hash_table_ignores_a_surrounding_default_device():
    """Built under `with torch.device(...)` (how benchmarks and the trainer build on a GPU), the table
    is still drawn from the CPU generator: the same table as without the context."""
    a = tiny_args()
    plain, under_context = V4Router(a, True), V4Router(a, True)
    plain.init_hash_table(3)
    with torch.device("meta"):
        under_context.init_hash_table(3)
    assert torch.equal(plain.tid2eid, under_context.tid2eid)


def test_experts_loop_matches_per_row_formula():
    a = tiny_args()
    ex = ClampedGroupedExperts(a.dim, a.moe_inter_dim, 4, swiglu_limit=0.5).double()
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
    moe.balance_loss.grad_scale.fill_(0.25)
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


# ---------------------------------------------------------------------- expert compute path
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_cpu_experts_never_take_the_bf16_grouped_gemm(dtype):
    x = torch.randn(4, 8).to(dtype)
    assert not grouped_mm_applies(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not grouped_mm_applies(x)


def test_model_built_outside_the_trainer_computes_experts_in_its_own_dtype(monkeypatch):
    """Args built from an HF config (no trainer, no update_from_config) on the CPU: the fp64 MoE
    equals the per-token fp64 formula to fp64 rounding (a bf16 GEMM would be ~1e-3 off)."""
    monkeypatch.setattr(moe_module, "_run_clamped_experts_grouped_mm", None)  # any use would fail
    hf_like = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
        qk_rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=8, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention"], index_n_heads=2, index_head_dim=12,
        index_topk=3, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
        num_hash_layers=0, routed_scaling_factor=1.5, swiglu_limit=0.5, num_nextn_predict_layers=0,
    )  # fmt: skip
    a = args_from_hf_config(hf_like, seq_balance_loss_weight=0.0)
    moe = V4MoE(a, layer_id=1, hash_routed=False).double()
    randomize_(moe, seed=21)
    moe.expert_bias = torch.zeros(a.n_routed_experts, dtype=torch.float64)
    x = torch.randn(3, 5, a.dim, dtype=torch.float64)
    flat = x.view(-1, a.dim)
    weights, selected, _, _ = moe.router(flat, moe.expert_bias)
    ex, sh = moe.experts, moe.shared_experts
    ref = torch.stack([
        sum(weights[t, k] * (clamped_swiglu(ex.w1[e] @ flat[t], ex.w3[e] @ flat[t], 0.5) @ ex.w2[e].T) for k, e in enumerate(selected[t].tolist()))
        + sh.w2(F.silu(sh.w1(flat[t])) * sh.w3(flat[t]))
        for t in range(len(flat))
    ])  # fmt: skip
    close(moe(x), ref.view_as(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_expert_path_follows_the_call_dtype():
    x = torch.randn(4, 8, device="cuda")
    sm90 = torch.cuda.get_device_capability() >= (9, 0)
    assert not grouped_mm_applies(x)  # fp32 without autocast: the exact loop
    assert not grouped_mm_applies(x.double())
    assert grouped_mm_applies(x.bfloat16()) == sm90
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert grouped_mm_applies(x) == sm90
    a = deepseek_v4_args["debugmodel"].replace(max_seq_len=32, seq_balance_loss_weight=0.0)
    moe = V4MoE(a, layer_id=1, hash_routed=False).cuda()
    randomize_(moe, seed=22)
    moe.expert_bias = torch.zeros(a.n_routed_experts, device="cuda")
    xs = torch.randn(2, 16, a.dim, device="cuda")
    fp32_out = moe(xs)
    fp64_out = moe.double()(xs.double())
    close(fp32_out, fp64_out, dtype=torch.float32)  # the experts ran in fp32, not bf16
