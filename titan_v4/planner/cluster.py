"""One rank of a training job, built as run_train.sh builds it, on a fake cluster of any size.

torch's fake process group (``torch.testing._internal.distributed.fake_pg``) accepts every
collective of a world of N ranks inside one process and moves no data. On it, :func:`build_rank`
runs the trainer's own construction for one rank: the start-up config checks, torchtitan's
``ParallelDims`` and meshes, the model on the meta device, the pipeline split
(``pipeline_deepseek_v4``) or ``parallelize_deepseek_v4`` (EP, activation checkpointing, FSDP2 /
HSDP / DDP) and the optimizer (its state is created at the first step: state.py counts it). Nothing
is allocated: the parameters are meta tensors (DTensors under FSDP / EP), whose local shapes are
what that rank would hold.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp._fully_shard import _fsdp_param
from torch.testing._internal.distributed.fake_pg import FakeStore

from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.tools import utils

from titan_v4.config import v4_settings
from titan_v4.flavors import deepseek_v4_args
from titan_v4.infra.parallelize import parallelize_deepseek_v4
from titan_v4.infra.pipeline import pipeline_deepseek_v4
from titan_v4.model.args import DeepSeekV4ModelArgs
from titan_v4.model.loss import build_v4_loss
from titan_v4.model.model import DeepSeekV4Model
from titan_v4.train.checks import check_job_config
from titan_v4.train.optimizer import build_v4_optimizers


@dataclasses.dataclass
class RankBuild:
    """What one rank holds after start-up (meta tensors)."""

    rank: int
    world_size: int
    parallel_dims: ParallelDims
    model_args: DeepSeekV4ModelArgs
    model_parts: list[nn.Module]  # one, or this rank's pipeline stages
    optimizers: object  # torchtitan's OptimizersContainer, without state (None when training.steps == 0)
    first_stage: bool
    last_stage: bool
    pp_schedule: object | None  # the pipeline schedule, None without PP


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int) -> Iterator[None]:
    """The default process group is a fake one of `world_size` ranks, this process being `rank`."""
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised; the planner needs its own (fake) one")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def parallel_dims_for(job_config: JobConfig, world_size: int) -> ParallelDims:
    """torchtitan's ParallelDims of the job (its checks included), as the trainer makes them."""
    p = job_config.parallelism
    return ParallelDims(
        dp_shard=p.data_parallel_shard_degree,
        dp_replicate=p.data_parallel_replicate_degree,
        cp=p.context_parallel_degree,
        tp=p.tensor_parallel_degree,
        pp=p.pipeline_parallel_degree,
        ep=p.expert_parallel_degree,
        etp=p.expert_tensor_parallel_degree,
        world_size=world_size,
    )


def model_args_for(job_config: JobConfig) -> DeepSeekV4ModelArgs:
    """The flavor's arguments updated from the job config, as the trainer does (on a copy: the
    registry's entry stays as it is)."""
    args = copy.deepcopy(deepseek_v4_args[job_config.model.flavor])
    args.update_from_config(job_config)
    return args


@contextlib.contextmanager
def _one_empty_chunk() -> Iterator[None]:
    """FSDP2 splits each parameter into one chunk per rank and pads the list with a new empty tensor
    per missing chunk: ~3 M meta tensors for Flash at 2048 ranks (minutes). One shared empty
    tensor does the same for the sizes FSDP reads from the list (the empty chunks hold no data)."""

    def chunk_with_empty(tensor: torch.Tensor, num_chunks: int, dim: int) -> list[torch.Tensor]:
        chunks = list(torch.chunk(tensor, num_chunks, dim=dim))
        if len(chunks) < num_chunks:
            chunks += [chunks[0].new_empty(0)] * (num_chunks - len(chunks))
        return chunks

    saved = _fsdp_param._chunk_with_empty
    _fsdp_param._chunk_with_empty = chunk_with_empty
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = saved


def build_rank(job_config: JobConfig, world_size: int, rank: int) -> RankBuild:
    """Build `rank` of a `world_size`-rank job on a fake process group (which must be current, see
    :func:`fake_process_group`). Raises what run_train.sh would raise for a job that cannot start
    (JobConfigError, torchtitan's and titan_v4's layout errors)."""
    check_job_config(job_config, world_size)
    job_config.optimizer.v4 = v4_settings(job_config)  # what V4Trainer attaches for the optimizer builder
    parallel_dims = parallel_dims_for(job_config, world_size)
    parallel_dims.build_mesh()
    model_args = model_args_for(job_config)
    with torch.device("meta"), utils.set_default_dtype(TORCH_DTYPE_MAP[job_config.training.dtype]):
        model = DeepSeekV4Model(model_args)
    schedule = None
    with _one_empty_chunk():
        if parallel_dims.pp_enabled:
            loss_fn = build_v4_loss(job_config, parallel_dims=parallel_dims)
            schedule, parts, first, last = pipeline_deepseek_v4(
                model, parallel_dims, job_config, torch.device("cpu"), model_args, parallelize_deepseek_v4, loss_fn
            )
        else:
            parts, first, last = [parallelize_deepseek_v4(model, parallel_dims, job_config)], True, True
    optimizers = None
    if job_config.training.steps > 0:
        # torch's fused AdamW refuses meta tensors; foreach creates the same state tensors.
        optimizer_config = copy.copy(job_config.optimizer)
        if optimizer_config.implementation == "fused":
            optimizer_config.implementation = "foreach"
        optimizers = build_v4_optimizers(parts, optimizer_config, parallel_dims)
    return RankBuild(rank, world_size, parallel_dims, model_args, parts, optimizers, first, last, schedule)
