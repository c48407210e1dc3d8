"""One training step of DeepSeek-V4: titan-v4 against HF transformers' DeepseekV4ForCausalLM.

The matched comparison: the same architecture (by default Flash widths on 4 layers SWA / CSA / HCA /
CSA, 16 routed experts top-6 + 1 shared, no MTP), the same random tokens, bf16 parameters, AdamW,
no activation checkpointing, B x S tokens per step, all variants in one process on one device:

    titan-v4 eager | titan-v4 per-block torch.compile | HF eager (grouped-GEMM experts) | HF torch.compile

A step is forward + cross-entropy + backward + AdamW step + zero_grad; the compiled variants also
compile the cross-entropy (the trainer's compile.components "loss"; HF's model is compiled without
its loss, since the logits are taken from it). Reported: the first step
(includes compilation), the median of the timed steps, tokens/s, TFLOP/s and MFU by the project's
FLOP rule (titan_v4/model/flops.py: 6 x touched parameters, attended query-key pairs only; the same
count for both models, since they are the same architecture), and peak memory.

    python -m benchmarks.step                       # the matched comparison on the GPU
    python -m benchmarks.step --variants titan-eager,titan-compiled
    python -m benchmarks.step --tiny --device cpu   # a seconds-long smoke run of the script itself
"""

from __future__ import annotations

import argparse
import gc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import titan_v4  # noqa: F401  (installs the CPU shim where there is no CUDA)
from titan_v4.flavors import deepseek_v4_args
from titan_v4.infra.parallelize import compile_blocks
from titan_v4.model.args import DeepSeekV4ModelArgs
from titan_v4.model.flops import count_params_and_flops
from titan_v4.checkpoint.hf_config import hf_config_from_args
from titan_v4.model.model import DeepSeekV4Model

from benchmarks.timing import measure

PEAK_FLOPS = 989e12  # H100 SXM bf16 dense (datasheet)
MEASURED_PEAK_FLOPS = 790e12  # a large bf16 GEMM measured on the lent H100s
VARIANTS = ("titan-eager", "titan-compiled", "hf-eager", "hf-compiled")


def matched_args(tiny: bool, seq_len: int) -> DeepSeekV4ModelArgs:
    if tiny:
        return deepseek_v4_args["debugmodel"].replace(mtp_depth=0, max_seq_len=seq_len)
    return deepseek_v4_args["flash_proxy"].replace(mtp_depth=0, max_seq_len=seq_len)


def hf_config(args: DeepSeekV4ModelArgs):
    """The transformers DeepseekV4Config of the same architecture (the adapter's HF config, the one the
    checkpoint tests prove equal to titan-v4), with HF's eager attention."""
    from transformers import DeepseekV4Config

    cfg = DeepseekV4Config(**hf_config_from_args(args), attn_implementation="eager")
    cfg._experts_implementation = "grouped_mm" if torch.cuda.is_available() else "eager"
    return cfg


def build(variant: str, args: DeepSeekV4ModelArgs, device: torch.device) -> torch.nn.Module:
    """The bf16 model of `variant` on `device`, compiled where the variant says so."""
    if variant.startswith("titan"):
        with torch.device(device):
            model = DeepSeekV4Model(args)
            model.init_weights()
        model = model.to(torch.bfloat16)
        if variant == "titan-compiled":
            compile_blocks(model, "inductor", fullgraph=True)  # the trainer's per-block compile
        return model.train()
    from transformers import DeepseekV4ForCausalLM

    model = DeepseekV4ForCausalLM(hf_config(args)).to(device=device, dtype=torch.bfloat16).train()
    return torch.compile(model) if variant == "hf-compiled" else model


def logits_of(variant: str, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens) if variant.startswith("titan") else model(input_ids=tokens).logits


def mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


@dataclass
class Result:
    variant: str
    first_step_s: float
    step_s: float
    peak_gib: float


def run_variant(variant: str, args: DeepSeekV4ModelArgs, batch: int, device: torch.device, warmup: int, steps: int) -> Result:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (batch, args.max_seq_len + 1), generator=gen).to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build(variant, args, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    cross_entropy = mean_cross_entropy
    if variant.endswith("compiled"):
        cross_entropy = torch.compile(mean_cross_entropy, dynamic=False)

    losses = []

    def step() -> None:
        logits = logits_of(variant, model, inputs)
        loss = cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())  # checked after the timing: reading it here would synchronise

    timing = measure(step, device, warmup=max(warmup, 1), reps=steps)
    if not torch.isfinite(torch.stack(losses)).all():
        raise RuntimeError(f"{variant}: non-finite loss, step by step {torch.stack(losses).tolist()}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, optimizer
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Result(variant, timing.first_ms / 1e3, timing.median_ms / 1e3, peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps, the first (compiling) one included")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--tiny", action="store_true", help="the debugmodel flavor: a smoke run of the script")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = parser.parse_args()
    variants = [v.strip() for v in opts.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")

    device = torch.device(opts.device)
    args = matched_args(opts.tiny, opts.seq_len)
    with torch.device("meta"):
        nparams, flops_per_token = count_params_and_flops(args, DeepSeekV4Model(args), opts.seq_len)
    tokens_per_step = opts.batch * opts.seq_len
    name = "debugmodel" if opts.tiny else "flash_proxy"
    print(f"model: {name} without MTP, {nparams:,} parameters, {args.n_layers} layers {args.attn_types}")
    print(f"shape: batch {opts.batch} x seq {opts.seq_len}, bf16 parameters, AdamW, no activation checkpointing")
    print(f"FLOPs per token (titan_v4/model/flops.py): {flops_per_token / 1e9:.3f} GFLOP; MFU against "
          f"{PEAK_FLOPS / 1e12:.0f} TFLOP/s and the measured {MEASURED_PEAK_FLOPS / 1e12:.0f}")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")

    rows = []
    for variant in variants:
        r = run_variant(variant, args, opts.batch, device, opts.warmup, opts.steps)
        tps = tokens_per_step / r.step_s
        tflops = tps * flops_per_token / 1e12
        rows.append((variant, f"{r.first_step_s:.1f}", f"{r.step_s:.3f}", f"{tps:,.0f}", f"{tflops:.1f}",
                     f"{100 * tflops * 1e12 / PEAK_FLOPS:.1f}%", f"{100 * tflops * 1e12 / MEASURED_PEAK_FLOPS:.1f}%",
                     f"{r.peak_gib:.1f}"))  # fmt: skip
        print(f"{variant}: done ({r.step_s:.3f} s/step)", flush=True)

    header = ("variant", "first step s", "step s", "tokens/s", "TFLOP/s", "MFU (989)", "of 790", "peak GiB")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print()
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    main()
