"""The plan of a job: per-rank memory, collectives and a projected step time, and whether it fits.

:func:`plan_job` builds the ranks that differ (rank 0; under pipeline parallelism the first rank of
every stage) on a fake process group (cluster.py), reads their persistent state and FSDP units
(state.py), simulates the activations of their blocks (activations.py), lists their collectives
(traffic.py) and projects the time (roofline.py).

Memory over one step, in the order the trainer runs it (the peak is the largest of these moments):

* during the forward of block i: parameters + optimizer state + what the earlier blocks keep (their
  saved tensors and their inputs; for a pipeline, also the earlier in-flight micro-batches) + block
  i's forward working set;
* during the tail (last stage: head, MTP, loss) and during the backward of block i: the same, less
  what the later blocks have freed, plus the gradients already reduced (torchtitan sets the
  gradients to None before every step, so they accrue during the backward) and the block's backward
  working set;
* at the optimizer step: parameters + gradients + optimizer state + the step's temporaries.

FSDP2 adds its buffers to the first two: the unsharded root, head and MTP units (kept from the
forward to the backward), the block being computed and the prefetched next one (compute dtype), and one
block's unsharded gradients in the reduce dtype for its reduce-scatter. Under a single-device or
pipeline run without FSDP, autocast's bf16 copies of the matmul weights live from their first use
to the end of the forward.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.distributed as dist
from torch import nn

from torchtitan.config import TORCH_DTYPE_MAP, JobConfig

from titan_v4.model.flops import count_params_and_flops
from titan_v4.train.muon import MAX_BATCH_ELEMENTS, MuonWithAdamW, local_shard, newton_schulz_flops, whole_matrix_plan

from . import activations, roofline, traffic
from .cluster import RankBuild, build_rank, fake_process_group
from .state import FSDPUnit, fsdp_units, local_bytes, state_bytes

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclasses.dataclass
class RankPlan:
    """One rank's plan (bytes; seconds per optimizer step)."""

    rank: int
    pipeline_stage: int | None
    layers: list[int]
    passes: int  # forward-backward passes per optimizer step
    parameters: int
    gradients: int
    optimizer: int
    activations: int  # the activation part of the peak moment
    comm_buffers: int  # FSDP's unsharded parameters / gradients at the peak moment
    autocast_copies: int
    peak_bytes: int
    peak_moment: str
    flops_per_step: float
    collectives: list[traffic.Collective]
    compute_s: float
    exposed_comm_s: float
    optimizer_s: float
    step_s: float


@dataclasses.dataclass
class JobPlan:
    world_size: int
    gpus_per_node: int
    hardware: roofline.Hardware
    layout: dict
    micro_batches: int  # forward-backward passes per optimizer step on each rank
    tokens_per_step: int  # the whole job's
    ranks: list[RankPlan]
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float

    @property
    def peak_bytes(self) -> int:
        return max(r.peak_bytes for r in self.ranks)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hardware.memory_bytes


def _layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _grad_bytes_by_layer(parts: list[nn.Module]) -> tuple[dict[int, int], int]:
    """Local gradient bytes per block, and of everything else (embedding, head, MTP)."""
    per_layer: dict[int, int] = {}
    rest = 0
    for part in parts:
        for name, p in part.named_parameters():
            if not p.requires_grad:
                continue
            layer = _layer_of(name)
            if layer is None:
                rest += local_bytes(p)
            else:
                per_layer[layer] = per_layer.get(layer, 0) + local_bytes(p)
    return per_layer, rest


def _stage_flops_per_token(build: RankBuild, seq_len: int) -> tuple[float, float]:
    """(training FLOPs, of which the output head's GEMMs) per token of the rank's model parts
    (flops.py's rule on each part)."""
    args = build.model_args
    total = head = 0.0
    for part in build.model_parts:
        kinds = tuple(layer.attn_type if hasattr(layer, "attn_type") else layer._checkpoint_wrapped_module.attn_type
                      for layer in part.layers.values())  # fmt: skip
        mtp = len(part.mtp) if part.output is not None and part.mtp is not None else 0
        sub = dataclasses.replace(args, attn_types=kinds, n_layers=len(kinds), mtp_depth=mtp)
        total += count_params_and_flops(sub, part, seq_len)[1]
        if part.output is not None:
            head += 6 * part.output.weight.numel() * (1 + mtp)
    return total, head


@dataclasses.dataclass(frozen=True)
class _Memory:
    activations: int
    comm_buffers: int
    autocast_copies: int
    gradients: int
    moment: str

    @property
    def total(self) -> int:
        return self.activations + self.comm_buffers + self.autocast_copies + self.gradients


def _fsdp_applied(build: RankBuild) -> bool:
    """Whether parallelize_deepseek_v4 applied FSDP2 (mixed precision in the units); without it a
    single device or a pipeline stage trains under autocast."""
    return build.parallel_dims.fsdp_enabled or build.parallel_dims.ep_enabled


def _cast_weights(build: RankBuild, skip_compiled_blocks: bool) -> int:
    """Elements of the weights autocast casts per use (matrices but the embedding); with
    `skip_compiled_blocks`, only those outside the blocks and MTP blocks."""
    return sum(local_shard(p).numel() for part in build.model_parts for name, p in part.named_parameters()
               if p.dim() >= 2 and "tok_embeddings" not in name
               and not (skip_compiled_blocks and (_layer_of(name) is not None or name.startswith("mtp."))))  # fmt: skip


def _rank_experts(build: RankBuild, job_config: JobConfig) -> activations.Experts:
    """The routed experts as the rank holds them in the forward: under EP its n_routed / EP of them;
    with one rank per expert shard they are outside FSDP (fsdp.py) and keep the training dtype (the
    grouped GEMM casts them per use)."""
    pd = build.parallel_dims
    if not pd.ep_enabled:
        return activations.Experts()
    outside_fsdp = pd.dp_shard * pd.cp // pd.ep == 1 and pd.dp_replicate == 1
    dtype = TORCH_DTYPE_MAP[job_config.training.dtype] if outside_fsdp else None
    return activations.Experts(local=build.model_args.n_routed_experts // pd.ep, dtype=dtype)


def _walk_step(build: RankBuild, job_config: JobConfig, model: nn.Module, units: list[FSDPUnit], in_flight: int,
               micro_batch: int, passes: int, cache: dict) -> _Memory:  # fmt: skip
    """The largest moment of the forward-backward passes of one step (see the module docstring),
    above the parameters and optimizer state. From the second pass on (gradient accumulation,
    pipeline micro-batches) every gradient is allocated."""
    seq_len = job_config.training.seq_len
    dtype = activations.compute_dtype(job_config)
    args = build.model_args
    stream = micro_batch * seq_len * args.hc_mult * args.dim * dtype.itemsize
    layer_ids = [int(i) for part in build.model_parts for i in part.layers]
    experts = _rank_experts(build, job_config)
    compiled = job_config.compile.enable and "model" in job_config.compile.components
    pieces = {}
    for i in layer_ids:
        signature = (*activations.block_signature(model, str(i)), experts)
        if signature not in cache:
            cache[signature] = activations.simulate_block(
                model, str(i), micro_batch, seq_len, dtype, experts, compiled, activations.op_level_sac(job_config)
            )
        pieces[i] = cache[signature]
    tail = None
    if build.last_stage:
        if "tail" not in cache:
            cache["tail"] = activations.simulate_tail(model, job_config, micro_batch, seq_len, dtype, experts)
        tail = cache["tail"]

    fsdp = _fsdp_applied(build)
    blocks = [u for u in units if u.kind in ("block", "experts")]
    kept_units = sum(u.unsharded_bytes for u in units if u.kept_after_forward)
    fwd_buffers = (kept_units + 2 * max((u.unsharded_bytes for u in blocks), default=0)) if fsdp else 0
    bwd_buffers = (fwd_buffers + max((u.reduce_bytes for u in blocks), default=0)) if fsdp else 0
    casts = 0
    if not fsdp and dtype != torch.float32:
        # Compiled blocks recompute their casts from the fp32 parameters in the backward graph (the
        # partitioner's choice): only the eager modules' copies stay.
        casts = _cast_weights(build, skip_compiled_blocks=compiled) * dtype.itemsize
    grads_by_layer, other_grads = _grad_bytes_by_layer(build.model_parts)
    all_grads = sum(grads_by_layer.values()) + other_grads if passes > 1 else 0

    # What one micro-batch keeps from its forward to its backward: each block's saved tensors and
    # input, and the stage's output; a pipeline stage holds `in_flight` micro-batches at most.
    earlier = (in_flight - 1) * (sum(pieces[i].saved + stream for i in layer_ids) + stream)
    moments: list[_Memory] = []
    kept = 0  # saved tensors and inputs of this micro-batch's finished forwards
    for i in layer_ids:
        moments.append(_Memory(earlier + kept + stream + pieces[i].forward_peak, fwd_buffers, casts, all_grads,
                               f"forward of layer {i}"))  # fmt: skip
        kept += pieces[i].saved + stream
    grads = 0
    if tail is not None:
        moments.append(_Memory(earlier + kept + stream + tail.forward_peak, fwd_buffers, casts, all_grads,
                               "forward of the head, MTP and loss"))  # fmt: skip
        moments.append(_Memory(earlier + kept + stream + tail.saved + tail.backward_peak, bwd_buffers, 0, max(all_grads, grads),
                               "backward of the head, MTP and loss"))  # fmt: skip
        grads += other_grads
    for i in reversed(layer_ids):
        kept -= pieces[i].saved + stream
        moments.append(_Memory(earlier + kept + pieces[i].saved + 2 * stream + pieces[i].backward_peak, bwd_buffers, 0,
                               max(all_grads, grads), f"backward of layer {i}"))  # fmt: skip
        grads += grads_by_layer.get(i, 0)
    return max(moments, key=lambda m: m.total)


def _optimizer_seconds(build: RankBuild, hw: roofline.Hardware) -> tuple[float, int]:
    """(seconds, temporary bytes) of the rank's optimizer step."""
    if build.optimizers is None:
        return 0.0, 0
    seconds, temporaries = 0.0, 0
    for optimizer in build.optimizers.optimizers:
        muon = isinstance(optimizer, MuonWithAdamW)
        for group in optimizer.param_groups:
            adamw = not muon or group.get("algorithm", "muon") == "adamw"
            for p in group["params"]:
                if adamw:
                    seconds += local_shard(p).numel() * roofline.ADAMW_BYTES_PER_PARAM / hw.hbm_bytes_per_s
                    continue
                plan = whole_matrix_plan(p)
                steps = len(optimizer.defaults["ns_coefficients"])
                flops = newton_schulz_flops(torch.Size(plan.shape), group.get("row_blocks"), steps)
                seconds += flops / plan.size / roofline.NEWTON_SCHULZ_FLOPS  # owners take turns
        if muon:
            temporaries = MAX_BATCH_ELEMENTS * 10  # fp32 stack + bf16 iterate, Gram matrices, update
    return seconds, temporaries


def plan_rank(job_config: JobConfig, world_size: int, rank: int, hw: roofline.Hardware, gpus_per_node: int,
              cache: dict) -> RankPlan:  # fmt: skip
    """Build `rank` on a fake process group and plan it."""
    with fake_process_group(world_size, rank):
        build = build_rank(job_config, world_size, rank)
        return _plan_built_rank(build, job_config, hw, gpus_per_node, cache)


@dataclasses.dataclass(frozen=True)
class _Batching:
    """How one rank's share of a step is cut: `passes` forward-backwards of `micro_batch`
    sequences (gradient accumulation x pipeline micro-batches), `in_flight` of them held at once."""

    micro_batch: int
    passes: int
    in_flight: int
    stage: int | None


def _global_batch(job_config: JobConfig, dp: int) -> int:
    """Sequences per optimizer step (torchtitan's rule: local batch x data-parallel ranks when unset)."""
    training = job_config.training
    return training.global_batch_size if training.global_batch_size > 0 else training.local_batch_size * dp


def _batching(build: RankBuild, job_config: JobConfig) -> _Batching:
    pd, training = build.parallel_dims, job_config.training
    dp = pd.dp_replicate * pd.dp_shard
    accumulation = _global_batch(job_config, dp) // (training.local_batch_size * dp)
    if not pd.pp_enabled:
        return _Batching(training.local_batch_size, accumulation, 1, None)
    micro_batch = job_config.parallelism.pipeline_parallel_microbatch_size
    n_micro = training.local_batch_size // micro_batch
    stage = pd.get_mesh("pp").get_local_rank()
    in_flight = n_micro if job_config.parallelism.pipeline_parallel_schedule == "GPipe" else min(n_micro, pd.pp - stage)
    return _Batching(micro_batch, n_micro * accumulation, in_flight, stage)


def _collectives(build: RankBuild, job_config: JobConfig, gradient_bytes: int, units: list[FSDPUnit], tokens: int,
                 gpus_per_node: int) -> list[traffic.Collective]:  # fmt: skip
    """The rank's collectives (traffic.py) for micro-batches of `tokens` tokens."""
    pd, args = build.parallel_dims, build.model_args
    policy = job_config.parallelism.fsdp_reshard_after_forward
    reshard = policy == "always" or (policy == "default" and not pd.pp_enabled)
    collectives = traffic.fsdp_collectives(units, reshard, gpus_per_node)
    element = activations.compute_dtype(job_config).itemsize
    if pd.ep_enabled:
        routed = sum(len(part.layers) + (len(part.mtp) if part.mtp is not None else 0) for part in build.model_parts)
        ep_ranks = dist.get_process_group_ranks(pd.get_mesh("ep").get_group())
        recomputed = job_config.activation_checkpoint.mode == "full"
        collectives.append(traffic.expert_all_to_alls(routed, tokens, args.n_activated_experts, args.dim, element, ep_ranks,
                                                      recomputed, gpus_per_node))  # fmt: skip
    if pd.dp_replicate_enabled:
        replicas = dist.get_process_group_ranks(pd.get_mesh("dp_replicate").get_group())
        collectives.append(traffic.all_reduce("all-reduce gradients (replicas)", gradient_bytes, replicas, gpus_per_node, "step"))
    if pd.pp_enabled:
        boundary = tokens * (args.hc_mult + args.mtp_depth) * args.dim * element
        pp_ranks = dist.get_process_group_ranks(pd.get_mesh("pp").get_group())
        sends = len(build.model_parts) * 2 - (1 if build.first_stage else 0) - (1 if build.last_stage else 0)
        collectives.append(traffic.pipeline_sends(boundary, sends, traffic.spans_nodes(pp_ranks, gpus_per_node)))
    if build.optimizers is not None:
        muon = [p for o in build.optimizers.optimizers if isinstance(o, MuonWithAdamW)
                for g in o.param_groups if g.get("algorithm", "muon") == "muon" for p in g["params"]]  # fmt: skip
        collectives += traffic.muon_gathers(muon, [whole_matrix_plan(p) for p in muon], gpus_per_node)
    return collectives


def _compute_seconds(build: RankBuild, job_config: JobConfig, tokens: int, passes: int, hw: roofline.Hardware) -> tuple[float, float]:
    """(seconds, training FLOPs) of the rank's compute over `tokens` tokens in `passes` passes."""
    flops_per_token, head_per_token = _stage_flops_per_token(build, job_config.training.seq_len)
    mode = "compiled" if job_config.compile.enable and "model" in job_config.compile.components else "eager"
    ac = job_config.activation_checkpoint
    recompute = roofline.recompute_factor(ac.mode, ac.selective_ac_option)
    seconds = roofline.compute_seconds(flops_per_token * tokens, head_per_token * tokens, mode, recompute, hw)
    if not _fsdp_applied(build) and activations.compute_dtype(job_config) != torch.float32:
        # autocast: every pass casts the weights (once more in the recomputed forward of full AC)
        uses = 2 if ac.mode == "full" else 1
        seconds += roofline.cast_seconds(_cast_weights(build, skip_compiled_blocks=False), uses, hw) * passes
    return seconds, flops_per_token * tokens


def _plan_built_rank(build: RankBuild, job_config: JobConfig, hw: roofline.Hardware, gpus_per_node: int, cache: dict) -> RankPlan:
    state = state_bytes(build.model_parts, build.optimizers)
    units = fsdp_units(build.model_parts)
    batching = _batching(build, job_config)
    model = activations.checkpointed_model(build.model_args, job_config)
    memory = _walk_step(build, job_config, model, units, batching.in_flight, batching.micro_batch, batching.passes, cache)
    optimizer_s, optimizer_temporaries = _optimizer_seconds(build, hw)
    if state.gradients + optimizer_temporaries > memory.total:
        memory = _Memory(0, 0, 0, state.gradients + optimizer_temporaries, "optimizer step")

    tokens = batching.micro_batch * job_config.training.seq_len
    collectives = _collectives(build, job_config, state.gradients, units, tokens, gpus_per_node)
    compute_s, flops = _compute_seconds(build, job_config, tokens * batching.passes, batching.passes, hw)

    def seconds(c: traffic.Collective) -> float:
        return traffic.seconds(c, hw.nvlink_bytes_per_s, hw.network_bytes_per_s) * (batching.passes if c.per == "micro-batch" else 1)

    overlapped = sum(seconds(c) for c in collectives if c.overlapped)
    exposed = sum(seconds(c) for c in collectives if not c.overlapped) + max(0.0, overlapped - compute_s)
    return RankPlan(
        rank=build.rank, pipeline_stage=batching.stage, layers=[int(i) for part in build.model_parts for i in part.layers],
        passes=batching.passes,
        parameters=state.parameters, gradients=state.gradients, optimizer=state.optimizer,
        activations=memory.activations, comm_buffers=memory.comm_buffers, autocast_copies=memory.autocast_copies,
        peak_bytes=state.parameters + state.optimizer + memory.total, peak_moment=memory.moment, flops_per_step=flops,
        collectives=collectives, compute_s=compute_s, exposed_comm_s=exposed, optimizer_s=optimizer_s,
        step_s=compute_s + exposed + optimizer_s,
    )  # fmt: skip


def ranks_to_build(job_config: JobConfig, world_size: int) -> list[int]:
    """Rank 0, and under pipeline parallelism the first rank of every stage (pp is the outermost
    mesh dimension: stage s holds ranks s * world / pp ...)."""
    pp = job_config.parallelism.pipeline_parallel_degree
    return [stage * (world_size // pp) for stage in range(pp)] if pp > 1 else [0]


def plan_job(job_config: JobConfig, world_size: int, hw: roofline.Hardware, gpus_per_node: int = 8) -> JobPlan:
    """Plan every rank that differs and the job's step."""
    cache: dict = {}
    ranks = [plan_rank(job_config, world_size, r, hw, gpus_per_node, cache) for r in ranks_to_build(job_config, world_size)]
    p = job_config.parallelism
    pp = p.pipeline_parallel_degree
    training = job_config.training
    tokens = _global_batch(job_config, world_size // pp) * training.seq_len
    if pp > 1:
        n_micro = training.local_batch_size // p.pipeline_parallel_microbatch_size
        slowest = max(r.compute_s + r.exposed_comm_s for r in ranks)
        bubble = (n_micro + pp - 1) / n_micro
        step = slowest * bubble + max(r.optimizer_s for r in ranks)
    else:
        step = ranks[0].step_s
    flops = sum(r.flops_per_step for r in ranks) * (world_size // len(ranks))
    layout = {"dp_replicate": p.data_parallel_replicate_degree, "dp_shard": world_size // (pp * max(1, p.data_parallel_replicate_degree)),
              "ep": p.expert_parallel_degree, "pp": pp}  # fmt: skip
    return JobPlan(
        world_size=world_size, gpus_per_node=gpus_per_node, hardware=hw, layout=layout, micro_batches=ranks[0].passes,
        tokens_per_step=tokens, ranks=ranks, step_s=step, tokens_per_s_per_gpu=tokens / step / world_size,
        mfu=flops / step / world_size / hw.peak_bf16_flops,
    )  # fmt: skip


__all__ = ["JobPlan", "RankPlan", "plan_job", "plan_rank", "ranks_to_build"]
