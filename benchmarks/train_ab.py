"""End-to-end A/B of the custom-op kernels: one training config, reference ops vs Triton kernels,
eager and compiled, each as a real `./run_train.sh` run in this session, on this machine.

    python -m benchmarks.train_ab --config train_configs/flash_proxy.toml --steps 10 --out DIR
    python -m benchmarks.train_ab ... --variants kernels-eager,kernels-compiled

"reference" runs set TITAN_V4_REFERENCE_OPS=1 (custom_ops/flags.py: every v4:: op runs its eager
reference on CUDA too); "compiled" adds --compile.enable (per-block torch.compile and the compiled
cross-entropy), "eager" --compile.no-enable, whatever the config says. For each run it
prints the median step time over steps >= 3 (from the trainer's tokens/s in
<dump_folder>/logs/metrics.jsonl: each logged value averages the steps since the previous logged
one, every metrics.log_freq steps), tokens/s, TFLOP/s and MFU by the project's FLOP count
(titan_v4/model/flops.py, the number the trainer logs as its FLOPs per token), the peak memory the
trainer logged, and the final loss; the runs' logs are kept in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
from pathlib import Path

PEAK_FLOPS = 989e12  # H100 SXM bf16 dense (datasheet)
MEASURED_PEAK_FLOPS = 790e12  # a large bf16 GEMM measured on the lent H100s
VARIANTS = {
    "reference-eager": ({"TITAN_V4_REFERENCE_OPS": "1"}, ["--compile.no-enable"]),
    "reference-compiled": ({"TITAN_V4_REFERENCE_OPS": "1"}, ["--compile.enable"]),
    "kernels-eager": ({}, ["--compile.no-enable"]),
    "kernels-compiled": ({}, ["--compile.enable"]),
}
REPO = Path(__file__).resolve().parents[1]
_MEMORY = re.compile(r"memory:\s*([\d.]+)\s*GiB")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(name: str, config: str, steps: int, out: Path, extra: list[str]) -> dict:
    env_changes, args = VARIANTS[name]
    dump = out / name
    log_path = out / f"{name}.log"
    cmd = [str(REPO / "run_train.sh"), "--job.config_file", config, "--training.steps", str(steps),
           "--checkpoint.no-enable", "--metrics.disable_color_printing", "--job.dump_folder", str(dump), *args, *extra]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env_changes}, stdout=log, stderr=subprocess.STDOUT)
    text = _ANSI.sub("", log_path.read_text(errors="replace"))
    records = []
    metrics = dump / "logs" / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steady = [r["tps"] for r in records if r["step"] >= 3]
    memories = [float(m) for m in _MEMORY.findall(text)]
    nan = float("nan")
    return dict(
        name=name, rc=proc.returncode, tps=statistics.median(steady) if steady else nan,
        steps=len(steady), memory=max(memories) if memories else nan,
        # The peaks recorded on GPUs (titan_v4/train/metrics.py): allocated and reserved GiB.
        active=max((r.get("max_active_gib", nan) for r in records), default=nan),
        reserved=max((r.get("max_reserved_gib", nan) for r in records), default=nan),
        loss=records[-1]["loss"] if records else nan, tail=text.strip().splitlines()[-1:] if text else [],
    )  # fmt: skip


def config_counts(config: str) -> tuple[float, int]:
    """(FLOPs per token, tokens per step per rank) of the config: the trainer's count, computed here
    on the meta device."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    import torch

    import titan_v4  # noqa: F401
    from titan_v4.flavors import deepseek_v4_args
    from titan_v4.model.model import DeepSeekV4Model

    with open(REPO / config, "rb") as f:
        toml = tomllib.load(f)
    args = deepseek_v4_args[toml["model"]["flavor"]].replace(max_seq_len=toml["training"]["seq_len"])
    with torch.device("meta"):
        flops = args.get_nparams_and_flops(DeepSeekV4Model(args), args.max_seq_len)[1]
    return flops, toml["training"]["local_batch_size"] * toml["training"]["seq_len"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="train_configs/flash_proxy.toml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", required=True, help="folder for the runs' logs and dump folders")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("extra", nargs="*", help="further --section.field overrides for every run")
    opts = parser.parse_args()
    names = [v for v in opts.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; allowed: {list(VARIANTS)}")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    fpt, tokens_per_step = config_counts(opts.config)
    print(f"config {opts.config}, {opts.steps} steps; FLOPs per token (titan_v4/model/flops.py): {fpt / 1e9:.2f} GFLOP")
    rows = []
    for name in names:
        r = run(name, opts.config, opts.steps, out, opts.extra)
        print(f"{name}: exit {r['rc']}, {r['steps']} steady steps; {' '.join(r['tail'])[:300]}", flush=True)
        rows.append(r)
    print("\n| variant | step s | tokens/s | TFLOP/s | MFU (989) | of 790 | peak GiB | final loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tflops = r["tps"] * fpt / 1e12
        print(f"| {r['name']} | {tokens_per_step / r['tps']:.3f} | {r['tps']:,.0f} | {tflops:.1f} | {100 * tflops * 1e12 / PEAK_FLOPS:.1f}% "
              f"| {100 * tflops * 1e12 / MEASURED_PEAK_FLOPS:.1f}% | {r['memory']:.2f} | {r['loss']:.3f} |")  # fmt: skip
    print(f"(step s = {tokens_per_step} tokens per step / tokens/s)")


if __name__ == "__main__":
    main()
