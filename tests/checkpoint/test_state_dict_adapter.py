"""State-dict adapter: titan <-> HF names, expert stacking, MTP under official names, hash-layer bias,
errors."""

import pytest
import torch

from titan_v4.checkpoint.state_dict_adapter import DeepSeekV4StateDictAdapter
from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.model import DeepSeekV4Model


@pytest.fixture(scope="module")
def model_and_adapter():
    args = deepseek_v4_args["debugmodel"].replace(max_seq_len=32)
    torch.manual_seed(0)
    model = DeepSeekV4Model(args)
    model.init_weights()
    return model, DeepSeekV4StateDictAdapter(args, None)


def test_round_trip_keeps_every_tensor(model_and_adapter):
    model, adapter = model_and_adapter
    sd = model.state_dict()
    back = adapter.from_hf(adapter.to_hf(sd))
    hash_bias = {f"layers.{i}.moe.expert_bias" for i in range(model.model_args.n_hash_layers)}
    assert set(back) == set(sd) - hash_bias
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k


def test_hf_names_and_expert_stacking(model_and_adapter):
    model, adapter = model_and_adapter
    hf = adapter.to_hf(model.state_dict())
    moe = model.layers["1"].moe
    gate_up = hf["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(gate_up, torch.cat((moe.experts.w1, moe.experts.w3), dim=1))
    assert torch.equal(hf["model.layers.1.mlp.experts.down_proj"], moe.experts.w2)
    assert torch.equal(hf["model.layers.1.mlp.gate.e_score_correction_bias"], moe.expert_bias)
    assert torch.equal(hf["model.layers.0.mlp.gate.tid2eid"], model.layers["0"].moe.router.tid2eid)
    assert "model.layers.0.mlp.gate.e_score_correction_bias" not in hf  # hash layer
    assert "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight" in hf
    assert all(k.startswith(("model.", "lm_head.", "mtp.")) for k in hf)


def test_mtp_keeps_its_official_names(model_and_adapter):
    """HF has no MTP: the block is written under the official checkpoint's names, one tensor per
    routed expert (spelled out here from the official schema, not from the adapter's table)."""
    model, adapter = model_and_adapter
    hf = adapter.to_hf(model.state_dict())
    mtp = model.mtp["0"]
    expected = {
        "mtp.0.e_proj.weight": mtp.e_proj.weight,
        "mtp.0.h_proj.weight": mtp.h_proj.weight,
        "mtp.0.enorm.weight": mtp.enorm.weight,
        "mtp.0.hnorm.weight": mtp.hnorm.weight,
        "mtp.0.norm.weight": mtp.norm.weight,
        "mtp.0.hc_head_fn": mtp.hc_head.fn,
        "mtp.0.hc_attn_base": mtp.hc_attn.base,
        "mtp.0.attn_norm.weight": mtp.attention_norm.weight,
        "mtp.0.attn.wq_a.weight": mtp.attention.wq_a.weight,
        "mtp.0.attn.attn_sink": mtp.attention.attn_sink,
        "mtp.0.ffn.gate.weight": mtp.moe.router.gate.weight,
        "mtp.0.ffn.gate.bias": mtp.moe.expert_bias,
        "mtp.0.ffn.shared_experts.w2.weight": mtp.moe.shared_experts.w2.weight,
        "mtp.0.ffn.experts.0.w1.weight": mtp.moe.experts.w1[0],
        "mtp.0.ffn.experts.5.w3.weight": mtp.moe.experts.w3[5],
        "mtp.0.ffn.experts.7.w2.weight": mtp.moe.experts.w2[7],
    }
    for name, value in expected.items():
        assert torch.equal(hf[name], value), name
    mtp_keys = [k for k in hf if k.startswith("mtp.")]
    assert len([k for k in mtp_keys if ".ffn.experts." in k]) == 3 * model.model_args.n_routed_experts
    assert not any("self_attn" in k or "mlp." in k for k in mtp_keys)


def test_mtp_experts_must_all_be_there(model_and_adapter):
    model, adapter = model_and_adapter
    hf = adapter.to_hf(model.state_dict())
    del hf["mtp.0.ffn.experts.3.w2.weight"]
    with pytest.raises(KeyError, match=r"mtp.0.moe.experts.w2 needs the per-expert weights of experts 0..7, got experts \[0, 1, 2, 4, 5, 6, 7\]"):
        adapter.from_hf(hf)


def test_unknown_keys_are_errors(model_and_adapter):
    _, adapter = model_and_adapter
    with pytest.raises(KeyError, match="unknown titan-v4 key 'layers.0.foo'"):
        adapter.to_hf({"layers.0.foo": torch.zeros(1)})
    with pytest.raises(KeyError, match="unknown HF DeepseekV4 key 'model.layers.0.bar'"):
        adapter.from_hf({"model.layers.0.bar": torch.zeros(1)})
