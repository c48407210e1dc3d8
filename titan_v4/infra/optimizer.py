"""Optimizers for DeepSeek-V4: torchtitan's, plus aux-loss-free expert balancing over every
learned-routing MoE layer, MTP blocks included.

torchtitan's `build_optimizers_with_moe_load_balancing` walks `model.layers` only, so the MTP
block's correction bias would never move, and it updates the (unused) bias of hash-routed layers.
"""

from __future__ import annotations

import torch
from torch import nn

from torchtitan.components.ft import FTManager
from torchtitan.components.optimizer import OptimizersContainer, build_optimizers
from torchtitan.config import Optimizer as OptimizerConfig
from torchtitan.distributed import ParallelDims

from titan_v4.model.moe import V4MoE, moe_layers


@torch.no_grad()
def update_expert_bias(moes: list[V4MoE], parallel_dims: ParallelDims) -> None:
    """One aux-loss-free balancing step (torchtitan's rule) on the learned-routing layers:
    bias += coeff * sign(mean - load), centred; loads summed over the data-parallel ranks. Every
    layer's load counter is reset (hash layers count too, but their bias is not used).

    With activation checkpointing a layer counts its tokens twice; the sign is unchanged by that.
    """
    learned = [m for m in moes if not m.hash_routed]
    if learned:
        loads = torch.vstack([m.tokens_per_expert for m in learned])
        loss_mesh = parallel_dims.get_optional_mesh("loss")
        if loss_mesh is not None:
            torch.distributed.all_reduce(loads, group=loss_mesh.get_group(), op=torch.distributed.ReduceOp.SUM)
        for moe, load in zip(learned, loads.float()):
            delta = moe.load_balance_coeff * torch.sign(load.mean() - load)
            moe.expert_bias.add_(delta - delta.mean())
    for moe in moes:
        moe.tokens_per_expert.zero_()


def build_v4_optimizers(
    model_parts: list[nn.Module],
    optimizer_config: OptimizerConfig,
    parallel_dims: ParallelDims,
    ft_manager: FTManager | None = None,
) -> OptimizersContainer:
    """torchtitan's optimizers with the expert-bias update as a step pre-hook (after gradient
    accumulation, before the step, so every microbatch's routing counts)."""
    optimizers = build_optimizers(
        model_parts=model_parts, optimizer_config=optimizer_config, parallel_dims=parallel_dims, ft_manager=ft_manager
    )
    moes = moe_layers(model_parts)
    optimizers.register_step_pre_hook(lambda *args, **kwargs: update_expert_bias(moes, parallel_dims))
    return optimizers
