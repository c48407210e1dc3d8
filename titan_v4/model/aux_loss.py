"""Auxiliary losses that a layer attaches to its own output's gradient, and their logged values.

The MoE sequence balance loss and the lightning indexer's KL loss are computed inside a layer. Instead
of returning them to the loss function (which under pipeline parallelism lives on another stage), the
layer attaches each one to its output with an identity whose backward also sends gradient
``weight * grad_scale`` into the loss. ``grad_scale`` is the microbatch's share of the step's tokens,
set by the trainer (titan_v4/train/trainer.py) before each microbatch, so an auxiliary loss averages over
gradient-accumulation microbatches, pipeline microbatches and data-parallel ranks like the
token-normalised LM loss.

For the training log, every forward also adds the detached values (the loss and any companion
metric, e.g. the indexer's recall) and a count of 1 to non-persistent buffers. Activation checkpointing
runs a forward twice, which doubles sums and counts alike, so the mean ``sums / count`` is unchanged.
:func:`read_aux_values` collects the means of a step (over layers, microbatches and ranks) and resets.
"""

from __future__ import annotations

import torch
from torch import nn


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `out` whose backward also sends gradient 1 into `aux_loss`."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.aux_meta = (aux_loss.shape, aux_loss.dtype, aux_loss.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad_out, torch.ones(shape, dtype=dtype, device=device)


class AuxLoss(nn.Module):
    """One auxiliary loss of a layer. ``names`` label the logged values: the loss first, then any
    companion metrics passed to :meth:`forward`."""

    def __init__(self, *names: str):
        super().__init__()
        self.names = names
        self.register_buffer("grad_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.register_buffer("sums", torch.zeros(len(names), dtype=torch.float32), persistent=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.float32), persistent=False)

    def forward(self, out: torch.Tensor, loss: torch.Tensor, weight: float, *metrics: torch.Tensor) -> torch.Tensor:
        """``out`` unchanged; its backward adds ``weight * grad_scale * d loss``. Records loss and metrics."""
        with torch.no_grad():
            # In place (add_, not +=, which rebinds the attribute): a compiled block under
            # activation checkpointing may mutate a buffer, not the module's attributes.
            self.sums.add_(torch.stack([loss.detach().float(), *(m.detach().float() for m in metrics)]))
            self.count.add_(1)
        return _AttachAuxLoss.apply(out, loss * (weight * self.grad_scale))

    def reset(self, device: torch.device | None = None) -> None:
        """(Re)create the buffers: after ``to_empty`` they hold garbage (called from init_weights)."""
        device = device or self.sums.device
        self.grad_scale = torch.ones((), dtype=torch.float32, device=device)
        self.sums = torch.zeros(len(self.names), dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.float32, device=device)


def aux_losses(model_parts: list[nn.Module]) -> list[AuxLoss]:
    """Every AuxLoss of the model parts (through AC / compile / FSDP wrappers), in module order."""
    return [m for part in model_parts for m in part.modules() if isinstance(m, AuxLoss)]


def set_aux_loss_scale(model_parts: list[nn.Module], scale: float | torch.Tensor) -> None:
    """Set the gradient scale of every auxiliary loss (in place: no recompile)."""
    for aux in aux_losses(model_parts):
        aux.grad_scale.fill_(scale)


@torch.no_grad()
def read_aux_values(model_parts: list[nn.Module]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (sum, count)}`` over every AuxLoss since the last read (summed over layers), then reset.

    The mean of a value is ``sum / count``: over layers and microbatches alike (every layer records once
    per forward). Sums and counts add across ranks (a caller all-reduces both).
    """
    totals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for aux in aux_losses(model_parts):
        for name, value in zip(aux.names, aux.sums):
            total, count = totals.get(name, (0.0, 0.0))
            totals[name] = (total + value, count + aux.count)
        aux.sums.zero_()
        aux.count.zero_()
    return totals
