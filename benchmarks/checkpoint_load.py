"""Checkpoint-load benchmark: a synthetic official-layout checkpoint (FP8 / FP4, random values) of
`--flavor` loaded through torchtitan's initial-load path (`initial_load_in_hf`) under EP + FSDP2.

    python -m benchmarks.checkpoint_load --out DIR [--ckpt DIR] [--flavor flash_4layers] [--ngpu 2] [--ep 2]

1. writes the checkpoint to `--ckpt` (local disk; Flash's first 4 layers + MTP are ~17 GB);
2. runs `NGPU=n ./run_train.sh` on flash_proxy.toml's settings with the flavor, bf16 parameters
   (`training.dtype`: 34B parameters fit two 80 GB GPUs only without fp32 master weights), and
   `training.steps 0`: torchtitan builds and parallelizes the model, loads the checkpoint, and stops;
3. writes DIR/checkpoint_load.md: write time and size, torchtitan's load time, and per rank the
   reader's summary (load time, bytes, peak host memory, peak GPU memory), plus the full log.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from titan_v4.checkpoint.synthetic import write_synthetic_official
from titan_v4.flavors import deepseek_v4_args

from benchmarks.timing import Stopwatch

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def run_load(ckpt: Path, out: Path, flavor: str, ngpu: int, ep: int) -> tuple[str, float, list[str]]:
    args = [
        "--job.config_file", "train_configs/flash_proxy.toml", "--model.flavor", flavor,
        "--job.dump_folder", str(out / "run"), "--metrics.disable_color_printing",
        "--training.dtype", "bfloat16", "--training.mixed_precision_param", "bfloat16", "--training.steps", "0",
        "--parallelism.data_parallel_shard_degree", str(ngpu), "--parallelism.expert_parallel_degree", str(ep),
        "--checkpoint.enable", "--checkpoint.load_only", "--checkpoint.initial_load_path", str(ckpt),
        "--checkpoint.initial_load_in_hf", "--checkpoint.initial_load_model_only",
    ]  # fmt: skip
    env = dict(os.environ, NGPU=str(ngpu), LOG_RANK=",".join(str(r) for r in range(ngpu)))
    with Stopwatch() as watch:
        proc = subprocess.run(["./run_train.sh", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = watch.ms / 1e3
    (out / "train.log").write_text(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"run_train.sh failed ({proc.returncode}); last lines:\n{proc.stdout[-6000:]}")
    return proc.stdout, wall, ["NGPU=" + str(ngpu), "./run_train.sh", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ckpt", type=Path, default=Path("/tmp/titan_v4_synthetic_ckpt"))
    parser.add_argument("--flavor", default="flash_4layers")
    parser.add_argument("--ngpu", type=int, default=2)
    parser.add_argument("--ep", type=int, default=2)
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)

    with Stopwatch() as watch:
        size = write_synthetic_official(a.ckpt, deepseek_v4_args[a.flavor])
    write_s = watch.ms / 1e3
    print(f"wrote {size / GIB:.2f} GiB to {a.ckpt} in {write_s:.1f} s", flush=True)

    log, wall, command = run_load(a.ckpt, a.out, a.flavor, a.ngpu, a.ep)
    summaries = re.findall(r"\[rank(\d+)\]:.*checkpoint: (loaded .*)", log)
    titan = re.findall(r"\[rank(\d+)\]:.*Finished loading the checkpoint in ([\d.]+) seconds", log)
    layout = re.search(r"checkpoint \S+: (official layout.*)", log)
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip() if torch.cuda.is_available() else "none (CPU)"
    report = [
        f"# Checkpoint load: `{a.flavor}` synthetic official checkpoint, EP={a.ep} + FSDP2 on {a.ngpu} processes",
        "",
        f"- **GPU**: {gpu.splitlines()[0] if gpu else 'unknown'} x {a.ngpu}",
        f"- **Software**: torch {torch.__version__}, Python {sys.version.split()[0]}",
        f"- **Checkpoint**: {size / GIB:.2f} GiB written in {write_s:.1f} s ({layout.group(1) if layout else 'layout line not found'})",
        f"- **Command**: `{' '.join(command)}`",
        f"- **run_train.sh wall time** (start, build, parallelize, init, load, exit): {wall:.1f} s",
        "",
        "| rank | torchtitan load time | reader summary |",
        "|---|---|---|",
    ]
    times = dict(titan)
    report += [f"| {rank} | {times.get(rank, '?')} s | {summary} |" for rank, summary in summaries]
    (a.out / "checkpoint_load.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
