"""titan_v4.train.indexer_phase: in the warmup phase only the indexers keep their gradients."""

import pytest
import torch

from tests.helpers.tiny_model import tiny_args
from titan_v4.model.model import DeepSeekV4Model
from titan_v4.train.indexer_phase import backbone_frozen, drop_backbone_grads, indexer_phase


@pytest.mark.parametrize("phase", ["frozen", "dense", "warmup", "sparse"])
def test_only_warmup_freezes_the_backbone(phase):
    model = DeepSeekV4Model(tiny_args(indexer_phase=phase))
    assert indexer_phase([model]) == phase
    assert backbone_frozen([model]) == (phase == "warmup")


def test_drop_backbone_grads_keeps_exactly_the_indexer_gradients():
    model = DeepSeekV4Model(tiny_args(indexer_phase="warmup"))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    drop_backbone_grads([model])
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".indexer." in name), name
    assert any(p.grad is not None for p in model.parameters())


def test_a_model_without_an_indexer_has_no_phase():
    model = torch.nn.Linear(2, 2)
    assert indexer_phase([model]) is None and not backbone_frozen([model])
