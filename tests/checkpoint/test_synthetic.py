"""Random official-layout checkpoints (for load benchmarks): complete, in the released dtypes, and
loadable into a model that then computes finite logits."""

import pytest
import torch

from tests.helpers.initial_load import load_like_torchtitan
from tests.helpers.official_checkpoint import official_schema
from titan_v4.checkpoint.directory import CheckpointDirectory
from titan_v4.checkpoint.synthetic import write_synthetic_official
from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.model import DeepSeekV4Model

ARGS = deepseek_v4_args["debugmodel"].replace(max_seq_len=64)


@pytest.mark.parametrize("experts, dtype", [("fp4", "I8"), ("fp8", "F8_E4M3")])
def test_synthetic_checkpoint_is_complete_and_loads(tmp_path, experts, dtype):
    write_synthetic_official(tmp_path, ARGS, experts=experts, std=0.02)
    stored = CheckpointDirectory(tmp_path).tensors
    weights = {k for k in stored if not k.endswith(".scale")}
    assert weights == set(official_schema(ARGS))  # the independent schema of tests/helpers
    assert stored["layers.2.ffn.experts.3.w1.weight"].dtype == dtype
    assert stored["layers.2.attn.wq_b.weight"].dtype == "F8_E4M3" and stored["layers.2.attn.wq_b.scale"].dtype == "F8_E8M0"
    assert stored["layers.0.ffn.gate.tid2eid"].dtype == "I64"
    model = DeepSeekV4Model(ARGS)
    model.init_weights()
    load_like_torchtitan(model, tmp_path)
    assert 0.01 < model.layers["2"].moe.experts.w2.std() < 0.04
    tids = model.layers["0"].moe.router.tid2eid
    assert all(len(set(row.tolist())) == tids.shape[1] for row in tids[:50])  # distinct experts per token
    with torch.no_grad():
        logits, _ = model(torch.randint(0, ARGS.vocab_size, (1, 32)))
    assert torch.isfinite(logits).all()
