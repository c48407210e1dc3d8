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

``optimizer.name = "Muon"`` (docs/deepseek_v4.md, "Muon"): per model part one
:class:`~titan_v4.train.muon.MuonWithAdamW`, whose groups :func:`muon_or_adamw` and
:func:`muon_row_blocks` decide, with the ``[v4] muon_*`` settings.
"""

from __future__ import annotations

import torch
from torch import nn

from torchtitan.components.ft import FTManager
from torchtitan.components.optimizer import OptimizersContainer, build_optimizers
from torchtitan.config import Optimizer as OptimizerConfig
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger

from titan_v4.config import V4, JobConfigError
from titan_v4.model.attention import Attention
from titan_v4.model.compressor import Compressor
from titan_v4.model.mhc import HyperConnection
from titan_v4.model.moe import V4MoE, moe_layers
from titan_v4.train.indexer_phase import backbone_frozen
from titan_v4.train.muon import MuonWithAdamW, hybrid_ns_coefficients, whole_matrix_plan


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


#: Wrapper modules' names in parameter names (activation checkpointing, torch.compile).
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def muon_or_adamw(name: str, param: torch.Tensor) -> str:
    """"muon" or "adamw" for a DeepSeek-V4 parameter (its name in ``model.named_parameters()``).

    AdamW (the paper's exceptions, plus the two parameters it does not name; docs/deepseek_v4.md):
    the token embedding, the output head, every RMSNorm weight, the mHC static biases (``base``) and
    gating factors (``scale``), the attention sinks (one logit per head: not a matrix) and the
    compressors' learned position bias ``ape`` ([ratio, width]: an additive bias table indexed by
    position, like an embedding, not a linear map). Muon: every other parameter of dim >= 2, the
    router, the indexer's projections and the mHC projections ``fn`` included: they are matrices
    that multiply activations. A parameter that fits neither is an error naming it.
    """
    for wrapper in _WRAPPERS:
        name = name.replace(wrapper, "")
    leaf = name.rsplit(".", 1)[-1]
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if name in ("tok_embeddings.weight", "output.weight"):
        return "adamw"
    if leaf == "weight" and module.endswith("norm") and param.dim() == 1:
        return "adamw"
    if leaf in ("base", "scale") and module.startswith("hc_"):
        return "adamw"
    if leaf in ("attn_sink", "ape"):
        return "adamw"
    if param.dim() >= 2:
        return "muon"
    raise ValueError(
        f"parameter {name!r} (shape {tuple(param.shape)}) fits neither optimizer rule: Muon takes "
        "matrices (dim >= 2), AdamW the embedding, the head, RMSNorm weights, mHC base/scale, "
        "attention sinks and compressor position biases; add it to titan_v4.train.optimizer.muon_or_adamw"
    )


def muon_row_blocks(model: nn.Module) -> dict[torch.Tensor, tuple[int, ...]]:
    """The weights that hold several logical matrices in their rows, each to be orthogonalised on
    its own, with their row counts: the grouped output projection ``wo_a`` (o_groups matrices of
    o_lora_rank rows, one per head group), the mHC projection ``fn`` (pre [hc], post [hc] and comb
    [hc * hc] rows, each with its own gating factor), the CSA compressor's ``wkv`` and ``wgate``
    (the two series Ca and Cb of head_dim rows each)."""
    blocks: dict[torch.Tensor, tuple[int, ...]] = {}
    for module in model.modules():
        if isinstance(module, Attention) and module.o_groups > 1:
            blocks[module.wo_a.weight] = (module.o_lora_rank,) * module.o_groups
        elif isinstance(module, HyperConnection):
            hc = module.hc_mult
            blocks[module.fn] = (hc, hc, hc * hc)
        elif isinstance(module, Compressor) and module.overlap:
            blocks[module.wkv.weight] = blocks[module.wgate.weight] = (module.head_dim, module.head_dim)
    return blocks


def muon_param_groups(model: nn.Module, optimizer_config: OptimizerConfig) -> list[dict]:
    """The param groups of one model part for MuonWithAdamW: the AdamW group (``optimizer``
    settings), then one Muon group per row-block layout (the whole-matrix group first)."""
    blocks = muon_row_blocks(model)
    adamw: list[torch.Tensor] = []
    muon: dict[tuple[int, ...] | None, list[torch.Tensor]] = {None: []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if muon_or_adamw(name, p) == "adamw":
            adamw.append(p)
        else:
            muon.setdefault(blocks.get(p), []).append(p)
    groups = [{"params": params, "row_blocks": rows} for rows, params in muon.items() if params]
    if adamw:
        groups.insert(0, {
            "params": adamw, "algorithm": "adamw", "betas": (optimizer_config.beta1, optimizer_config.beta2),
            "eps": optimizer_config.eps, "weight_decay": optimizer_config.weight_decay,
            "implementation": optimizer_config.implementation,
        })  # fmt: skip
    return groups


def muon_settings(optimizer_config: OptimizerConfig, v4: V4) -> dict:
    """MuonWithAdamW's defaults (its Muon groups' settings) from ``[optimizer]`` and ``[v4]``."""
    return dict(
        lr=optimizer_config.lr, weight_decay=optimizer_config.weight_decay, momentum=v4.muon_momentum,
        nesterov=v4.muon_nesterov, update_rms=v4.muon_update_rms,
        ns_coefficients=hybrid_ns_coefficients(v4.muon_ns_steps, v4.muon_ns_cleanup_steps),
    )  # fmt: skip


class MuonOptimizersContainer(OptimizersContainer):
    """torchtitan's container over one MuonWithAdamW per model part (its checkpointing, hooks and
    LR scheduling unchanged: each optimizer's groups cover its model part's trained parameters)."""

    def __init__(self, model_parts: list[nn.Module], optimizer_config: OptimizerConfig, v4: V4) -> None:
        settings = muon_settings(optimizer_config, v4)
        self.model_parts = model_parts
        self.optimizers = [MuonWithAdamW(muon_param_groups(m, optimizer_config), **settings) for m in model_parts]
        self._validate_length(len(model_parts))
        self._post_init([p for o in self.optimizers for g in o.param_groups for p in g["params"]], settings)
        counts = {"muon": [0, 0, 0], "adamw": [0, 0, 0]}  # tensors, elements, bytes
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                count = counts[group.get("algorithm", "muon")]
                for p in group["params"]:
                    count[0] += 1
                    count[1] += p.numel()
                    count[2] += p.numel() * p.element_size()
        logger.info(
            "titan_v4: optimizer Muon: "
            + ", ".join(f"{label} {c[0]} tensors ({c[1]:,} parameters, {c[2] / 2**20:.1f} MiB)"
                        for label, c in (("Muon", counts["muon"]), ("AdamW", counts["adamw"])))
            + f"; Muon momentum {v4.muon_momentum} (Nesterov {v4.muon_nesterov}), Newton-Schulz "
            f"{v4.muon_ns_steps}+{v4.muon_ns_cleanup_steps} steps, update RMS {v4.muon_update_rms}"
        )  # fmt: skip
        plans = [whole_matrix_plan(p) for o in self.optimizers for g in o.param_groups
                 if g.get("algorithm", "muon") == "muon" for p in g["params"]]  # fmt: skip
        gathered = [plan for plan in plans if plan.gathered]
        if gathered:
            logger.info(
                f"titan_v4: Muon: {len(gathered)} of {len(plans)} tensors are sharded across their matrices "
                f"(FSDP): each matrix is gathered to an owner rank (in turn over the {gathered[0].size} ranks of "
                "its shard group, same-shape matrices spread evenly), orthogonalised there and its update "
                f"scattered back; the other {len(plans) - len(gathered)} hold whole matrices where they are"
            )  # fmt: skip


def _refuse_unsupported_muon(optimizer_config, parallel_dims, ft_manager) -> None:
    """Muon orthogonalises whole matrices. FSDP / HSDP shards (one mesh dimension cutting a matrix)
    are gathered to one rank per matrix, EP shards hold whole experts, pipeline stages and DDP
    replicas hold whole parameters (titan_v4/train/muon.py). Tensor parallelism (a second mesh
    dimension cutting the matrices), a step inside the backward (one parameter at a time, no
    batching, no gathering) and fault tolerance's replica groups are not handled."""
    layout = {
        "tensor parallelism": parallel_dims.tp_enabled,
        "optimizer.early_step_in_backward": optimizer_config.early_step_in_backward,
        "fault tolerance": bool(ft_manager and ft_manager.enabled),
    }
    used = [what for what, on in layout.items() if on]
    if used:
        raise JobConfigError(
            f"optimizer.name='Muon' is invalid with {', '.join(used)}: not implemented for Muon; allowed are "
            "FSDP / HSDP, DDP, expert and pipeline parallelism, or optimizer.name='AdamW'"
        )


def build_v4_optimizers(
    model_parts: list[nn.Module],
    optimizer_config: OptimizerConfig,
    parallel_dims: ParallelDims,
    ft_manager: FTManager | None = None,
) -> OptimizersContainer:
    """torchtitan's optimizers (or, for ``optimizer.name = "Muon"``, MuonOptimizersContainer) with
    the expert-bias update as a step pre-hook (after gradient accumulation, before the step, so
    every microbatch's routing counts).

    torchtitan hands this function only the ``[optimizer]`` section; V4Trainer attaches the
    ``[v4]`` section to it as ``optimizer_config.v4`` (the defaults where it has not)."""
    if optimizer_config.name == "Muon":
        _refuse_unsupported_muon(optimizer_config, parallel_dims, ft_manager)
        optimizers = MuonOptimizersContainer(model_parts, optimizer_config, getattr(optimizer_config, "v4", None) or V4())
    else:
        optimizers = build_optimizers(
            model_parts=model_parts, optimizer_config=optimizer_config, parallel_dims=parallel_dims,
            ft_manager=ft_manager,
        )  # fmt: skip
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
