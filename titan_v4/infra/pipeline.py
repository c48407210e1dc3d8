"""Pipeline parallelism for DeepSeek-V4 on torchtitan 0.2.2's pipeline machinery.

torchtitan's `pipeline_llm` does the work: it deep-copies the (meta) model once per local stage,
keeps the modules listed for that stage (`pipeline_module_split`: a listed top-level module stays,
an unlisted one becomes None, `layers` / `mtp` keep only their listed entries), parallelizes each
stage with `parallelize_fn` (FSDP2 / EP / AC / compile) and builds the schedule. Its default split
knows only `tok_embeddings / layers.i / norm / output`, so here V4 supplies the module names:

* the first stage holds `tok_embeddings`; the last stage holds `hc_head`, `norm`, `output` and every
  `mtp.k`, so the HyperHead, the head, the MTP blocks and every loss term (LM, MTP, the balance
  losses of its MoE layers) live there;
* the layers are cut in order: by torchtitan's rule (`pipeline_parallel_layers_per_stage`,
  `pipeline_parallel_first/last_stage_less_layers`) or by the user's
  `parallelism.module_fqns_per_model_part`, which is validated here.

The model's forward (model/model.py) passes one tensor between stages: the hc residual streams
followed by the embedded next tokens the MTP blocks need, [B, S, hc + mtp_depth, D]. The MTP
blocks therefore use the one embedding of the first stage, and its MTP gradient returns through the
pipeline's backward: no second copy of the embedding, nothing to synchronise. Token ids reach the
hash-routed layers of every stage as the keyword argument `token_ids` (titan_v4/train/trainer.py); the
gradient-scale fix for 0.2.2's pipelined loss is in titan_v4/train/trainer.py too.

Design notes: docs/design.md, "Pipeline parallelism".
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    ScheduleDualPipeV,
    ScheduleZBVZeroBubble,
    get_schedule_class,
)

from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.pipeline_parallel import generate_llm_fqn_per_model_part, pipeline_llm
from torchtitan.tools.logging import logger

from titan_v4.model.args import DeepSeekV4ModelArgs
from titan_v4.model.aux_loss import aux_losses
from titan_v4.model.moe import moe_layers

#: The modules of the last stage besides its layers, in forward order (the MTP blocks follow).
LAST_STAGE_MODULES = ("hc_head", "norm", "output")

#: torchtitan 0.2.2's named schedules (torch.distributed.pipelining), each tested with V4 on CPU
#: processes (tests/integration/test_pipeline_cpu.py). DualPipeV needs
#: parallelism.pipeline_parallel_expert_parallel_overlap = false (see check_schedule).
SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


class PipelineConfigError(ValueError):
    """A pipeline setting DeepSeek-V4 cannot use; the message names the setting, the value and what is allowed."""


def mtp_module_names(mtp_depth: int) -> list[str]:
    return [f"mtp.{k}" for k in range(mtp_depth)]


def module_names_for_layer_counts(layer_counts: Sequence[int], mtp_depth: int) -> list[list[str]]:
    """The module names of each stage when stage s holds the next `layer_counts[s]` layers.

    The first stage also gets the embedding, the last the HyperHead, norm, head and MTP blocks:
    `[2, 2]` -> `[[tok_embeddings, layers.0, layers.1], [layers.2, layers.3, hc_head, norm, output, mtp.0]]`.
    """
    names, first_layer = [], 0
    for count in layer_counts:
        names.append([f"layers.{i}" for i in range(first_layer, first_layer + count)])
        first_layer += count
    names[0].insert(0, "tok_embeddings")
    names[-1].extend([*LAST_STAGE_MODULES, *mtp_module_names(mtp_depth)])
    return names


def layer_counts(module_names: Sequence[Sequence[str]]) -> list[int]:
    """How many transformer layers each stage of a module-name split holds."""
    return [sum(name.startswith("layers.") for name in stage) for stage in module_names]


def default_module_names(num_stages: int, args: DeepSeekV4ModelArgs, job_config: JobConfig) -> list[list[str]]:
    """torchtitan's default split of the layers (embedding and head weighted as
    `pipeline_parallel_first/last_stage_less_layers` layers), with V4's first- and last-stage modules."""
    parallelism = job_config.parallelism
    llm_names = generate_llm_fqn_per_model_part(
        num_stages,
        args.n_layers,
        parallelism.pipeline_parallel_first_stage_less_layers,
        parallelism.pipeline_parallel_last_stage_less_layers,
    )
    return module_names_for_layer_counts(layer_counts(llm_names), args.mtp_depth)


def validate_module_names(module_names: Sequence[Sequence[str]], args: DeepSeekV4ModelArgs) -> None:
    """Raise PipelineConfigError unless `module_names` (one list per stage) places every V4 module
    exactly once: the embedding on the first stage, the layers in order, the HyperHead, norm, head
    and MTP blocks on the last stage, and no stage empty."""
    setting = f"parallelism.module_fqns_per_model_part={[list(stage) for stage in module_names]}"
    expected = module_names_for_layer_counts([args.n_layers], args.mtp_depth)[0]

    def fail(problem: str) -> None:
        raise PipelineConfigError(
            f"{setting} is invalid for DeepSeek-V4: {problem}. Allowed: the modules {expected}, each once; "
            "tok_embeddings on the first stage; the layers in order; hc_head, norm, output and the mtp.k "
            "blocks on the last stage"
        )

    if len(module_names) < 2:
        fail("pipelining needs at least two stages")
    flat = [name for stage in module_names for name in stage]
    for name in flat:
        if name not in expected:
            fail(f"{name!r} is not a module of this model (list layers and MTP blocks one by one: 'layers.3', 'mtp.0')")
    for name in expected:
        if flat.count(name) != 1:
            fail(f"{name!r} appears {flat.count(name)} times")
    for s, stage in enumerate(module_names):
        if not stage:
            fail(f"stage {s} is empty")
    if "tok_embeddings" not in module_names[0]:
        fail("tok_embeddings is not on the first stage")
    for name in [*LAST_STAGE_MODULES, *mtp_module_names(args.mtp_depth)]:
        if name not in module_names[-1]:
            fail(f"{name!r} is not on the last stage")
    layers = [int(name.split(".")[1]) for name in flat if name.startswith("layers.")]
    if layers != sorted(layers):
        fail(f"the layers are out of order ({layers})")


def stage_module_names(parallel_dims: ParallelDims, job_config: JobConfig, args: DeepSeekV4ModelArgs) -> list[list[str]]:
    """The module names of every pipeline stage: the user's (validated) or V4's default split with
    torchtitan's stage count (1 per rank for single-stage schedules, 2 for multi-stage ones, or
    from `pipeline_parallel_layers_per_stage`)."""
    parallelism = job_config.parallelism
    if parallelism.module_fqns_per_model_part is not None:
        names = [list(stage) for stage in parallelism.module_fqns_per_model_part]
        validate_module_names(names, args)
        return names
    single = issubclass(get_schedule_class(parallelism.pipeline_parallel_schedule), PipelineScheduleSingle)
    if parallelism.pipeline_parallel_layers_per_stage is not None:
        effective = args.n_layers + parallelism.pipeline_parallel_first_stage_less_layers + parallelism.pipeline_parallel_last_stage_less_layers
        num_stages = -(-effective // parallelism.pipeline_parallel_layers_per_stage)
    else:
        num_stages = parallel_dims.pp * (1 if single else 2)
    return default_module_names(num_stages, args, job_config)


def check_schedule(job_config: JobConfig) -> None:
    """Refuse, at start-up and with the reason, the schedule settings V4 cannot train with."""
    parallelism = job_config.parallelism
    name = parallelism.pipeline_parallel_schedule
    if parallelism.pipeline_parallel_schedule_csv:
        raise PipelineConfigError(
            f"parallelism.pipeline_parallel_schedule_csv={parallelism.pipeline_parallel_schedule_csv!r}: "
            f"schedules read from a CSV file are not supported for DeepSeek-V4 (not validated); leave it empty "
            f"and pick one of {SCHEDULES}"
        )
    if name not in SCHEDULES:
        raise PipelineConfigError(f"parallelism.pipeline_parallel_schedule={name!r} is not supported for DeepSeek-V4; allowed: {SCHEDULES}")
    if name == "DualPipeV" and parallelism.pipeline_parallel_expert_parallel_overlap:
        # torchtitan 0.2.2 then registers its overlap callback, which runs one stage's forward and
        # another's backward in two threads on accelerator streams, kept in step only by hooks that
        # its DeepSeek-V3 expert-parallel wrapper installs. V4 does not install them (FSDP and EP
        # collectives would interleave across the threads), and without an accelerator it fails.
        raise PipelineConfigError(
            "parallelism.pipeline_parallel_schedule='DualPipeV' with parallelism.pipeline_parallel_expert_parallel_overlap"
            "=true is not supported for DeepSeek-V4: torchtitan's forward/backward overlap for DualPipeV needs the "
            "DeepSeek-V3 expert-parallel hooks and CUDA streams. Set pipeline_parallel_expert_parallel_overlap = false "
            "(DualPipeV then runs its forward and backward one after the other)"
        )


def check_stage_count(num_stages: int, pp: int, schedule_name: str) -> None:
    """Each of the `pp` ranks must get the number of stages its schedule drives (torchtitan 0.2.2
    would otherwise assert, or give a single-stage schedule only the first of a rank's stages)."""
    schedule = get_schedule_class(schedule_name)
    if issubclass(schedule, PipelineScheduleSingle):
        allowed, ok = f"exactly pipeline_parallel_degree={pp} stages (one per rank)", num_stages == pp
    elif schedule in (ScheduleZBVZeroBubble, ScheduleDualPipeV):
        allowed, ok = f"exactly 2 x pipeline_parallel_degree={2 * pp} stages (two per rank, V-shaped)", num_stages == 2 * pp
    else:
        allowed, ok = f"a multiple of pipeline_parallel_degree={pp} stages", num_stages % pp == 0
    if not ok:
        raise PipelineConfigError(
            f"the pipeline split has {num_stages} stages, but parallelism.pipeline_parallel_schedule="
            f"{schedule_name!r} needs {allowed}; change the split (parallelism.module_fqns_per_model_part or "
            "parallelism.pipeline_parallel_layers_per_stage) or the schedule"
        )


# At its first step a schedule runs every stage's forward once to learn the shapes that cross the
# stage boundaries: torch 2.11 in `_shape_inference` (zeros as inputs), torch 2.13 in
# `_forward_metadata_inference` (uninitialised inputs on all but the first stage). torch 2.13 then
# also runs the loss and the backward on those outputs (`_backward_metadata_inference`).
SHAPE_INFERENCE_METHODS = ("_shape_inference", "_forward_metadata_inference")
BACKWARD_INFERENCE_METHODS = ("_backward_metadata_inference",)


def keep_counters_through_shape_inference(stage, loss_fn=None) -> None:
    """Make the stage's shape inference leave the model's running counters and the loss's records
    as they were.

    The MoE expert loads drive the aux-loss-free bias update (titan_v4/train/optimizer.py); the
    auxiliary losses' sums and the loss function's per-term records feed the training log
    (titan_v4/model/aux_loss.py, titan_v4/model/loss.py). The inference would add a placeholder
    batch to all of them (or, on the first stage, the first microbatch again).
    """
    methods = [name for name in SHAPE_INFERENCE_METHODS if hasattr(stage, name)]
    if not methods:
        raise NotImplementedError(
            f"torch {torch.__version__}: the pipeline stage has none of {SHAPE_INFERENCE_METHODS}, so its "
            "shape-inference forward cannot be kept out of the running counters; titan_v4 knows torch 2.11 to 2.13 here"
        )
    methods += [name for name in BACKWARD_INFERENCE_METHODS if hasattr(stage, name)]
    pause_loss = getattr(loss_fn, "recording_paused", contextlib.nullcontext)
    for name in methods:
        setattr(stage, name, _restoring(getattr(stage, name), stage.submod, pause_loss))


def _running_counters(module: nn.Module) -> list[torch.Tensor]:
    # Looked up at each call: init_weights replaces these buffers after the stages are built.
    counters = [moe.tokens_per_expert for moe in moe_layers([module])]
    return counters + [buffer for aux in aux_losses([module]) for buffer in (aux.sums, aux.count)]


def _restoring(method, module: nn.Module, pause_loss):
    def run(*args, **kwargs):
        counters = _running_counters(module)
        saved = [counter.clone() for counter in counters]
        try:
            with pause_loss():
                return method(*args, **kwargs)
        finally:
            for counter, value in zip(counters, saved):
                counter.copy_(value)

    return run


def pipeline_deepseek_v4(
    model: nn.Module,
    parallel_dims: ParallelDims,
    job_config: JobConfig,
    device: torch.device,
    model_args: DeepSeekV4ModelArgs,
    parallelize_fn,
    loss_fn,
):
    """torchtitan's `pipelining_fn` for DeepSeek-V4: `pipeline_llm` with V4's stage split.

    Returns (schedule, model_parts, has_first_stage, has_last_stage) like `pipeline_llm`.
    """
    parallelism = job_config.parallelism
    check_schedule(job_config)
    names = stage_module_names(parallel_dims, job_config, model_args)
    check_stage_count(len(names), parallel_dims.pp, parallelism.pipeline_parallel_schedule)
    # pipeline_llm reads the split from the job config: hand it a copy that carries V4's.
    v4_job_config = copy.copy(job_config)
    v4_job_config.parallelism = dataclasses.replace(parallelism, module_fqns_per_model_part=names)
    schedule, model_parts, has_first_stage, has_last_stage = pipeline_llm(
        model, parallel_dims, v4_job_config, device, model_args, parallelize_fn, loss_fn
    )
    for stage in pipeline_stages(schedule):
        keep_counters_through_shape_inference(stage, loss_fn)
    dtype = stage_autocast_dtype(parallel_dims, job_config)
    if dtype is not None:
        for part in model_parts:
            autocast_forward(part, device.type, dtype)
        logger.addFilter(drop_no_mixed_precision_lines)
        logger.info(
            f"titan_v4: the pipeline stages' forward runs under torch.autocast({dtype}) "
            "(training.mixed_precision_param), like a single-device run"
        )
    return schedule, model_parts, has_first_stage, has_last_stage


def drop_no_mixed_precision_lines(record: logging.LogRecord) -> bool:
    """A filter for torchtitan's logger: False for the two lines with which torchtitan 0.2.2 announces
    that a pipeline without FSDP trains without mixed precision ("Mixed precision training with TP
    or PP is only supported when FSDP/HSDP/CP is enabled." / "... is disabled"), installed where V4
    autocasts the stages itself and the lines would be false."""
    message = record.getMessage()
    return not message.startswith(("Mixed precision training with TP or PP", "Mixed precision training is disabled"))


def stage_autocast_dtype(parallel_dims: ParallelDims, job_config: JobConfig) -> torch.dtype | None:
    """The dtype the pipeline stages' forward autocasts to, or None.

    torchtitan 0.2.2 gives pipeline stages mixed precision only through FSDP (its
    `maybe_enable_amp` returns no autocast under PP), so a pipeline without FSDP would compute in
    fp32. V4's precision-sensitive math is written for autocast (model/precision.py), so such a
    pipeline autocasts to `training.mixed_precision_param` like a single-device run.
    """
    dtype = TORCH_DTYPE_MAP[job_config.training.mixed_precision_param]
    if not parallel_dims.pp_enabled or parallel_dims.fsdp_enabled or dtype == torch.float32:
        return None
    return dtype


def autocast_forward(model_part: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Run the stage's forward under autocast, and only its forward: the schedule runs the
    backward inside the same step, and backward ops (the custom ops' included) must not be
    autocast. Activation checkpointing replays a forward under the autocast state it recorded."""
    model_part.forward = torch.autocast(device_type, dtype=dtype)(model_part.forward)


def pipeline_stages(schedule) -> list:
    """The local PipelineStages a schedule drives (one for single-stage schedules)."""
    return list(schedule._stages) if hasattr(schedule, "_stages") else [schedule._stage]
