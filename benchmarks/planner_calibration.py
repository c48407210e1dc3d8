"""The planner (titan_v4/planner, python -m titan_v4.tools.plan) against measured runs.

Each case is a run_train.sh job on H100s. With ``--measure OUT --gpus N`` (on a machine with N
GPUs) the script trains the cases of N GPUs (20 steps, log every 10) and adds what the trainer
logged at step 20 to ``OUT/measured.json``: tokens/s per GPU over steps 11-20, peak allocated
(``max_active_gib``) and peak reserved memory. Without it, it plans every case here on the CPU and
prints predicted against measured: the file given by ``--measured`` (such a measured.json) where it
has the case, else the figures recorded in docs/perf (each row names its source).

    python -m benchmarks.planner_calibration --measure $OUT --gpus 1   # on the GPU machine
    python -m benchmarks.planner_calibration --measured docs/perf/raw/<date>-planner-measured.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

CONFIG = "train_configs/flash_proxy.toml"
EAGER_FULL = ["--compile.no-enable", "--activation_checkpoint.mode", "full"]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    gpus: int
    overrides: list[str]
    # Recorded measurements (tokens/s per GPU, allocated GiB, reserved GiB; None: not recorded)
    # and where they are from; None for the cases --measure runs.
    recorded: tuple[float | None, float | None, float | None] | None = None
    source: str = "this script's --measure"


CASES = [
    Case("1 GPU, compiled, AC none: the config", 1, []),
    Case("1 GPU, eager, AC none", 1, ["--compile.no-enable"]),
    Case("1 GPU, eager, AC full", 1, EAGER_FULL),
    Case("1 GPU, eager, AC full, local batch 2", 1, [*EAGER_FULL, "--training.local_batch_size", "2"]),
    Case("FSDP=2, eager, AC full", 2, [*EAGER_FULL, "--parallelism.data_parallel_shard_degree", "2"],
         (9582, None, 44.4), "docs/perf/parallel.md"),
    Case("EP=2 + FSDP=2, eager, AC full", 2,
         [*EAGER_FULL, "--parallelism.data_parallel_shard_degree", "2", "--parallelism.expert_parallel_degree", "2"],
         (9313, None, 42.9), "docs/perf/parallel.md"),
    Case("PP=2 1F1B (2:2), 8 micro-batches, AC full", 2,
         [*EAGER_FULL, "--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "8",
          "--parallelism.data_parallel_shard_degree", "1"],
         (7578, 45.8, None), "docs/perf/parallel.md (stage 1, the larger)"),
    Case("FSDP=4, eager, AC full", 4, [*EAGER_FULL, "--parallelism.data_parallel_shard_degree", "4"],
         (9471, None, 29.1), "docs/perf/parallel.md"),
    Case("EP=4 + FSDP=4, eager, AC full", 4,
         [*EAGER_FULL, "--parallelism.data_parallel_shard_degree", "4", "--parallelism.expert_parallel_degree", "4"],
         (9083, None, 28.5), "docs/perf/parallel.md"),
]  # fmt: skip


def measure(out: Path, gpus: int) -> None:
    """Train every case of exactly `gpus` GPUs; add what they logged to OUT/measured.json."""
    results = json.loads((out / "measured.json").read_text()) if (out / "measured.json").exists() else {}
    for case in CASES:
        if case.gpus != gpus:
            continue
        folder = out / case.name.replace(" ", "_").replace(",", "").replace("=", "")
        command = ["./run_train.sh", "--job.config_file", CONFIG, *case.overrides, "--training.steps", "20",
                   "--metrics.log_freq", "10", "--checkpoint.no-enable", "--job.dump_folder", str(folder)]  # fmt: skip
        env = {**os.environ, "NGPU": str(case.gpus)}
        with open(str(folder) + ".log", "w") as log:
            status = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        records = [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines()] if status == 0 else []
        last = records[-1] if records else {}
        results[case.name] = {"status": status, "tps": last.get("tps"), "max_active_gib": last.get("max_active_gib"),
                              "max_reserved_gib": last.get("max_reserved_gib")}  # fmt: skip
        print(case.name, results[case.name], flush=True)
    (out / "measured.json").write_text(json.dumps(results, indent=1))


def _error(predicted: float, measured: float | None) -> str:
    return "-" if measured is None else f"{100 * (predicted / measured - 1):+.1f} %"


def compare(measured_file: str | None) -> None:
    import titan_v4  # noqa: F401  (the CPU shim where there is no CUDA)
    from titan_v4.planner.plan import plan_job
    from titan_v4.planner.roofline import h100
    from titan_v4.tools.plan import job_config_for

    fresh = json.loads(Path(measured_file).read_text()) if measured_file else {}
    print("| case | GPUs | tokens/s per GPU: planned / measured (error) | peak GiB planned | allocated measured (error) "
          "| reserved measured (error) | source |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for case in CASES:
        plan = plan_job(job_config_for(CONFIG, case.overrides), case.gpus, h100(), gpus_per_node=8)
        peak = plan.peak_bytes / 2**30
        source = measured_file
        if case.name in fresh:
            m = fresh[case.name]
            tps, active, reserved = m.get("tps"), m.get("max_active_gib"), m.get("max_reserved_gib")
        elif case.recorded is not None:
            (tps, active, reserved), source = case.recorded, case.source
        else:
            (tps, active, reserved), source = (None, None, None), "(not measured)"
        fmt = lambda v: "-" if v is None else f"{v:,.1f}"  # noqa: E731
        print(f"| {case.name} | {case.gpus} | {plan.tokens_per_s_per_gpu:,.0f} / {fmt(tps)} ({_error(plan.tokens_per_s_per_gpu, tps)}) "
              f"| {peak:.1f} | {fmt(active)} ({_error(peak, active)}) | {fmt(reserved)} ({_error(peak, reserved)}) "
              f"| {source} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", metavar="OUT", default=None, help="train the fresh cases here (GPU) and write OUT/measured.json")
    parser.add_argument("--gpus", type=int, default=1, help="--measure trains the cases of this many GPUs (default 1)")
    parser.add_argument("--measured", default=None, help="a measured.json to compare the plans with")
    args = parser.parse_args()
    if args.measure:
        out = Path(args.measure)
        out.mkdir(parents=True, exist_ok=True)
        measure(out, args.gpus)
    else:
        compare(args.measured)


if __name__ == "__main__":
    sys.exit(main())
