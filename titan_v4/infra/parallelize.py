"""Parallelize a DeepSeek-V4 model (or one pipeline stage of it) in torchtitan's order:
EP -> activation checkpointing -> per-block compile -> FSDP2 / HSDP (or DDP).

Expert parallelism (expert_parallel.py) and FSDP (fsdp.py) are V4's own, so that each block
compiles as one graph (fullgraph) under every parallelism; torchtitan's `apply_ac` and `apply_ddp`
are reused. The one remaining graph break: routed experts that need their own FSDP unit (EP with
more than one rank per expert shard, fsdp.py). Not supported yet (clear errors): tensor and context
parallelism, and float8 / DeepEP.

DDP gradients: torchtitan 0.2.2 backpropagates SUM loss / global token count, so the replicas'
gradients must be summed; DDP averages them (divides by the replica count again), which made DDP
gradients 1/dp_replicate of the FSDP ones. `apply_v4_ddp` registers a summing comm hook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import apply_ddp
from torchtitan.tools.logging import logger

import custom_ops  # noqa: F401  (registers torch.ops.v4.*)
from titan_v4.config import JobConfigError
from titan_v4.model.moe import V4MoE

from .expert_parallel import apply_expert_parallel
from .fsdp import apply_fsdp, experts_break_the_graph

# Ops whose outputs selective (per-op) activation checkpointing keeps instead of recomputing.
OP_SAC_SAVE_LIST = {
    torch.ops.aten.mm.default,
    torch.ops.aten._grouped_mm.default,
    torch.ops.v4.sparse_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_to_all_single.default,
    torch.ops.aten.max.default,
    torch._higher_order_ops.inductor_compiled_code,
}


def parallelize_deepseek_v4(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    """Apply EP, AC, compile and data parallelism to `model` in place and return it."""
    if parallel_dims.tp_enabled:
        raise NotImplementedError(
            f"parallelism.tensor_parallel_degree={parallel_dims.tp}: tensor parallelism is not supported for "
            "DeepSeek-V4 yet; use 1 (FSDP / EP / PP instead)"
        )
    if parallel_dims.cp_enabled:
        raise NotImplementedError(
            f"parallelism.context_parallel_degree={parallel_dims.cp}: context parallelism is not supported for "
            "DeepSeek-V4 yet; use 1"
        )
    if job_config.parallelism.expert_parallel_comm_backend != "standard":
        raise NotImplementedError(
            f"parallelism.expert_parallel_comm_backend={job_config.parallelism.expert_parallel_comm_backend!r}: "
            "only 'standard' is supported for DeepSeek-V4"
        )
    if job_config.model.converters:
        raise NotImplementedError(f"model.converters={job_config.model.converters}: not supported for DeepSeek-V4 yet")
    routed_experts = _routed_experts(model)
    if routed_experts is not None:  # fail here, not with "Split sizes doesn't match" in step 1
        check_model_parallelism(routed_experts, parallel_dims.ep)

    dp_names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
    experts_dp_mesh = None
    if parallel_dims.ep_enabled:
        apply_expert_parallel(model, parallel_dims.get_mesh("ep"))
        # The ranks that hold the same experts (each holding a shard of them, or copies).
        experts_dp_mesh = parallel_dims.get_mesh(["dp_replicate", "efsdp"] if parallel_dims.dp_replicate_enabled else ["efsdp"])

    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        ac_args = dict(model_compile_enabled=compile_model, op_sac_save_list=OP_SAC_SAVE_LIST, base_folder=job_config.job.dump_folder)
        apply_ac(model, job_config.activation_checkpoint, **ac_args)
        if model.mtp is not None and len(model.mtp):
            # apply_ac walks `<module>.layers`; give it the MTP blocks the same way.
            holder = nn.Module()
            holder.layers = model.mtp
            apply_ac(holder, job_config.activation_checkpoint, **ac_args)

    if compile_model:
        apply_block_compile(model, job_config, fullgraph=not experts_break_the_graph(experts_dp_mesh))

    if parallel_dims.fsdp_enabled or parallel_dims.ep_enabled:
        apply_fsdp(
            model,
            parallel_dims.get_mesh(dp_names),
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            pp_enabled=parallel_dims.pp_enabled,
            cpu_offload=job_config.training.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
            experts_dp_mesh=experts_dp_mesh,
        )
        logger.info("Applied %s to the model", "HSDP" if parallel_dims.dp_replicate_enabled else "FSDP")
    elif parallel_dims.dp_replicate_enabled:
        apply_v4_ddp(model, parallel_dims.get_mesh("dp_replicate"), enable_compile=compile_model)
    return model


def check_model_parallelism(n_routed_experts: int, expert_parallel_degree: int) -> None:
    """The expert-parallel degree must split the routed experts evenly (the config-only checks run
    earlier, in titan_v4/train/checks.py)."""
    if expert_parallel_degree > 1 and n_routed_experts % expert_parallel_degree:
        divisors = [d for d in range(1, n_routed_experts + 1) if n_routed_experts % d == 0]
        raise JobConfigError(
            f"parallelism.expert_parallel_degree={expert_parallel_degree} is invalid: the model has "
            f"{n_routed_experts} routed experts; allowed values are their divisors {divisors}"
        )


def _routed_experts(model: nn.Module) -> int | None:
    return next((m.experts.num_experts for m in model.modules() if isinstance(m, V4MoE)), None)


def _allreduce_sum_hook(group, bucket):
    """DDP comm hook: sum (not average) the bucket over the replicas. (No annotations: DDP checks
    them against dist.GradBucket, and this module's postponed annotations are strings.)"""
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def apply_v4_ddp(model: nn.Module, dp_mesh, enable_compile: bool) -> None:
    """torchtitan's `apply_ddp` with gradients summed over the replicas (see the module docstring)."""
    apply_ddp(model, dp_mesh, enable_compile=enable_compile)
    model.register_comm_hook(dp_mesh.get_group(), _allreduce_sum_hook)


def apply_block_compile(model: nn.Module, job_config: JobConfig, fullgraph: bool) -> None:
    """torch.compile each transformer (and MTP) block separately: blocks of one kind share a graph.

    fullgraph=True makes any graph break an error; it is off only where the routed experts have
    their own FSDP unit inside the block (fsdp.py).
    """
    compile_blocks(model, job_config.compile.backend, fullgraph)
    logger.info("Compiled each DeepSeek-V4 block with torch.compile (fullgraph=%s)", fullgraph)


def compile_blocks(model: nn.Module, backend: str, fullgraph: bool) -> None:
    """Replace every block of `model.layers` and `model.mtp` by its torch.compile wrapper, in place
    (also what the benchmarks use to compile as the trainer does)."""
    # Expert parallelism reads the all-to-all split sizes back to the host (expert_parallel.py);
    # dynamo keeps them in the graph as unbacked symbolic sizes only with this on.
    torch._dynamo.config.capture_scalar_outputs = True
    for container in (model.layers, model.mtp):
        if container is None:
            continue
        for name, block in container.named_children():
            container.register_module(name, torch.compile(block, backend=backend, fullgraph=fullgraph))
