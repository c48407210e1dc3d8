"""titan_v4.train.clip: clipping through the fused AdamW's grad_scale gives torchtitan's clipped update."""

import pytest
import torch
import torchtitan.distributed.utils as dist_utils
from torch import nn

from titan_v4.train.clip import FoldedClipping, total_grad_norm


class _Container:  # the part of torchtitan's OptimizersContainer that FoldedClipping reads
    def __init__(self, optimizers):
        self.optimizers = optimizers


def _model_and_grads(seed: int, grad_scale: float):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
            p.grad = grad_scale * torch.randn(p.shape, generator=g)
    model[0].bias.grad = None  # a parameter without a gradient (a frozen one) is skipped
    return model


def test_total_grad_norm_is_the_2_norm_of_every_gradient():
    model = _model_and_grads(0, 3.0)
    expected = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None]).norm()
    norm = total_grad_norm(model.parameters())
    assert norm.dtype == torch.float32 and norm.dim() == 0
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("grad_scale", [3.0, 0.01])  # clipping active (norm ~ 20) and inactive (~ 0.07)
def test_folded_clipping_gives_torchtitans_clipped_adamw_update(grad_scale):
    updated = {}
    for folded in (False, True):
        model = _model_and_grads(1, grad_scale)
        # eps 1: the update depends on the gradients' scale (with a tiny eps Adam's first step would not)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, eps=1.0, fused=True)
        clipping = FoldedClipping(_Container([optimizer]))
        assert clipping.applies
        with clipping.during_step() if folded else torch.enable_grad():
            # the call torchtitan's Trainer.train_step makes
            norm = dist_utils.clip_grad_norm_(list(model.parameters()), 1.0, foreach=True, pp_mesh=None, ep_enabled=False)
            if folded:
                assert clipping.norm is norm
            optimizer.step()
        assert not hasattr(optimizer, "grad_scale") and clipping.norm is None  # nothing outlives the step
        updated[folded] = (norm, [p.detach().clone() for p in model.parameters()])
    torch.testing.assert_close(updated[True][0], updated[False][0], rtol=1e-6, atol=0)
    for folded_param, clipped_param in zip(updated[True][1], updated[False][1]):
        torch.testing.assert_close(folded_param, clipped_param, rtol=1e-6, atol=1e-7)
    assert dist_utils.clip_grad_norm_.__name__ == "clip_grad_norm_"  # torchtitan's function is back


def test_without_a_fused_adam_torchtitans_clipping_runs_unchanged():
    model = _model_and_grads(2, 3.0)
    for optimizer in (torch.optim.AdamW(model.parameters(), foreach=True), torch.optim.SGD(model.parameters(), lr=0.1)):
        clipping = FoldedClipping(_Container([optimizer]))
        assert not clipping.applies
        original = dist_utils.clip_grad_norm_
        with clipping.during_step():
            assert dist_utils.clip_grad_norm_ is original
