"""Pipeline experiments: sweep schedules x microbatch counts x stage splits, a few steps each.

    python -m titan_v4.tools.pipeline_experiments --job.config_file CONFIG \\
        [--schedules 1F1B,Interleaved1F1B] [--microbatches 4,8] [--splits auto,3:1] \\
        [--steps 5] [--nproc N] [--pp N] --out DIR [trainer overrides, e.g. --training.local_batch_size 8]

Each combination trains for `--steps` steps on the visible devices (every GPU, or `--nproc` CPU
processes over gloo; pipeline degree `--pp`, default all of them) through
titan_v4.tools.pipeline_timing, which is titan_v4.train plus timers. The results go to the
console, `DIR/results.csv` and `DIR/results.png`; each run's log and timings stay in `DIR/runs/`.

* `--microbatches M`: the local batch (`training.local_batch_size`) is cut into M microbatches
  (`parallelism.pipeline_parallel_microbatch_size = local_batch_size / M`); `config` = as configured.
* `--splits`: `auto` is the trainer's default split (titan_v4/infra/pipeline.py);
  `a:b:...` gives the number of transformer layers of each stage, in order (the first stage also
  holds the embedding, the last the HyperHead, head and MTP blocks).
* Columns: the median step time of the steps after the first (warm-up), tokens per second for
  the whole job and per device, the peak memory of each rank (CUDA: peak allocated; CPU: peak
  resident set of the process), the measured bubble of each rank (1 - time inside the stages'
  forward/backward / time inside the schedule's step), and the error of a combination that is
  refused before it starts (the trainer's own checks, same message) or fails.

Matplotlib draws the plot; without it the table and CSV are still written and the console says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import titan_v4  # noqa: F401  (installs the CPU shim, which must come before torchtitan)
from torchtitan.config import ConfigManager

from titan_v4.flavors import deepseek_v4_args
from titan_v4.infra.pipeline import (
    SCHEDULES,
    check_schedule,
    check_stage_count,
    module_names_for_layer_counts,
    validate_module_names,
)
from titan_v4.tools.arguments import ToolArgumentError, prepare_out_dir

WARMUP_STEPS = 1  # the first step also infers the stage shapes (and compiles, if enabled)


@dataclass(frozen=True)
class Combination:
    schedule: str
    microbatches: str  # a count, or "config"
    split: str  # "auto" or "a:b:..." layers per stage

    @property
    def name(self) -> str:
        return f"{self.schedule}_mb-{self.microbatches}_split-{self.split.replace(':', '-')}"


@dataclass
class Result:
    combination: Combination
    layers_per_stage: str = ""
    step_s: float | None = None
    tokens_per_s: float | None = None
    tokens_per_s_per_device: float | None = None
    peak_memory_gib: list[float] = field(default_factory=list)  # per rank
    bubble: list[float] = field(default_factory=list)  # per rank
    memory_measure: str = ""
    error: str = ""


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m titan_v4.tools.pipeline_experiments",
        description="Sweep pipeline schedules x microbatch counts x stage splits; write a table, a CSV and a plot. "
        "Arguments it does not know are passed to every training run.",
    )
    parser.add_argument("--job.config_file", dest="config_file", required=True, help="training TOML")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help=f"comma-separated, from {', '.join(SCHEDULES)}")
    parser.add_argument("--microbatches", default="config", help="comma-separated microbatch counts, or 'config'")
    parser.add_argument("--splits", default="auto", help="comma-separated: 'auto' or layers per stage such as 3:1")
    parser.add_argument("--steps", type=int, default=5, help="training steps per combination (>= 2; the first is warm-up)")
    parser.add_argument("--nproc", type=int, default=None, help="processes: default every GPU, else 2 CPU processes")
    parser.add_argument("--pp", type=int, default=None, help="pipeline degree (default: every process)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per training run")
    parser.add_argument("--out", required=True, help="output folder (created if missing, must be writable)")
    args, overrides = parser.parse_known_args(argv)
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps={args.steps}: needs more than {WARMUP_STEPS} (the first step is warm-up)")
    for name in args.schedules.split(","):
        if name not in SCHEDULES:
            parser.error(f"--schedules: {name!r} is not one of {SCHEDULES}")
    for count in args.microbatches.split(","):
        if count != "config" and not (count.isdigit() and int(count) > 0):
            parser.error(f"--microbatches: {count!r} is neither a positive count nor 'config'")
    for split in args.splits.split(","):
        if split != "auto" and not re.fullmatch(r"\d+(:\d+)+", split):
            parser.error(f"--splits: {split!r} is neither 'auto' nor layers per stage such as 3:1")
    try:  # before any run, so that a file or an unwritable path costs no training
        args.out = prepare_out_dir(args.out)
    except ToolArgumentError as e:
        parser.error(str(e))
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() or 2
    if args.pp is None:
        args.pp = args.nproc
    return args, overrides


def combinations(args: argparse.Namespace) -> list[Combination]:
    return [
        Combination(schedule, microbatches, split)
        for schedule in args.schedules.split(",")
        for microbatches in args.microbatches.split(",")
        for split in args.splits.split(",")
    ]


def run_arguments(args: argparse.Namespace, overrides: list[str], combo: Combination) -> list[str]:
    """The trainer's arguments for one combination, after checking it as the trainer would.

    Raises ValueError (the trainer's own message where the trainer has the check) for a
    combination that would be refused at start-up.
    """
    cli = ["--job.config_file", args.config_file, "--training.steps", str(args.steps), "--checkpoint.no-enable",
           "--parallelism.pipeline_parallel_degree", str(args.pp), *overrides,
           "--parallelism.pipeline_parallel_schedule", combo.schedule]  # fmt: skip
    job_config = ConfigManager().parse_args(cli)
    local_batch = job_config.training.local_batch_size
    if combo.microbatches != "config":
        count = int(combo.microbatches)
        if local_batch % count:
            raise ValueError(f"training.local_batch_size={local_batch} cannot be cut into {count} microbatches")
        cli += ["--parallelism.pipeline_parallel_microbatch_size", str(local_batch // count)]
    check_schedule(job_config)
    if combo.split != "auto":
        model_args = deepseek_v4_args[job_config.model.flavor]
        counts = [int(c) for c in combo.split.split(":")]
        if sum(counts) != model_args.n_layers:
            raise ValueError(f"split {combo.split} places {sum(counts)} layers; flavor {job_config.model.flavor} has {model_args.n_layers}")
        names = module_names_for_layer_counts(counts, model_args.mtp_depth)
        validate_module_names(names, model_args)
        check_stage_count(len(names), job_config.parallelism.pipeline_parallel_degree, combo.schedule)
        cli += ["--parallelism.module_fqns_per_model_part", *(",".join(stage) for stage in names)]
    return cli


def launch(cli: list[str], nproc: int, run_dir: Path, timeout: int) -> tuple[int, str]:
    """torchrun titan_v4.tools.pipeline_timing (the flags of run_train.sh); returns (exit code, log)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend", "c10d",
        "--rdzv_endpoint=localhost:0", "--local-ranks-filter", ",".join(map(str, range(nproc))), "--role", "rank",
        "--tee", "3", "-m", "titan_v4.tools.pipeline_timing", *cli, "--job.dump_folder", str(run_dir),
    ]  # fmt: skip
    env = dict(os.environ, PYTORCH_ALLOC_CONF="expandable_segments:True")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = -1
        proc.terminate()  # torchrun stops its trainer processes on SIGTERM
        try:
            log, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
        log += f"\nTimeoutError: no result after {timeout} s (--timeout)"
    (run_dir / "train.log").write_text(log)
    return rc, log


_ERROR = re.compile(r"^(?:\[rank\d+\]:)*\s*((?:[\w.]+Error|[\w.]+Exception|torch\.OutOfMemoryError)\b.*)$", re.MULTILINE)
_STAGE = re.compile(r"is building stage_idx (\d+) with modules (\[.*?\])")


def error_from_log(log: str) -> str:
    """The last exception line of a failed run (its type and message)."""
    errors = [m.group(1).strip() for m in _ERROR.finditer(log) if "ChildFailedError" not in m.group(1)]
    return errors[-1] if errors else "training failed (no exception in the log; see runs/<name>/train.log)"


def layers_per_stage(log: str) -> str:
    """'2:2' from the stage-building lines of the log (stage order)."""
    stages = {int(i): modules.count("'layers.") for i, modules in _STAGE.findall(log)}
    return ":".join(str(stages[i]) for i in sorted(stages))


def summarize(combo: Combination, run_dir: Path, log: str) -> Result:
    """Result of a finished run from its ranks' timing files (steps after the warm-up)."""
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "timing").glob("rank_*.json"), key=lambda p: int(p.stem[5:]))]
    result = Result(combo, layers_per_stage=layers_per_stage(log))
    if not ranks:
        result.error = "the run wrote no timings (see runs/<name>/train.log)"
        return result
    steps = slice(WARMUP_STEPS, None)
    step_s = statistics.median(max(values) for values in zip(*(r["step_s"][steps] for r in ranks)))
    result.step_s = step_s
    result.tokens_per_s = ranks[0]["tokens_per_step"] / step_s
    result.tokens_per_s_per_device = result.tokens_per_s / ranks[0]["world_size"]
    result.peak_memory_gib = [r["peak_memory_gib"] for r in ranks]
    result.memory_measure = ranks[0]["memory_measure"]
    for r in ranks:
        pipeline = sum(r["pipeline_s"][steps])
        result.bubble.append(1.0 - sum(r["busy_s"][steps]) / pipeline if pipeline > 0 else float("nan"))
    return result


def run_combination(args: argparse.Namespace, overrides: list[str], combo: Combination) -> Result:
    try:
        cli = run_arguments(args, overrides, combo)
    except ValueError as e:  # refused before starting, with the trainer's message
        return Result(combo, error=f"refused: {e}")
    run_dir = args.out / "runs" / combo.name
    rc, log = launch(cli, args.nproc, run_dir, args.timeout)
    if rc != 0:
        return Result(combo, layers_per_stage=layers_per_stage(log), error=error_from_log(log))
    return summarize(combo, run_dir, log)


COLUMNS = ("schedule", "microbatches", "split", "layers_per_stage", "step_s", "tokens_per_s", "tokens_per_s_per_device",
           "peak_memory_gib", "bubble", "memory_measure", "error")  # fmt: skip


def row(result: Result) -> dict[str, str]:
    def num(value, fmt):
        return "" if value is None else format(value, fmt)

    c = result.combination
    return {
        "schedule": c.schedule,
        "microbatches": c.microbatches,
        "split": c.split,
        "layers_per_stage": result.layers_per_stage,
        "step_s": num(result.step_s, ".3f"),
        "tokens_per_s": num(result.tokens_per_s, ".0f"),
        "tokens_per_s_per_device": num(result.tokens_per_s_per_device, ".0f"),
        "peak_memory_gib": " ".join(f"{m:.2f}" for m in result.peak_memory_gib),
        "bubble": " ".join(f"{b:.3f}" for b in result.bubble),
        "memory_measure": result.memory_measure,
        "error": result.error,
    }


def write_csv(results: list[Result], path: Path) -> None:
    """One row per combination; per-rank values (peak memory, bubble) separated by spaces, rank order."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(row(r) for r in results)


def format_table(results: list[Result]) -> str:
    rows = [dict(zip(COLUMNS, COLUMNS))] + [row(r) for r in results]
    shown = [c for c in COLUMNS if c != "memory_measure"]
    widths = {c: max(len(r[c]) for r in rows) for c in shown if c != "error"}
    lines = ["  ".join(r[c].ljust(widths[c]) if c != "error" else r[c] for c in shown).rstrip() for r in rows]
    measures = {r.memory_measure for r in results if r.memory_measure}
    note = f"peak_memory_gib and bubble per rank, rank 0 first; memory measure: {', '.join(sorted(measures)) or 'n/a'}"
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], note])


def plot(results: list[Result], path: Path, title: str) -> str:
    """Bars of tokens/s per device and of the mean measured bubble; returns what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"{path.name} not written: matplotlib is not installed (pip install matplotlib)"
    labels = [f"{r.combination.schedule}\nmb {r.combination.microbatches}, {r.layers_per_stage or r.combination.split}" for r in results]
    x = range(len(results))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 1.3 * len(results)), 7), sharex=True)
    top.bar(x, [r.tokens_per_s_per_device or 0.0 for r in results], color="tab:blue")
    top.set_ylabel("tokens/s per device")
    top.set_title(title)
    bottom.bar(x, [statistics.fmean(r.bubble) if r.bubble else 0.0 for r in results], color="tab:orange")
    bottom.set_ylabel("measured bubble (mean of ranks)")
    bottom.set_ylim(0, 1)
    for i, r in enumerate(results):
        if r.error:
            top.text(i, 0, "refused" if r.error.startswith("refused") else "failed", ha="center", va="bottom", color="red")
    bottom.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    results = []
    for combo in combinations(args):
        print(f"[pipeline_experiments] {combo.name} on {args.nproc} processes (pp={args.pp}) ...", flush=True)
        results.append(run_combination(args, overrides, combo))
        # After every run, so that the results so far survive an interrupted sweep.
        write_csv(results, args.out / "results.csv")
        title = f"{Path(args.config_file).name}: {args.nproc} processes, pipeline degree {args.pp}"
        plot_message = plot(results, args.out / "results.png", title)
    print(format_table(results))
    print(f"wrote {args.out / 'results.csv'}")
    print(plot_message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
