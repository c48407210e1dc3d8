"""Model args: validation messages, flavors, HF / official config import, FLOP count."""

import dataclasses

import pytest
import torch

import titan_v4
from titan_v4.model.args import CSA, HCA, SWA, DeepSeekV4ModelArgs, ModelArgsError, visible_pairs_per_query
from titan_v4.model.model import DeepSeekV4Model


@pytest.mark.parametrize(
    "changes, field, allowed",
    [
        pytest.param(dict(n_layers=3), "attn_types", "needs exactly n_layers=3", id="schedule-length"),
        pytest.param(dict(attn_types=("swa", "csa", "mla", "csa")), "attn_types", "allowed kinds", id="unknown-kind"),
        pytest.param(dict(window_size=0), "window_size", ">= 1", id="window"),
        pytest.param(dict(index_topk=0), "index_topk", ">= 1", id="topk"),
        pytest.param(dict(rope_head_dim=15), "rope_head_dim", "must be even", id="rope-odd"),
        pytest.param(dict(rope_head_dim=128), "rope_head_dim", "<= head_dim", id="rope-too-big"),
        pytest.param(dict(hc_mult=0), "hc_mult", ">= 1", id="hc-mult"),
        pytest.param(dict(o_groups=3), "o_groups", "must divide n_heads", id="o-groups"),
        pytest.param(dict(n_activated_experts=9), "n_activated_experts", "<= n_routed_experts", id="topk-experts"),
        pytest.param(dict(n_hash_layers=5), "n_hash_layers", "<= n_layers", id="hash-layers"),
        pytest.param(dict(score_func="relu"), "score_func", "allowed", id="score-func"),
        pytest.param(dict(mtp_depth=-1), "mtp_depth", ">= 0", id="mtp-depth"),
        pytest.param(dict(hc_eps=0.0), "hc_eps", "> 0", id="hc-eps"),
        pytest.param(dict(swiglu_limit=-1.0), "swiglu_limit", ">= 0", id="swiglu-limit"),
        pytest.param(dict(dim=2.5), "dim", "integer", id="non-integer"),
    ],
)
def test_bad_args_name_field_value_and_allowed(changes, field, allowed):
    with pytest.raises(ModelArgsError) as info:
        titan_v4.deepseek_v4_args["debugmodel"].replace(**changes)
    message = str(info.value)
    assert f"DeepSeekV4ModelArgs.{field}=" in message and allowed in message
    assert repr(changes.get(field, next(iter(changes.values())))) in message or field == "attn_types"


def test_unknown_flavor_lists_allowed():
    with pytest.raises(KeyError, match=r"model.flavor='flashh'.*allowed: \['debugmodel', 'flash', 'flash_proxy', 'pro'\]"):
        titan_v4.deepseek_v4_args["flashh"]


def test_flavors_are_the_released_models():
    flash, pro = titan_v4.deepseek_v4_args["flash"], titan_v4.deepseek_v4_args["pro"]
    assert flash.attn_types[:4] == (SWA, SWA, CSA, HCA) and len(flash.attn_types) == 43
    assert pro.attn_types[:4] == (HCA, HCA, CSA, HCA) and len(pro.attn_types) == 61  # HCA-first
    assert flash.attn_types.count(CSA) == 21 and pro.attn_types.count(HCA) == 31
    assert (flash.route_scale, pro.route_scale, flash.index_topk, pro.index_topk) == (1.5, 2.5, 512, 1024)
    # Published sizes: Flash 284B without its MTP block, Pro 1.6T.
    with torch.device("meta"):
        n_flash = sum(p.numel() for n, p in DeepSeekV4Model(flash).named_parameters() if not n.startswith("mtp."))
        n_pro = sum(p.numel() for p in DeepSeekV4Model(pro).parameters())
    assert abs(n_flash / 284e9 - 1) < 0.005 and abs(n_pro / 1.6e12 - 1) < 0.01, (n_flash, n_pro)
    debug = titan_v4.deepseek_v4_args["debugmodel"]
    assert set(debug.attn_types) == {SWA, CSA, HCA} and 0 < debug.n_hash_layers < debug.n_layers
    assert debug.hc_mult == 4 and debug.mtp_depth >= 1
    proxy = titan_v4.deepseek_v4_args["flash_proxy"]
    assert proxy.attn_types == (SWA, CSA, HCA, CSA) and (proxy.n_routed_experts, proxy.n_activated_experts) == (16, 6)
    assert (proxy.dim, proxy.n_heads, proxy.moe_inter_dim) == (flash.dim, flash.n_heads, flash.moe_inter_dim)


FLASH_HF_CONFIG = {  # V4-Flash config.json (V4_REFERENCE.md §1.1)
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "hidden_size": 4096,
    "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512,
    "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "n_routed_experts": 256,
    "num_experts_per_tok": 6, "n_shared_experts": 1, "moe_intermediate_size": 2048,
    "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc",
    "norm_topk_prob": True, "swiglu_limit": 10.0, "num_hash_layers": 3, "num_nextn_predict_layers": 1,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rope_theta": 10000, "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 1048576, "vocab_size": 129280, "bos_token_id": 0, "eos_token_id": 1,
    "rms_norm_eps": 1e-6, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "expert_dtype": "fp4",
    "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}  # fmt: skip

PRO_OFFICIAL_CONFIG = {  # V4-Pro inference/config.json (V4_REFERENCE.md §1.2)
    "vocab_size": 129280, "dim": 7168, "moe_inter_dim": 3072, "n_layers": 61, "n_hash_layers": 3,
    "n_heads": 128, "n_routed_experts": 384, "n_shared_experts": 1, "n_activated_experts": 6,
    "score_func": "sqrtsoftplus", "route_scale": 2.5, "swiglu_limit": 10.0, "q_lora_rank": 1536,
    "head_dim": 512, "rope_head_dim": 64, "o_groups": 16, "o_lora_rank": 1024, "window_size": 128,
    "original_seq_len": 65536, "rope_theta": 10000, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 1024, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4", "compress_rope_theta": 160000,
    "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0],
}  # fmt: skip


def _same(a: DeepSeekV4ModelArgs, b: DeepSeekV4ModelArgs) -> list[str]:
    return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def test_from_hf_config_reproduces_flash_and_official_pro():
    assert _same(DeepSeekV4ModelArgs.from_hf_config(FLASH_HF_CONFIG), titan_v4.deepseek_v4_args["flash"]) == []
    pro = DeepSeekV4ModelArgs.from_hf_config(PRO_OFFICIAL_CONFIG, mtp_depth=1)
    assert _same(pro, titan_v4.deepseek_v4_args["pro"]) == []
    assert DeepSeekV4ModelArgs.from_hf_config({**FLASH_HF_CONFIG, "num_nextn_predict_layers": 0}).mtp_depth == 0


@pytest.mark.parametrize(
    "changes, match",
    [
        pytest.param({"compress_ratios": [0, 3] + [4, 128] * 20 + [4, 0]}, "compress_ratios entry 3", id="bad-ratio"),
        pytest.param({"compress_ratios": [0, 0] + [4, 128] * 20 + [4, 4]}, "MTP entries", id="mtp-not-swa"),
        pytest.param({"num_key_value_heads": 2}, "num_key_value_heads=2", id="kv-heads"),
        pytest.param({"index_topk": None}, "lacks the fields", id="missing"),
    ],
)
def test_from_hf_config_rejects_what_it_cannot_build(changes, match):
    with pytest.raises(ModelArgsError, match=match):
        DeepSeekV4ModelArgs.from_hf_config({**FLASH_HF_CONFIG, **changes})


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
    args = titan_v4.deepseek_v4_args["debugmodel"]
    assert visible_pairs_per_query(args, kind, s) == pytest.approx(brute_force_pairs(args, kind, s))


def test_flops_follow_design_rule():
    """6 x (trained params per token) + 2 x indexer params + attention pairs; embedding excluded."""
    args = titan_v4.deepseek_v4_args["debugmodel"]
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
