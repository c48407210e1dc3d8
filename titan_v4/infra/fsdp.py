"""FSDP2 / HSDP for a DeepSeek-V4 model (or pipeline stage), with the routed experts placed so that
each compiled block stays one graph under expert parallelism.

torchtitan 0.2.2's `apply_fsdp` (llama4) gives the routed experts of every EP layer their own FSDP
unit on the experts' data-parallel mesh. FSDP2's forward hooks are `torch._dynamo.disable`d
(torch/distributed/fsdp/_fully_shard/_fsdp_state.py), so an FSDP unit *inside* a compiled block
is a graph break. This version differs in one rule:

* the experts' data-parallel mesh (dp_replicate x efsdp) has one rank (EP spans the whole
  data-parallel group, e.g. EP 8 on 8 GPUs): every rank holds whole experts of its own and nothing
  else holds them, so there is nothing to shard or reduce. The experts stay out of FSDP
  (`ignored_params`): no FSDP unit inside the block, fullgraph holds. They keep their dtype (the
  grouped GEMMs cast to bf16 themselves; the loop path computes in the activations' dtype) and
  their gradients, complete on their owner, need no reduction;
* otherwise (multi-node EP, HSDP with EP) the experts get torchtitan's FSDP unit on that mesh and
  the block compiles with graph breaks around it (`experts_break_the_graph`).

The MTP blocks are units of their own like the layers (their experts as the layers' are), with one
difference: they stay unsharded from their forward to their backward, because the model applies an
MTP block's norm and HyperHead after the block's forward returns (model.py). The root unit keeps
the rest (the model's HyperHead).

Everything else is torchtitan's: units per embedding, block, [norm, output] and root; reshard
policy; no gradient division (the loss is token-normalised); explicit prefetching under EP.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import Shard

from torchtitan.models.llama3.infra.parallelize import disable_fsdp_gradient_division


def experts_break_the_graph(experts_dp_mesh: DeviceMesh | None) -> bool:
    """Whether the routed experts need their own FSDP unit (a graph break inside each block):
    under EP, when their data-parallel mesh has more than one rank."""
    return experts_dp_mesh is not None and experts_dp_mesh.size() > 1


def _reshard_after_forward(policy: str, pp_enabled: bool) -> bool:
    if policy == "always":
        return True
    if policy == "never":
        return False
    if policy == "default":
        return not pp_enabled  # PP: no per-microbatch all-gathers
    raise ValueError(f"parallelism.fsdp_reshard_after_forward={policy!r}: use 'default', 'always' or 'never'")


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    pp_enabled: bool,
    cpu_offload: bool,
    reshard_after_forward_policy: str,
    experts_dp_mesh: DeviceMesh | None,
) -> None:
    """fully_shard the model in place. `experts_dp_mesh`: under EP, the mesh over which each rank's
    experts are replicated (dp_replicate x efsdp); None without EP."""
    config = {
        "mesh": dp_mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    reshard = _reshard_after_forward(reshard_after_forward_policy, pp_enabled)
    expert_units = experts_break_the_graph(experts_dp_mesh)
    local_experts = experts_dp_mesh is not None and not expert_units
    blocks = list(model.layers.values())
    mtp_blocks = list(model.mtp.values()) if model.mtp is not None else []

    if model.tok_embeddings is not None:
        fully_shard(model.tok_embeddings, **config, reshard_after_forward=reshard)
    all_expert_params: set[nn.Parameter] = set()
    for block in blocks + mtp_blocks:
        ignored = set(block.moe.experts.parameters()) if local_experts else set()
        all_expert_params |= ignored
        if expert_units:
            experts = block.moe.experts
            # torchtitan's rule: shard on the hidden dim when there are fewer experts than ranks.
            placement = (lambda param: Shard(1)) if experts_dp_mesh.size() * experts.w1.device_mesh.size() > experts.num_experts else None
            fully_shard(experts, **{**config, "mesh": experts_dp_mesh}, reshard_after_forward=reshard, shard_placement_fn=placement)
        keep = block in mtp_blocks  # its norm and HyperHead run after its forward (model.py)
        fully_shard(block, **config, reshard_after_forward=reshard and not keep, ignored_params=ignored or None)
    if model.norm is not None and model.output is not None:
        # Not resharded after forward by default: the backward needs them first.
        fully_shard([model.norm, model.output], **config, reshard_after_forward=reshard_after_forward_policy == "always")
    fully_shard(model, **config, ignored_params=all_expert_params or None)
    disable_fsdp_gradient_division(model)
    if experts_dp_mesh is not None:
        _prefetch_explicitly(model, blocks, expert_units)


def _prefetch_explicitly(model: nn.Module, blocks: list[nn.Module], expert_units: bool) -> None:
    """torchtitan's explicit prefetch order under EP (its device-to-host syncs would otherwise
    delay FSDP's implicit prefetching): each block prefetches the next one in the forward and the
    previous one in the backward (with its experts' unit where they have one)."""

    def units(block: nn.Module) -> list[nn.Module]:
        return [block, block.moe.experts] if expert_units else [block]

    if not blocks:
        return
    if model.tok_embeddings is not None:
        model.tok_embeddings.set_modules_to_forward_prefetch(units(blocks[0]))
    has_head = model.norm is not None and model.output is not None
    for block, following in zip(blocks, blocks[1:] + [None]):
        if following is not None:
            block.set_modules_to_forward_prefetch(units(following))
        elif has_head:
            block.set_modules_to_forward_prefetch([model.norm, model.output])
    reversed_blocks = blocks[::-1]
    if has_head:
        model.output.set_modules_to_backward_prefetch(units(reversed_blocks[0]))
    for block, previous in zip(reversed_blocks, reversed_blocks[1:] + [None]):
        if previous is not None:
            block.set_modules_to_backward_prefetch(units(previous))
        elif model.tok_embeddings is not None:
            block.set_modules_to_backward_prefetch([model.tok_embeddings])
