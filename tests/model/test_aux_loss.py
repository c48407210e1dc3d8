"""titan_v4.model.aux_loss: the attached gradient, its scale, and the recorded values."""

import pytest
import torch
from torch import nn

from titan_v4.model.aux_loss import AuxLoss, read_aux_values, set_aux_loss_scale


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.aux = AuxLoss("penalty", "metric")

    def forward(self, x):
        return self.aux(x * 3, self.w**2, 0.5, torch.tensor(7.0))


def test_identity_forward_scaled_gradient_and_records():
    layers = nn.Sequential(Layer(), Layer())
    set_aux_loss_scale([layers], 0.25)
    x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    out = layers(x)
    assert torch.equal(out, x * 9)
    out.sum().backward()
    # d/dw of weight * scale * w^2 = 0.5 * 0.25 * 2w = 0.5 for w = 2; the identity adds nothing else.
    assert [layer.w.grad.item() for layer in layers] == pytest.approx([0.5, 0.5])
    layers(x)  # a second forward (a second microbatch, or activation checkpointing's recompute)
    totals = read_aux_values([layers])
    assert {k: (s.item(), c.item()) for k, (s, c) in totals.items()} == {"penalty": (16.0, 4.0), "metric": (28.0, 4.0)}
    assert all(layer.aux.count.item() == 0 and layer.aux.sums.abs().sum() == 0 for layer in layers)
