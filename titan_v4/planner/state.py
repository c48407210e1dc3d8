"""The persistent memory of one built rank (cluster.py): parameters, gradients, optimizer state,
and the FSDP2 units whose all-gathers and reduce-scatters make up the data-parallel traffic.

Everything is read from the rank's own (meta) tensors: the local shard of each DTensor parameter is
what the rank stores. The optimizer state is counted as the optimizers create it at their first step
(torch's AdamW: ``exp_avg`` and ``exp_avg_sq`` like the parameter plus a 0-dim fp32 ``step``;
titan_v4's MuonWithAdamW: a ``momentum_buffer`` in fp32 (fp64 for fp64 parameters) for its Muon
parameters and AdamW's state for its AdamW group).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from titan_v4.train.muon import MuonWithAdamW, local_shard


def local_bytes(t: torch.Tensor) -> int:
    shard = local_shard(t)
    return shard.numel() * shard.element_size()


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Persistent bytes of one rank."""

    parameters: int
    gradients: int  # allocated during the backward, freed by zero_grad at the next step
    optimizer: int


def _adamw_state_bytes(p: torch.Tensor) -> int:
    return 2 * local_bytes(p) + 4  # exp_avg, exp_avg_sq, step (0-dim fp32)


def _muon_state_bytes(p: torch.Tensor) -> int:
    element = 8 if p.dtype == torch.float64 else 4
    return local_shard(p).numel() * element  # momentum_buffer


def optimizer_state_bytes(optimizers) -> int:
    """The state the rank's optimizers hold after their first step."""
    total = 0
    for optimizer in optimizers.optimizers:
        muon = isinstance(optimizer, MuonWithAdamW)
        if not muon and not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise NotImplementedError(f"the planner counts the state of AdamW and Muon, not {type(optimizer).__name__}")
        for group in optimizer.param_groups:
            adamw = not muon or group.get("algorithm", "muon") == "adamw"
            for p in group["params"]:
                if p.requires_grad:
                    total += _adamw_state_bytes(p) if adamw else _muon_state_bytes(p)
    return total


def state_bytes(model_parts: list[nn.Module], optimizers) -> StateBytes:
    params = [p for part in model_parts for p in part.parameters()]
    return StateBytes(
        parameters=sum(local_bytes(p) for p in params),
        gradients=sum(local_bytes(p) for p in params if p.requires_grad),
        optimizer=optimizer_state_bytes(optimizers) if optimizers is not None else 0,
    )


@dataclasses.dataclass(frozen=True)
class FSDPUnit:
    """One fully_shard group: its all-gather gives every rank of `group_size` the unsharded
    parameters (`unsharded_bytes` in the compute dtype); its reduce-scatter takes `reduce_bytes`
    of gradients (reduce dtype) from each rank."""

    name: str
    ranks: tuple[int, ...]  # the ranks of this rank's shard group
    unsharded_bytes: int
    reduce_bytes: int

    @property
    def group_size(self) -> int:
        return len(self.ranks)

    @property
    def kind(self) -> str:
        """"block", "experts" (a block's routed experts in their own unit), "mtp" (an MTP block),
        "embedding", "head" (final norm + output) or "root" (what no other unit holds)."""
        if ".experts" in self.name:
            return "experts"
        if self.name.startswith("layers."):
            return "block"
        if self.name.startswith("mtp."):
            return "mtp"
        return {"tok_embeddings": "embedding", "norm": "head", "output": "head"}.get(self.name, "root")

    @property
    def kept_after_forward(self) -> bool:
        """Unsharded from its forward to its backward: the head and the root (FSDP2 keeps them),
        an MTP block (fsdp.py); the others reshard after the forward unless the policy says never."""
        return self.kind in ("head", "root", "mtp")


def fsdp_units(model_parts: list[nn.Module]) -> list[FSDPUnit]:
    """The FSDP2 units of the rank's model parts, in module order."""
    units, seen = [], set()
    for part in model_parts:
        for name, module in part.named_modules():
            if not isinstance(module, FSDPModule):
                continue
            group = module._get_fsdp_state()._fsdp_param_group
            if group is None or id(group) in seen:  # fully_shard([norm, output]): one group, two modules
                continue
            seen.add(id(group))
            ranks = tuple(dist.get_process_group_ranks(group.mesh_info.shard_process_group))
            size = len(ranks)
            mp = group.mp_policy
            elements = sum(fp.padded_sharded_param_size.numel() * size for fp in group.fsdp_params)
            param_element = (mp.param_dtype or group.fsdp_params[0].sharded_param.dtype).itemsize
            reduce_element = (mp.reduce_dtype or mp.param_dtype or group.fsdp_params[0].sharded_param.dtype).itemsize
            units.append(FSDPUnit(
                name=name or "root", ranks=ranks, unsharded_bytes=elements * param_element, reduce_bytes=elements * reduce_element,
            ))  # fmt: skip
    return units
