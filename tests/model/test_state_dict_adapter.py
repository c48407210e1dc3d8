"""State-dict adapter: titan <-> HF names, expert stacking, MTP, hash-layer bias, errors."""

import pytest
import torch

from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.model import DeepSeekV4Model
from titan_v4.model.state_dict_adapter import DeepSeekV4StateDictAdapter


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
    assert "mtp.0.e_proj.weight" in hf and "mtp.0.hc_head.hc_fn" in hf and "mtp.0.self_attn.q_a_proj.weight" in hf
    assert all(k.startswith(("model.", "lm_head.", "mtp.")) for k in hf)


def test_unknown_keys_are_errors(model_and_adapter):
    _, adapter = model_and_adapter
    with pytest.raises(KeyError, match="unknown titan-v4 key 'layers.0.foo'"):
        adapter.to_hf({"layers.0.foo": torch.zeros(1)})
    with pytest.raises(KeyError, match="unknown HF DeepseekV4 key 'model.layers.0.bar'"):
        adapter.from_hf({"model.layers.0.bar": torch.zeros(1)})
