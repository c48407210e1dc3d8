"""The optimizer step of flash_proxy: Muon (titan_v4/train/muon.py) against torchtitan's AdamW.

The trainer's setting on one GPU: fp32 parameters and optimizer state, random gradients (an
optimizer's kernels take the same time whatever the gradients hold). Each optimizer is built, timed
(the median of --reps steps after 2 untimed ones) and freed before the next:

    AdamW, fused           torchtitan's default: torch.optim.AdamW(fused=True) over every parameter
    AdamW, foreach         the same with implementation "foreach"
    Muon + AdamW           what ``--optimizer.name Muon`` builds: MuonWithAdamW with titan_v4's
                           grouping (Muon for the matrices, fused AdamW for the rest)
    Muon, 2-D only         our Muon over the 2-D Muon matrices that hold one matrix each
    torch.optim.Muon       the peer, over the same 2-D matrices, 10 Newton-Schulz steps (its own
                           single coefficient tuple), update scaled to AdamW's RMS

FLOPs: a Newton-Schulz step on an n x m matrix (n <= m after transposing) is A = X X^T
(2 n^2 m), A A (2 n^3) and B X (2 n^2 m): 4 n^2 m + 2 n^3; the step counts each matrix (each expert,
each row block) with the configured number of steps. Bytes: AdamW reads and writes the parameter
and its two moments and reads the gradient, 28 bytes per fp32 parameter.

    python -m benchmarks.optimizer_step                     # flash_proxy on the GPU
    python -m benchmarks.optimizer_step --tiny --device cpu # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import gc

import torch
from torchtitan.config import Optimizer as OptimizerConfig

import titan_v4  # noqa: F401  (installs the CPU shim where there is no CUDA)
from titan_v4.config import V4
from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.model import DeepSeekV4Model
from titan_v4.train.muon import Muon, MuonWithAdamW, newton_schulz_flops
from titan_v4.train.optimizer import muon_param_groups, muon_row_blocks, muon_settings

from benchmarks.timing import measure

PEAK_FLOPS = 989e12  # H100 SXM bf16 dense (datasheet)
MEASURED_PEAK_FLOPS = 790e12  # a large bf16 GEMM on the H100 (docs/perf)
ADAMW_BYTES_PER_PARAM = 28


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="the debugmodel flavor: a smoke run of the script")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    flavor = "debugmodel" if opts.tiny else "flash_proxy"
    args = deepseek_v4_args[flavor]
    with torch.device(device):
        model = DeepSeekV4Model(args)
        model.init_weights()
    for p in model.parameters():
        p.grad = torch.randn_like(p).mul_(1e-3)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    config = OptimizerConfig(name="Muon", lr=2.7e-4, beta1=0.9, beta2=0.95, eps=1e-20, weight_decay=0.1,
                             implementation="fused" if device.type == "cuda" else "foreach")  # fmt: skip
    v4 = V4()
    settings = muon_settings(config, v4)
    steps = len(settings["ns_coefficients"])
    groups = muon_param_groups(model, config)
    blocks = muon_row_blocks(model)
    muon_params = [p for g in groups if g.get("algorithm", "muon") == "muon" for p in g["params"]]
    flat = [p for p in muon_params if p.dim() == 2 and p not in blocks]
    muon_flops = sum(newton_schulz_flops(p.shape, blocks.get(p), steps) for p in muon_params)
    flat_flops = sum(newton_schulz_flops(p.shape, None, steps) for p in flat)
    print(f"model: {flavor}, {n_params:,} parameters; Muon takes {sum(p.numel() for p in muon_params):,} in "
          f"{len(muon_params)} tensors ({len(flat)} of them plain 2-D: {sum(p.numel() for p in flat):,}); "
          f"Newton-Schulz {steps} steps")  # fmt: skip
    print(f"FLOPs per step: Muon + AdamW {muon_flops / 1e12:.3g} TFLOP, 2-D only {flat_flops / 1e12:.3g} TFLOP; "
          f"AdamW moves {ADAMW_BYTES_PER_PARAM * n_params / 1e9:.1f} GB")  # fmt: skip
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")

    variants = {
        "AdamW, fused (torchtitan's default)": (lambda: torch.optim.AdamW(
            params, lr=config.lr, betas=(0.9, 0.95), eps=config.eps, weight_decay=0.1, fused=device.type == "cuda"), 0),
        "AdamW, foreach": (lambda: torch.optim.AdamW(
            params, lr=config.lr, betas=(0.9, 0.95), eps=config.eps, weight_decay=0.1, foreach=True), 0),
        "Muon + AdamW (--optimizer.name Muon)": (lambda: MuonWithAdamW(groups, **settings), muon_flops),
        "Muon, 2-D only (ours)": (lambda: Muon(flat, **settings), flat_flops),
        "torch.optim.Muon, 2-D only, 10 steps": (lambda: torch.optim.Muon(
            flat, lr=config.lr, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=steps,
            adjust_lr_fn="match_rms_adamw"), flat_flops),
    }  # fmt: skip
    results = {}
    for name, (build, flops) in variants.items():
        optimizer = build()
        timing = measure(optimizer.step, device, warmup=2, reps=opts.reps, peak_memory=True)
        results[name] = (timing, flops)
        print(f"  {name}: {timing.median_ms:.1f} ms (first {timing.first_ms:.0f} ms)", flush=True)
        del optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    adamw_ms = results["AdamW, fused (torchtitan's default)"][0].median_ms
    print()
    print("| optimizer step | ms | / fused AdamW | Newton-Schulz TFLOP | TFLOP/s | MFU 989 / 790 | peak extra GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, (timing, flops) in results.items():
        ms = timing.median_ms
        rate = flops / (ms / 1e3) if flops else 0.0
        mfu = f"{100 * rate / PEAK_FLOPS:.0f} % / {100 * rate / MEASURED_PEAK_FLOPS:.0f} %" if flops else "-"
        print(f"| {name} | {ms:.1f} | {ms / adamw_ms:.2f}x | {flops / 1e12:.3g} | {rate / 1e12:.3g} | {mfu} | "
              f"{timing.peak_mib / 1024:.1f} |")  # fmt: skip
    floor_ms = 1e3 * muon_flops / PEAK_FLOPS
    print(f"\nNewton-Schulz alone at 989 TFLOP/s: {floor_ms:.0f} ms; at 790: {1e3 * muon_flops / MEASURED_PEAK_FLOPS:.0f} ms. "
          f"AdamW at {ADAMW_BYTES_PER_PARAM * n_params / 1e9 / (adamw_ms / 1e3):.0f} GB/s.")  # fmt: skip


if __name__ == "__main__":
    main()
