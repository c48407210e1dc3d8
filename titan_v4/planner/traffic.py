"""The collectives one rank takes part in per micro-batch and per optimizer step, with their bytes.

Read from the built rank (cluster.py): the FSDP2 units and their meshes (all-gather in the compute
dtype before the forward and, when resharded after it, again before the backward; reduce-scatter
of the gradients in the reduce dtype), HSDP's / DDP's all-reduce over the replicas, the expert
all-to-alls (dispatch and combine of each routed layer, forward and backward, and the recomputed
forward under full checkpointing), the pipeline's boundary tensor, and Muon's gather of sharded
matrices to their owners and scatter of the updates. Bytes are what one rank sends (ring
algorithms: (g - 1) / g of the buffer).
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist

from titan_v4.train.muon import local_shard

from .state import FSDPUnit


@dataclasses.dataclass(frozen=True)
class Collective:
    """One kind of collective of one rank: `count` calls of `bytes_each` bytes sent each, over a
    group of `group_size` ranks (`cross_node`: the group spans nodes). `per` is "micro-batch" (every
    forward-backward) or "step" (once per optimizer step). `overlapped`: issued ahead of the compute
    that needs it (FSDP's prefetch), so it can hide behind that compute."""

    name: str
    per: str
    count: int
    bytes_each: int
    group_size: int
    cross_node: bool
    overlapped: bool

    @property
    def bytes(self) -> int:
        return self.count * self.bytes_each


def spans_nodes(ranks: list[int], gpus_per_node: int) -> bool:
    return len({r // gpus_per_node for r in ranks}) > 1


def _ring_share(nbytes: int, group: int) -> int:
    return nbytes * (group - 1) // group


def fsdp_collectives(units: list[FSDPUnit], reshard_after_forward: bool, gpus_per_node: int) -> list[Collective]:
    """All-gathers and reduce-scatters of the FSDP2 units per micro-batch, summed per kind of unit
    (blocks, experts, embedding, head, root, mtp). A unit resharded after the forward is gathered
    again for the backward (not those FSDPUnit.kept_after_forward)."""
    totals: dict[tuple[str, str], list] = {}
    for unit in units:
        if unit.group_size == 1:
            continue
        gathers = 2 if (reshard_after_forward and not unit.kept_after_forward) else 1
        cross = spans_nodes(list(unit.ranks), gpus_per_node)
        for op, calls, nbytes in (("all-gather", gathers, unit.unsharded_bytes), ("reduce-scatter", 1, unit.reduce_bytes)):
            entry = totals.setdefault((op, unit.kind), [0, 0, unit.group_size, False])
            entry[0] += calls
            entry[1] += calls * _ring_share(nbytes, unit.group_size)
            entry[3] = entry[3] or cross
    return [Collective(f"{op} {kind}", "micro-batch", calls, total // calls, size, cross, True)
            for (op, kind), (calls, total, size, cross) in totals.items()]


def all_reduce(name: str, nbytes: int, ranks: list[int], gpus_per_node: int, per: str) -> Collective:
    """A ring all-reduce: reduce-scatter + all-gather, 2 (g - 1) / g of the buffer sent."""
    g = len(ranks)
    return Collective(name, per, 1, 2 * _ring_share(nbytes, g), g, spans_nodes(ranks, gpus_per_node), True)


def expert_all_to_alls(routed_layers: int, tokens: int, top_k: int, dim: int, element: int, ranks: list[int],
                       recomputed: bool, gpus_per_node: int) -> Collective:  # fmt: skip
    """Dispatch + combine of `routed_layers` layers, forward and backward (+ the recomputed forward),
    each moving tokens x top_k rows of `dim` (balanced routing: (g - 1) / g of them leave the rank)."""
    g = len(ranks)
    calls = routed_layers * 2 * (3 if recomputed else 2)
    return Collective("all-to-all experts", "micro-batch", calls, _ring_share(tokens * top_k * dim * element, g), g,
                      spans_nodes(ranks, gpus_per_node), False)  # fmt: skip


def pipeline_sends(boundary_bytes: int, sends: int, cross_node: bool) -> Collective:
    """The boundary tensor forward and its gradient backward, per stage boundary this rank sends on."""
    return Collective("send/recv stage boundary", "micro-batch", 2 * sends, boundary_bytes, 2, cross_node, False)


def muon_gathers(muon_params: list, plans: list, gpus_per_node: int) -> list[Collective]:
    """Muon's gather of FSDP-cut matrices (fp32 pieces) to their owners and the bf16 scatter back."""
    sent = 0
    group_ranks: list[int] = []
    for p, plan in zip(muon_params, plans):
        if not plan.gathered:
            continue
        piece = local_shard(p)
        sent += piece.numel() * (piece.element_size() + 2)
        if not group_ranks:
            group_ranks = dist.get_process_group_ranks(plan.group)
    if not sent:
        return []
    g = len(group_ranks)
    return [Collective("Muon gather + scatter", "step", 1, _ring_share(sent, g), g, spans_nodes(group_ranks, gpus_per_node), False)]


def seconds(collective: Collective, nvlink_bytes_per_s: float, network_bytes_per_s: float) -> float:
    bandwidth = network_bytes_per_s if collective.cross_node else nvlink_bytes_per_s
    return collective.bytes / bandwidth
