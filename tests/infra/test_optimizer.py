"""titan_v4.infra.optimizer: aux-loss-free expert balancing over every learned-routing MoE layer
(MTP included), hooked into the TrainSpec's optimizer builder."""

import types

import torch

import titan_v4
from titan_v4.flavors import deepseek_v4_args
from titan_v4.infra.optimizer import build_v4_optimizers, update_expert_bias
from titan_v4.model.model import DeepSeekV4Model
from titan_v4.model.moe import moe_layers

SINGLE_PROCESS = types.SimpleNamespace(get_optional_mesh=lambda name: None)


def test_bias_update_rule_on_main_and_mtp_layers():
    args = deepseek_v4_args["debugmodel"].replace(max_seq_len=32)
    model = DeepSeekV4Model(args)
    model.init_weights()
    moes = moe_layers([model])
    assert len(moes) == args.n_layers + args.mtp_depth
    g = torch.Generator().manual_seed(0)
    loads = {id(m): torch.randint(0, 50, (args.n_routed_experts,), generator=g).float() for m in moes}
    for m in moes:
        m.tokens_per_expert.copy_(loads[id(m)])
    before = {id(m): m.expert_bias.clone() for m in moes}
    update_expert_bias(moes, SINGLE_PROCESS)
    for m in moes:
        load = loads[id(m)]
        if m.hash_routed:
            assert torch.equal(m.expert_bias, before[id(m)])  # hash routing ignores the bias
        else:
            delta = args.load_balance_coeff * torch.sign(load.mean() - load)
            assert torch.allclose(m.expert_bias - before[id(m)], delta - delta.mean())
            assert m.expert_bias.abs().sum() > 0
        assert m.tokens_per_expert.abs().sum() == 0
    assert not model.mtp["0"].moe.hash_routed and model.mtp["0"].moe.expert_bias.abs().sum() > 0


def test_v4_train_spec_uses_the_v4_optimizer_builder():
    assert titan_v4.get_v4_train_spec().build_optimizers_fn is build_v4_optimizers
