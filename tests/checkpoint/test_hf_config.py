"""titan_v4.checkpoint.hf_config: the released configs map onto the flavors; what cannot be built is refused."""

import dataclasses

import pytest
import torch

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


# ---------------------------------------------------------------------------------- RoPE settings
# The compressed layers' RoPE of a V4 config.json in HF's nested `rope_parameters` form: the ones
# titan-v4 implements, with values other than the released ones.
MAIN_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.125}
COMPRESS_ROPES = {
    "default": {"rope_type": "default", "rope_theta": 160000.0, "partial_rotary_factor": 0.125},
    "yarn-own-values": {
        "rope_type": "yarn", "rope_theta": 40000.0, "partial_rotary_factor": 0.125, "factor": 4.0,
        "original_max_position_embeddings": 4096, "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.25,
    },
}  # fmt: skip


def nested_rope_config(compress: dict, main: dict = MAIN_ROPE) -> dict:
    """FLASH_HF_CONFIG with HF's nested rope_parameters instead of the legacy rope_scaling."""
    config = {k: v for k, v in FLASH_HF_CONFIG.items() if k != "rope_scaling"}
    return {**config, "rope_parameters": {"main": dict(main), "compress": dict(compress)}}


@pytest.mark.parametrize("name", sorted(COMPRESS_ROPES))
def test_rope_parameters_round_trip_exactly(name):
    """config.json -> args -> config.json keeps rope_parameters as written, and args -> config.json
    -> args keeps every field."""
    config = nested_rope_config(COMPRESS_ROPES[name])
    args = args_from_hf_config(config)
    assert hf_config_from_args(args)["rope_parameters"] == config["rope_parameters"]
    assert _same(args_from_hf_config(hf_config_from_args(args)), args) == []


# Configs whose RoPE transformers reads in every way it can be written: legacy `rope_scaling`, a
# flat `rope_parameters` (both get attention_factor 1), nested (attention factor from the file,
# else from `mscale` / `factor` as YaRN defines it), official names, and no RoPE settings at all.
ROPE_CONFIGS = {
    "released-rope_scaling": FLASH_HF_CONFIG,
    "no-rope-settings": {k: v for k, v in FLASH_HF_CONFIG.items() if k != "rope_scaling"},
    "flat-rope_parameters": {
        **{k: v for k, v in FLASH_HF_CONFIG.items() if k != "rope_scaling"},
        "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024, "beta_fast": 24.0},
        "max_position_embeddings": 8192,
    },
    **{f"nested-{name}": nested_rope_config(compress) for name, compress in COMPRESS_ROPES.items()},
    "nested-yarn-without-attention_factor": nested_rope_config(
        {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 8.0, "original_max_position_embeddings": 1024}
    ),
    "nested-yarn-mscale": nested_rope_config(
        {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 8.0, "original_max_position_embeddings": 1024,
         "mscale": 1.0, "mscale_all_dim": 0.5}
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(ROPE_CONFIGS))
def test_rope_tables_equal_transformers(name):
    """Both RoPE tables of the args read from a config.json equal the cos / sin (times YaRN's
    attention factor) that HF transformers' DeepseekV4RotaryEmbedding computes from the same file."""
    transformers = pytest.importorskip("transformers", minversion="5.9")
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    from titan_v4.model.rope import compress_rope_table, main_rope_table

    seq = 2048
    config = ROPE_CONFIGS[name]
    args = args_from_hf_config(config, max_seq_len=seq)
    hf = DeepseekV4RotaryEmbedding(transformers.DeepseekV4Config(**config))
    positions = torch.arange(seq)[None]
    for label, table in (("main", main_rope_table(args)), ("compress", compress_rope_table(args))):
        cos, sin = hf(torch.zeros(1, dtype=torch.float32), positions, layer_type=label)
        # Angles up to ~2000 rad in fp32: a few ulp of the angle apart at most.
        assert torch.allclose(table[0], cos[0], rtol=0, atol=2e-4), (label, (table[0] - cos[0]).abs().max())
        assert torch.allclose(table[1], sin[0], rtol=0, atol=2e-4), (label, (table[1] - sin[0]).abs().max())


@pytest.mark.parametrize(
    "config, match",
    [
        pytest.param(nested_rope_config({**COMPRESS_ROPES["default"], "rope_type": "llama3"}),
                     r"rope_parameters.compress.rope_type = 'llama3' is not supported; allowed: 'default', 'yarn'", id="llama3"),
        pytest.param(nested_rope_config({**COMPRESS_ROPES["default"], "rope_type": "dynamic"}),
                     r"rope_parameters.compress.rope_type = 'dynamic' is not supported; allowed: 'default', 'yarn'", id="dynamic"),
        pytest.param({**FLASH_HF_CONFIG, "rope_scaling": {**FLASH_HF_CONFIG["rope_scaling"], "type": "longrope"}},
                     r"rope_scaling.type = 'longrope' is not supported; allowed: 'default', 'yarn'", id="legacy-longrope"),
        pytest.param(nested_rope_config(COMPRESS_ROPES["default"], main={**MAIN_ROPE, "rope_type": "yarn"}),
                     r"rope_parameters.main.rope_type = 'yarn' is not supported; allowed: 'default'", id="main-yarn"),
        pytest.param(nested_rope_config({k: v for k, v in COMPRESS_ROPES["yarn-own-values"].items() if k != "factor"}),
                     r"rope_parameters.compress.factor is missing; YaRN needs it", id="yarn-without-factor"),
        pytest.param(nested_rope_config({**COMPRESS_ROPES["yarn-own-values"], "truncate": False}),
                     r"rope_parameters.compress.truncate = False is not supported; allowed: true", id="no-truncate"),
        pytest.param(nested_rope_config({**COMPRESS_ROPES["default"], "partial_rotary_factor": 0.25}),
                     r"rope_parameters.compress.partial_rotary_factor = 0.25 is not supported; allowed: 0.125", id="rotary-fraction"),
    ],
)  # fmt: skip
def test_rope_settings_the_model_lacks_are_refused(config, match):
    with pytest.raises(ModelArgsError, match=match):
        args_from_hf_config(config)
