"""titan_v4.model.args: every bad value is refused with the field, the value and what is allowed."""

import pytest

from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.args import ModelArgsError


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
        deepseek_v4_args["debugmodel"].replace(**changes)
    message = str(info.value)
    assert f"DeepSeekV4ModelArgs.{field}=" in message and allowed in message
    assert repr(changes.get(field, next(iter(changes.values())))) in message or field == "attn_types"
