"""Tokens/s and peak memory of one GPU at growing sequence lengths: real `./run_train.sh` runs of
`train_configs/long_proxy.toml` (compiled blocks, full activation checkpointing, sparse attention
with the indexer trained) in this session, on this machine.

    python -m benchmarks.long_context --out DIR [--seq-lens 4096,16384,65536,131072] [--steps 6]

Each length runs as one sequence of one document (``--v4.no-document_masking``): the bundled corpus's
documents are a few hundred tokens long, and with masking on every query would see only its short
document, which is not what a long-context stage costs. ``--masked-row`` adds one run at the longest
length that fitted with document masking on (the corpus's real layout), for the cost of the masks.

Prints, per length, the median tokens/s over steps >= 3 (every step logged), the ratio to the first
length, TFLOP/s and MFU by the project's FLOP count at that length (titan_v4/model/flops.py: attended
pairs only, so the count grows with the HCA entries and the indexer's visible entries), and the peak
allocated / reserved memory the trainer recorded. A run that fails (e.g. out of memory) is reported
with its last log line and ends the sweep.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import train_ab
from benchmarks.train_ab import MEASURED_PEAK_FLOPS, PEAK_FLOPS

CONFIG = "train_configs/long_proxy.toml"


def flops_per_token(seq_len: int) -> float:
    """The trainer's FLOPs per token for long_proxy at this length (one document per sequence)."""
    import torch

    import titan_v4  # noqa: F401
    from titan_v4.flavors import deepseek_v4_args
    from titan_v4.model.model import DeepSeekV4Model

    args = deepseek_v4_args["long_proxy"].replace(max_seq_len=seq_len, indexer_phase="sparse")
    with torch.device("meta"):
        return args.get_nparams_and_flops(DeepSeekV4Model(args), seq_len)[1]


def run(seq_len: int, steps: int, out: Path, masked: bool) -> dict:
    """One compiled run of the config at ``seq_len`` (benchmarks/train_ab.py's run: its log and dump
    folder under ``out/<name>/``)."""
    name = f"seq{seq_len}" + ("-masked" if masked else "")
    extra = ["--training.seq_len", str(seq_len), "--metrics.log_freq", "1",
             "--v4.document_masking" if masked else "--v4.no-document_masking"]  # fmt: skip
    (out / name).mkdir(parents=True, exist_ok=True)
    return dict(train_ab.run("kernels-compiled", CONFIG, steps, out / name, extra), name=name, seq_len=seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the runs' logs and dump folders")
    parser.add_argument("--seq-lens", default="4096,16384,65536,131072")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--masked-row", action="store_true", help="one more run at the longest length, masking on")
    opts = parser.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seq_len in (int(s) for s in opts.seq_lens.split(",")):
        r = run(seq_len, opts.steps, out, masked=False)
        print(f"{r['name']}: exit {r['rc']}, {r['tps']:,.0f} tokens/s; {' '.join(r['tail'])[:300]}", flush=True)
        rows.append(r)
        if r["rc"] != 0:
            break
    fitted = [r for r in rows if r["rc"] == 0]
    if opts.masked_row and fitted:
        r = run(fitted[-1]["seq_len"], opts.steps, out, masked=True)
        print(f"{r['name']}: exit {r['rc']}, {r['tps']:,.0f} tokens/s; {' '.join(r['tail'])[:300]}", flush=True)
        rows.append(r)
    base = fitted[0]["tps"] if fitted else float("nan")
    print("\n| run | seq_len | tokens/s | vs first | GFLOP/token | TFLOP/s | MFU (989) | of 790 | peak allocated GiB | peak reserved GiB | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fpt = flops_per_token(r["seq_len"])
        tflops = r["tps"] * fpt / 1e12
        status = "" if r["rc"] == 0 else f" (exit {r['rc']})"
        print(f"| {r['name']}{status} | {r['seq_len']} | {r['tps']:,.0f} | {r['tps'] / base:.2f} | {fpt / 1e9:.2f} | {tflops:.1f} "
              f"| {100 * tflops * 1e12 / PEAK_FLOPS:.1f}% | {100 * tflops * 1e12 / MEASURED_PEAK_FLOPS:.1f}% "
              f"| {r['active']:.1f} | {r['reserved']:.1f} | {r['loss']:.3f} |")  # fmt: skip
    print("(GFLOP/token: titan_v4/model/flops.py for one document per sequence, indexer phase sparse; the masked row "
          "attends less than that count)")  # fmt: skip


if __name__ == "__main__":
    main()
