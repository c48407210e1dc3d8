"""Optimizers for DeepSeek-V4: torchtitan's, plus aux-loss-free expert balancing over every
learned-routing MoE layer, MTP blocks included, and an optimizer state for every parameter from the
start.

torchtitan's `build_optimizers_with_moe_load_balancing` walks `model.layers` only, so the MTP
block's correction bias would never move, and it updates the (unused) bias of hash-routed layers.

A parameter that gets no gradient (the indexer in the frozen phase, the backbone in the warmup
phase: titan_v4/train/indexer_phase.py) would get no optimizer state, and a checkpoint without it
cannot be loaded by a run whose optimizer has it (the distributed checkpoint asks for every key),
so a run could not resume across a phase switch. `init_optimizer_state` therefore creates every
state up front (V4Trainer calls it before any checkpoint is loaded, unless training.steps is 0),
equal to what the optimizer creates at a parameter's first gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from torchtitan.components.ft import FTManager
from torchtitan.components.optimizer import OptimizersContainer, build_optimizers
from torchtitan.config import Optimizer as OptimizerConfig
from torchtitan.distributed import ParallelDims

from titan_v4.model.moe import V4MoE, moe_layers
from titan_v4.train.indexer_phase import backbone_frozen


@torch.no_grad()
def update_expert_bias(moes: list[V4MoE], parallel_dims: ParallelDims, move: bool = True) -> None:
    """One aux-loss-free balancing step (torchtitan's rule) on the learned-routing layers:
    bias += coeff * sign(mean - load), centred; loads summed over the data-parallel ranks. Every
    layer's load counter is reset (hash layers count too, but their bias is not used). With
    ``move=False`` (the indexer warmup: the backbone is frozen) only the counters are reset.

    With activation checkpointing a layer counts its tokens twice; the sign is unchanged by that.
    """
    learned = [m for m in moes if not m.hash_routed] if move else []
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
    move = not backbone_frozen(model_parts)
    optimizers.register_step_pre_hook(lambda *args, **kwargs: update_expert_bias(moes, parallel_dims, move))
    return optimizers


@torch.no_grad()
def init_optimizer_state(optimizers: OptimizersContainer) -> None:
    """Create the state of every parameter that has none, as the optimizer would at its first gradient.

    torch's own recipe (``torch.distributed.checkpoint.state_dict._init_optim_state``: one step with
    zero gradients and learning rate 0, which leaves the parameters unchanged, weight decay included),
    then the step counters are set back to 0, so the first real step is the optimizer's first step
    (Adam's bias correction included): zero moments at step 0 are exactly a fresh state.
    """
    for optim in optimizers.optimizers:
        everything = [p for group in optim.param_groups for p in group["params"]]
        params = [p for p in everything if p not in optim.state]
        if not params:
            continue
        grads = [p.grad for p in everything]
        missing = {id(p) for p in params}
        for p in everything:
            p.grad = torch.zeros_like(p) if id(p) in missing else None
        lrs = [group["lr"] for group in optim.param_groups]
        for group in optim.param_groups:
            group["lr"] = 0.0
        optim.step()
        for group, lr in zip(optim.param_groups, lrs):
            group["lr"] = lr
        for p in params:
            step = optim.state[p].get("step")
            if torch.is_tensor(step):
                step.zero_()
            elif step is not None:
                optim.state[p]["step"] = 0
        for p, grad in zip(everything, grads):
            p.grad = grad
