"""A checkpoint that does not fit the configured model is refused before any weight is read, naming
the first mismatching config field or tensor with both values or shapes."""

import pytest
import torch

from tests.helpers.initial_load import load_like_torchtitan
from tests.helpers.official_checkpoint import official_weights, write_official
from titan_v4.checkpoint.directory import CheckpointDirectory, CheckpointMismatchError
from titan_v4.checkpoint.hf_config import hf_config_from_args
from titan_v4.checkpoint.safetensors_file import SafetensorsFormatError
from titan_v4.checkpoint.state_dict_adapter import expected_hf_tensors
from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.model import DeepSeekV4Model

ARGS = deepseek_v4_args["debugmodel"].replace(max_seq_len=64)
WEIGHTS = official_weights(ARGS, seed=0)


def refuses(path, args, error, match) -> None:
    """Loading `path` into a model with `args` raises `error` and leaves every weight untouched."""
    torch.manual_seed(0)
    model = DeepSeekV4Model(args)
    model.init_weights()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        load_like_torchtitan(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_wrong_flavor_names_the_config_field(tmp_path):
    write_official(tmp_path, ARGS, WEIGHTS, config=hf_config_from_args(ARGS))
    other = deepseek_v4_args["debugmodel"].replace(max_seq_len=64, moe_inter_dim=64)
    refuses(tmp_path, other, CheckpointMismatchError, r"config.json: moe_inter_dim = 128, but the configured model has moe_inter_dim = 64")


def test_without_config_the_first_mismatching_tensor_is_named_with_both_shapes(tmp_path):
    write_official(tmp_path, ARGS, WEIGHTS)
    other = deepseek_v4_args["debugmodel"].replace(max_seq_len=64, q_lora_rank=32)
    refuses(
        tmp_path, other, CheckpointMismatchError,
        r"layers.0.attn.wq_a.weight has shape \[64, 128\], but the configured model's model.layers.0.self_attn.q_a_proj.weight is \[32, 128\]",
    )
    fewer_experts = deepseek_v4_args["debugmodel"].replace(max_seq_len=64, n_routed_experts=4)
    refuses(tmp_path, fewer_experts, CheckpointMismatchError, r"layers.0.ffn.gate.weight has shape \[8, 128\], but .* is \[4, 128\]")


def test_tensors_the_model_lacks_are_refused(tmp_path):
    write_official(tmp_path, ARGS, WEIGHTS)
    refuses(tmp_path, ARGS.replace(mtp_depth=0), CheckpointMismatchError, r"stored tensor\(s\) are not part of the configured model; the first: mtp.0.")


@pytest.mark.parametrize(
    "dropped, match",
    [
        pytest.param("layers.2.ffn.experts.6.w3.weight", r"layers.2.ffn.experts.6.w3.weight is missing \(the configured model's model.layers.2.mlp.experts.gate_up_proj has shape \[8, 256, 128\]\)", id="expert"),
        pytest.param("layers.1.attn.wq_b.scale", r"layers.1.attn.wq_b.weight is quantised \(F8_E4M3\) but layers.1.attn.wq_b.scale is missing", id="fp8-scale"),
        pytest.param("layers.3.ffn.experts.0.w2.scale", r"layers.3.ffn.experts.0.w2.weight is quantised \(I8\) but .*w2.scale is missing", id="fp4-scale"),
        pytest.param("layers.0.ffn.gate.tid2eid", r"layers.0.ffn.gate.tid2eid is missing", id="hash-table"),
    ],
)
def test_missing_tensors_are_named(tmp_path, dropped, match):
    write_official(tmp_path, ARGS, WEIGHTS, drop=(dropped,))
    refuses(tmp_path, ARGS, CheckpointMismatchError, match)


def test_truncated_shard_is_named(tmp_path):
    write_official(tmp_path, ARGS, WEIGHTS, config=hf_config_from_args(ARGS))
    shard = tmp_path / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    refuses(tmp_path, ARGS, SafetensorsFormatError, r"model-00002-of-00003.safetensors is truncated: \S+ ends at byte")


def test_missing_shard_is_named(tmp_path):
    write_official(tmp_path, ARGS, WEIGHTS, config=hf_config_from_args(ARGS))
    (tmp_path / "model-00003-of-00003.safetensors").unlink()
    refuses(tmp_path, ARGS, FileNotFoundError, r"model.safetensors.index.json lists 1 shard\(s\) that are not in .*; the first: model-00003-of-00003.safetensors")


def test_scale_of_the_wrong_shape_is_named(tmp_path):
    write_official(tmp_path, ARGS, WEIGHTS)
    directory = CheckpointDirectory(tmp_path)
    stored = directory.tensors["layers.1.attn.wq_b.scale"]
    object.__setattr__(stored, "shape", (1, 1))  # as if the file said so
    with pytest.raises(CheckpointMismatchError, match=r"fp8 weight \[256, 64\] needs a F8_E8M0/F32 scale of shape \[2, 1\]; layers.1.attn.wq_b.scale is F8_E8M0 \[1, 1\]"):
        directory.entries(expected_hf_tensors(ARGS), ARGS.n_routed_experts)


def test_unknown_layout_is_refused(tmp_path):
    write_official(tmp_path, ARGS, WEIGHTS, drop=("embed.weight",))
    with pytest.raises(CheckpointMismatchError, match="cannot tell the layout: expected the official `embed.weight` or HF's `model.embed_tokens.weight`, found neither"):
        CheckpointDirectory(tmp_path)


def test_a_config_without_yarn_is_compared_on_what_it_states(tmp_path):
    """A config.json whose compressed-layer RoPE is plain states no YaRN values: against a YaRN
    model the RoPE type is named, and a plain-RoPE model loads it whatever its (unused) YaRN fields."""
    config = hf_config_from_args(ARGS)
    config["rope_parameters"]["compress"] = {"rope_type": "default", "rope_theta": ARGS.compress_rope_theta}
    write_official(tmp_path, ARGS, WEIGHTS, config=config)
    refuses(tmp_path, ARGS, CheckpointMismatchError, r"config.json: compress_rope_type = 'default', but the configured model has compress_rope_type = 'yarn'$")
    model = DeepSeekV4Model(ARGS.replace(compress_rope_type="default", original_seq_len=4096, rope_factor=8.0))
    load_like_torchtitan(model, tmp_path)
