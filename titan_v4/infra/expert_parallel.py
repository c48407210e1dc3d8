"""Expert parallelism for V4's routed experts, traceable so a whole block compiles as one graph.

torchtitan 0.2.2's `ExpertParallel` moves the tokens in forward hooks on the experts module that
keep state on the style object between dispatch and combine and permute with a Triton kernel (or,
on a CPU, a Python loop over `.item()` values): dynamo cannot trace that into the block's graph.
Here the experts module calls a `TokenDispatcher` from its own forward (model/moe.py,
`ClampedGroupedExperts.token_dispatcher`), so dispatch, expert compute and combine are one traced
region:

1. all-to-all of the per-expert counts (functional collective, no gradient);
2. the send / receive split sizes read back to the host (`tolist`: one device-to-host sync per
   layer, as in torchtitan; under torch.compile they are unbacked symbolic sizes, which needs
   `torch._dynamo.config.capture_scalar_outputs`);
3. all-to-all of the token rows (`all_to_all_single_autograd`: its backward is the reverse
   all-to-all);
4. the received rows, grouped by source rank then local expert, regrouped by local expert with a
   stable sort (order within an expert: by source rank, as torchtitan's permutation);
5. after the experts: the inverse regrouping and the reverse all-to-all.

The experts' weights are sharded on the expert dimension (`Shard(0)` over the EP mesh), as in
torchtitan, so checkpoints and the EP-aware gradient clipping see the same DTensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module


class Route(NamedTuple):
    """What combine needs to undo a dispatch."""

    order: torch.Tensor  # [received rows] int64: received row order -> expert-grouped order
    send_splits: list[int]  # rows sent to each EP rank
    receive_splits: list[int]  # rows received from each EP rank


class TokenDispatcher:
    """Moves one MoE layer's routed rows to the EP ranks that own their experts, and back."""

    def __init__(self, mesh: DeviceMesh):
        self.group_name = mesh.get_group().group_name
        self.degree = mesh.size()

    def dispatch(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Route]:
        """x [T, D] rows grouped by global expert, counts [E] -> (rows for this rank's experts
        grouped by local expert [T', D], counts per local expert [E / degree], route)."""
        num_local = num_tokens_per_expert.shape[0] // self.degree
        with torch.no_grad():
            # received[r, e]: rows EP rank r sends to this rank's local expert e.
            received = all_to_all_single(num_tokens_per_expert, None, None, group=self.group_name).view(self.degree, num_local)
            send_splits = num_tokens_per_expert.view(self.degree, num_local).sum(dim=1).tolist()
            receive_splits = received.sum(dim=1).tolist()
        rows = all_to_all_single_autograd(x, receive_splits, send_splits, self.group_name)
        with torch.no_grad():
            position = torch.arange(rows.shape[0], device=rows.device)
            segment = torch.searchsorted(torch.cumsum(received.reshape(-1), dim=0), position, right=True)
            order = torch.argsort(segment % num_local, stable=True)
        return rows[order], received.sum(dim=0), Route(order, send_splits, receive_splits)

    def combine(self, out: torch.Tensor, route: Route) -> torch.Tensor:
        """Expert outputs [T', D] in dispatch order -> [T, D] in the order x had on this rank."""
        received_order = torch.empty_like(out).index_copy(0, route.order, out)
        return all_to_all_single_autograd(received_order, route.send_splits, route.receive_splits, self.group_name)


class ExpertParallel(ParallelStyle):
    """Shards an experts module's parameters on dim 0 (experts) over the mesh and gives it a
    TokenDispatcher. No hooks: the module's forward calls the dispatcher."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, param in module.named_parameters(recurse=False):
            module.register_parameter(name, nn.Parameter(distribute_tensor(param, device_mesh, [Shard(0)])))
        module.token_dispatcher = TokenDispatcher(device_mesh)
        return module


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Expert parallelism for the routed experts of every block in `model.layers` and `model.mtp`
    (an MTP block has a layer's MoE: with all its experts on every rank it would hold a layer's
    worth of experts unsharded, 6.4 B parameters for Flash)."""
    for block in [*model.layers.values(), *(model.mtp.values() if model.mtp is not None else ())]:
        parallelize_module(block.moe.experts, ep_mesh, ExpertParallel())
