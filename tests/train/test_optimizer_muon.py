"""``optimizer.name = "Muon"`` in build_v4_optimizers: which parameters go to Muon and which to
AdamW, the settings each group gets, checkpointing through torchtitan's container, and the refusal
of sharded layouts."""

import copy
import types

import pytest
import torch
from torchtitan.config import Optimizer as OptimizerConfig

from titan_v4.config import V4, JobConfigError
from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.model import DeepSeekV4Model
from titan_v4.train.muon import MuonWithAdamW
from titan_v4.train.optimizer import build_v4_optimizers, init_optimizer_state, muon_or_adamw

LAYOUT = dict(fsdp_enabled=False, dp_replicate_enabled=False, tp_enabled=False, ep_enabled=False, pp_enabled=False)
SINGLE_PROCESS = types.SimpleNamespace(get_optional_mesh=lambda name: None, **LAYOUT)

# Written out from the paper's exception list and docs/deepseek_v4.md's decisions, by parameter name.
ADAMW_LEAVES = {"attention_norm.weight", "ffn_norm.weight", "q_norm.weight", "kv_norm.weight", "norm.weight",
                "enorm.weight", "hnorm.weight", "attn_sink", "ape", "hc_attn.base", "hc_attn.scale",
                "hc_ffn.base", "hc_ffn.scale", "hc_head.base", "hc_head.scale"}  # fmt: skip


def _model():
    torch.manual_seed(0)
    model = DeepSeekV4Model(deepseek_v4_args["debugmodel"].replace(max_seq_len=32))
    model.init_weights()
    return model


def _config(**overrides):
    config = OptimizerConfig(name="Muon", lr=1e-2, eps=1e-20, weight_decay=0.1, implementation="for-loop")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_grouping_rule_on_every_parameter():
    model = _model()
    for name, p in model.named_parameters():
        two_leaves = ".".join(name.split(".")[-2:])
        expected = ("adamw" if name in ("tok_embeddings.weight", "output.weight") or two_leaves in ADAMW_LEAVES
                    or name.split(".")[-1] in ADAMW_LEAVES else "muon")  # fmt: skip
        assert muon_or_adamw(name, p) == expected, name
        assert expected == "adamw" or p.dim() >= 2, name
    wrapped = "layers.0._checkpoint_wrapped_module.attention.attn_sink"
    assert muon_or_adamw(wrapped, model.layers["0"].attention.attn_sink) == "adamw"
    with pytest.raises(ValueError, match=r"parameter 'layers.0.moe.mystery' \(shape \(4,\)\) fits neither"):
        muon_or_adamw("layers.0.moe.mystery", torch.zeros(4))


def test_container_groups_and_settings():
    model = _model()
    config = _config()
    config.v4 = V4(muon_momentum=0.9, muon_ns_steps=5, muon_ns_cleanup_steps=1, muon_update_rms=0.2)
    container = build_v4_optimizers([model], config, SINGLE_PROCESS)
    (optimizer,) = container.optimizers
    assert isinstance(optimizer, MuonWithAdamW)
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    adamw = [g for g in optimizer.param_groups if g.get("algorithm") == "adamw"]
    assert len(adamw) == 1
    assert (adamw[0]["betas"], adamw[0]["eps"], adamw[0]["weight_decay"], adamw[0]["lr"]) == ((0.9, 0.95), 1e-20, 0.1, 1e-2)
    for g in optimizer.param_groups:
        if g.get("algorithm", "muon") == "muon":
            assert (g["momentum"], g["update_rms"], g["weight_decay"], g["lr"]) == (0.9, 0.2, 0.1, 1e-2)
            assert g["ns_coefficients"] == ((3.4445, -4.7750, 2.0315),) * 5 + ((2.0, -1.5, 0.5),)
    blocks = {p: g["row_blocks"] for g in optimizer.param_groups for p in g["params"]}
    attention = model.layers["0"].attention
    assert blocks[attention.wo_a.weight] == (attention.o_lora_rank,) * attention.o_groups
    assert blocks[model.layers["0"].hc_attn.fn] == (4, 4, 16)
    assert blocks[model.layers["0"].moe.experts.w1] is None


def test_checkpoint_round_trip_through_the_container():
    """torchtitan's container state dict (flattened, by parameter name) restores a state that steps
    on exactly like the uninterrupted optimizer."""
    x = torch.randint(0, 2048, (2, 32))

    def step(model, container):
        container.zero_grad()
        logits = model(x)[0]  # (main logits, MTP logits): the MTP block gets no gradient here
        logits.float().square().mean().backward()
        container.step()

    first = _model()
    c_first = build_v4_optimizers([first], _config(), SINGLE_PROCESS)
    init_optimizer_state(c_first)
    step(first, c_first)
    saved = copy.deepcopy(c_first.state_dict())  # a checkpoint's own tensors, not the live state
    assert any(k.endswith("momentum_buffer") for k in saved) and any(k.endswith("exp_avg_sq") for k in saved)
    second = _model()
    second.load_state_dict(first.state_dict())
    c_second = build_v4_optimizers([second], _config(), SINGLE_PROCESS)
    init_optimizer_state(c_second)
    c_second.load_state_dict(saved)
    for _ in range(2):
        step(first, c_first)
        step(second, c_second)
    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("field", ["tp_enabled", "early_step_in_backward", "fault_tolerance"])
def test_refuses_what_muon_does_not_handle(field):
    dims = types.SimpleNamespace(get_optional_mesh=lambda name: None, **{**LAYOUT, "tp_enabled": field == "tp_enabled"})
    config = _config()
    config.early_step_in_backward = field == "early_step_in_backward"
    ft = types.SimpleNamespace(enabled=True) if field == "fault_tolerance" else None
    what = {"tp_enabled": "tensor parallelism", "early_step_in_backward": "optimizer.early_step_in_backward",
            "fault_tolerance": "fault tolerance"}[field]  # fmt: skip
    with pytest.raises(JobConfigError, match=rf"optimizer.name='Muon' is invalid with {what}: not implemented for Muon"):
        build_v4_optimizers([_model()], config, dims, ft)


def test_init_optimizer_state_leaves_the_model_unchanged():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    container = build_v4_optimizers([model], _config(), SINGLE_PROCESS)
    init_optimizer_state(container)
    (optimizer,) = container.optimizers
    assert set(optimizer.state) == set(model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        state = optimizer.state[p]
        buffers = [state[k] for k in ("momentum_buffer", "exp_avg", "exp_avg_sq") if k in state]
        assert buffers and all(b.abs().sum() == 0 for b in buffers), name
