"""titan_v4.train.optimizer: aux-loss-free expert balancing over every learned-routing MoE layer
(MTP included), hooked into the TrainSpec's optimizer builder; optimizer states created up front."""

import types

import torch

import titan_v4
from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.model import DeepSeekV4Model
from titan_v4.model.moe import moe_layers
from titan_v4.train.optimizer import build_v4_optimizers, init_optimizer_state, update_expert_bias

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


def test_bias_does_not_move_when_the_backbone_is_frozen():
    args = deepseek_v4_args["debugmodel"].replace(max_seq_len=32)
    model = DeepSeekV4Model(args)
    model.init_weights()
    moes = moe_layers([model])
    for m in moes:
        m.tokens_per_expert.copy_(torch.arange(args.n_routed_experts, dtype=m.tokens_per_expert.dtype))
    before = [m.expert_bias.clone() for m in moes]
    update_expert_bias(moes, SINGLE_PROCESS, move=False)
    assert all(torch.equal(m.expert_bias, b) for m, b in zip(moes, before))
    assert all(m.tokens_per_expert.abs().sum() == 0 for m in moes)


def _adamw(model):
    container = types.SimpleNamespace(optimizers=[torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)])
    return container


def test_init_optimizer_state_is_a_fresh_state_for_every_parameter():
    """Every parameter gets a state before any gradient; the updates that follow are bitwise those of
    a fresh optimizer (first-step bias correction included), and a parameter that never gets a
    gradient keeps its value (no weight decay without a gradient)."""
    torch.manual_seed(0)
    fresh, early = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    early.load_state_dict(fresh.state_dict())
    opt_fresh, opt_early = _adamw(fresh), _adamw(early)
    init_optimizer_state(opt_early)
    state = opt_early.optimizers[0].state
    assert set(state) == set(early.parameters())
    assert all(float(s["step"]) == 0 and s["exp_avg"].abs().sum() == 0 for s in state.values())
    assert torch.equal(early.weight, fresh.weight) and early.weight.grad is None
    x = torch.randn(5, 4)
    for step in range(3):
        for model, opt in ((fresh, opt_fresh), (early, opt_early)):
            opt.optimizers[0].zero_grad()
            (model(x) ** 2).sum().backward()
            if step == 0:
                model.bias.grad = None  # the bias misses its first gradient
            opt.optimizers[0].step()
        assert torch.equal(early.weight, fresh.weight) and torch.equal(early.bias, fresh.bias), step
