"""titan_v4.checkpoint.hf_config: the released configs map onto the flavors; what cannot be built is refused."""

import dataclasses

import pytest

from titan_v4.checkpoint.hf_config import args_from_hf_config, config_fields, hf_config_from_args
from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.args import DeepSeekV4ModelArgs, ModelArgsError


FLASH_HF_CONFIG = {  # V4-Flash config.json (docs/deepseek_v4.md)
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

PRO_OFFICIAL_CONFIG = {  # V4-Pro inference/config.json (docs/deepseek_v4.md)
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
    assert _same(args_from_hf_config(FLASH_HF_CONFIG), deepseek_v4_args["flash"]) == []
    pro = args_from_hf_config(PRO_OFFICIAL_CONFIG, mtp_depth=1)
    assert _same(pro, deepseek_v4_args["pro"]) == []
    assert args_from_hf_config({**FLASH_HF_CONFIG, "num_nextn_predict_layers": 0}).mtp_depth == 0


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
        args_from_hf_config({**FLASH_HF_CONFIG, **changes})


@pytest.mark.parametrize("flavor", sorted(deepseek_v4_args))
def test_hf_config_from_args_round_trips(flavor):
    """Every architecture field comes back, through our reader and through HF transformers' own
    config class (which is what reads the HF output of tools/convert.py)."""
    args = deepseek_v4_args[flavor]
    config = hf_config_from_args(args)
    assert _same(args_from_hf_config(config, max_seq_len=args.max_seq_len), args) == []
    transformers = pytest.importorskip("transformers", minversion="5.9")
    hf_view = transformers.DeepseekV4Config(**config).to_dict()
    assert {k: v for k, v in config_fields(hf_view).items() if v != getattr(args, k)} == {}


def test_config_fields_are_the_architecture():
    """config_fields names exactly what a config.json decides; run settings are not among them."""
    fields = config_fields(FLASH_HF_CONFIG)
    assert {"dim", "attn_types", "n_routed_experts", "mtp_depth", "route_scale"} <= set(fields)
    assert not {"max_seq_len", "seq_balance_loss_weight", "load_balance_coeff", "clamp_shared_experts"} & set(fields)
