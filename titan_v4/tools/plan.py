"""Plan a training job on a cluster that is not here: memory per rank, collectives, step time.

    python -m titan_v4.tools.plan --job.config_file train_configs/flash.toml --gpus 256 \\
        [--gpu-memory-gib 78] [--gpus-per-node 8] [--json plan.json] [any run_train.sh override]

Builds the job's rank 0 (and the first rank of every pipeline stage) in this one CPU process, on a
fake process group of --gpus ranks, with the trainer's own code (config checks, meshes, EP, AC,
FSDP2, the pipeline split, the optimizer), and simulates the activations on fake tensors
(titan_v4/planner/, docs/planner.md). Prints a table per rank and the projected step; exits 0 when
every rank's peak fits --gpu-memory-gib, 1 when one does not (naming the rank and the smallest
change that fits: full activation checkpointing, or more GPUs), 2 when the job cannot start (the
error run_train.sh would give).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import titan_v4  # noqa: F401  (registers the model; the CPU shim where there is no CUDA)
from torchtitan.config import ConfigManager

from titan_v4.planner.plan import JobPlan, plan_job
from titan_v4.planner.roofline import h100
from titan_v4.planner.traffic import seconds

GIB = 2**30
DEFAULT_GPU_MEMORY_GIB = 78.0  # an 80 GB H100: 79.2 GiB, 78.7 of them free to torch beside the CUDA context


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m titan_v4.tools.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--job.config_file", dest="config_file", required=True, help="training TOML")
    parser.add_argument("--gpus", type=int, required=True, help="world size: GPUs of the cluster (>= 1)")
    parser.add_argument("--gpu-memory-gib", type=float, default=DEFAULT_GPU_MEMORY_GIB,
                        help=f"memory a rank may allocate, GiB (default {DEFAULT_GPU_MEMORY_GIB:g}, an 80 GB H100)")  # fmt: skip
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node: NVLink inside, network between (default 8)")
    parser.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    args, overrides = parser.parse_known_args(argv)
    if args.gpus < 1:
        parser.error(f"--gpus={args.gpus} is invalid: must be >= 1")
    if args.gpus_per_node < 1:
        parser.error(f"--gpus-per-node={args.gpus_per_node} is invalid: must be >= 1")
    if args.gpu_memory_gib <= 0:
        parser.error(f"--gpu-memory-gib={args.gpu_memory_gib:g} is invalid: must be > 0")
    if args.json is not None and Path(args.json).is_dir():
        parser.error(f"--json={args.json!r} is invalid: it is a folder; allowed: a file path")
    return args, overrides


def job_config_for(config_file: str, overrides: list[str]):
    return ConfigManager().parse_args(["--job.config_file", config_file, *overrides])


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_plan(plan: JobPlan, config_file: str) -> str:
    hw = plan.hardware
    layout = ", ".join(f"{k}={v}" for k, v in plan.layout.items())
    lines = [
        f"{config_file} on {plan.world_size} x {hw.name} ({plan.gpus_per_node} per node, {hw.memory_bytes / GIB:g} GiB each): {layout}",
        "",
        "| rank | stage | layers | parameters | gradients | optimizer | activations | FSDP buffers | autocast copies | peak GiB | peak during |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in plan.ranks:
        layers = f"{r.layers[0]}-{r.layers[-1]}" if r.layers else "-"
        stage = "-" if r.pipeline_stage is None else str(r.pipeline_stage)
        lines.append(f"| {r.rank} | {stage} | {layers} | {_gib(r.parameters)} | {_gib(r.gradients)} | {_gib(r.optimizer)} | "
                     f"{_gib(r.activations)} | {_gib(r.comm_buffers)} | {_gib(r.autocast_copies)} | **{_gib(r.peak_bytes)}** | "
                     f"{r.peak_moment} |")  # fmt: skip
    lines += ["", "Collectives of rank 0 (bytes it sends):", "",
              "| collective | per | calls | GiB each | group | crosses nodes | overlapped | seconds per step |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    passes = plan.micro_batches
    for c in plan.ranks[0].collectives:
        t = seconds(c, hw.nvlink_bytes_per_s, hw.network_bytes_per_s) * (passes if c.per == "micro-batch" else 1)
        lines.append(f"| {c.name} | {c.per} | {c.count} | {c.bytes_each / GIB:.3f} | {c.group_size} | "
                     f"{'yes' if c.cross_node else 'no'} | {'yes' if c.overlapped else 'no'} | {t:.3f} |")  # fmt: skip
    r0 = plan.ranks[0]
    lines += [
        "",
        f"Projected step ({plan.tokens_per_step:,} tokens, {passes} forward-backward passes per rank): {plan.step_s:.3f} s "
        f"(rank 0: compute {r0.compute_s:.3f} s, exposed communication {r0.exposed_comm_s:.3f} s, optimizer {r0.optimizer_s:.3f} s); "
        f"{plan.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, MFU {100 * plan.mfu:.1f} % of 989 TFLOP/s",
    ]  # fmt: skip
    return "\n".join(lines)


def plan_as_json(plan: JobPlan) -> dict:
    return {
        "world_size": plan.world_size, "gpus_per_node": plan.gpus_per_node, "hardware": dataclasses.asdict(plan.hardware),
        "layout": plan.layout, "micro_batches": plan.micro_batches, "tokens_per_step": plan.tokens_per_step,
        "step_seconds": plan.step_s, "tokens_per_s_per_gpu": plan.tokens_per_s_per_gpu, "mfu": plan.mfu,
        "fits": plan.fits, "peak_bytes": plan.peak_bytes,
        "ranks": [{**{k: v for k, v in dataclasses.asdict(r).items() if k != "collectives"},
                   "collectives": [{**dataclasses.asdict(c), "bytes": c.bytes} for c in r.collectives]} for r in plan.ranks],
    }  # fmt: skip


def smallest_change(args: argparse.Namespace, overrides: list[str], job_config) -> str:
    """The first change that fits: full activation checkpointing, else 2x, 4x, 8x the GPUs."""
    hw = h100(args.gpu_memory_gib)
    if job_config.activation_checkpoint.mode != "full":
        trial = [*overrides, "--activation_checkpoint.mode", "full"]
        if plan_job(job_config_for(args.config_file, trial), args.gpus, hw, args.gpus_per_node).fits:
            return "--activation_checkpoint.mode full"
    for factor in (2, 4, 8):
        try:
            trial = plan_job(job_config_for(args.config_file, overrides), args.gpus * factor, hw, args.gpus_per_node)
        except Exception:  # a layout that does not scale this way (e.g. a fixed global batch)
            continue
        if trial.fits:
            return f"--gpus {args.gpus * factor} (peak {trial.peak_bytes / GIB:.1f} GiB)"
    return "none found among full activation checkpointing and up to 8x the GPUs"


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        job_config = job_config_for(args.config_file, overrides)
        plan = plan_job(job_config, args.gpus, h100(args.gpu_memory_gib), args.gpus_per_node)
    except (ValueError, NotImplementedError, KeyError, AssertionError) as e:
        print(f"titan_v4.tools.plan: the job cannot start on {args.gpus} GPUs: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, args.config_file))
    if args.json:
        Path(args.json).write_text(json.dumps(plan_as_json(plan), indent=1))
    if plan.fits:
        print(f"\nfits: the largest peak is {plan.peak_bytes / GIB:.2f} GiB of {args.gpu_memory_gib:g} GiB")
        return 0
    worst = max(plan.ranks, key=lambda r: r.peak_bytes)
    change = smallest_change(args, overrides, job_config)
    print(f"\ntitan_v4.tools.plan: does not fit: rank {worst.rank} peaks at {worst.peak_bytes / GIB:.2f} GiB "
          f"(during {worst.peak_moment}) above --gpu-memory-gib {args.gpu_memory_gib:g}; smallest change that fits: {change}")  # fmt: skip
    return 1


if __name__ == "__main__":
    sys.exit(main())
