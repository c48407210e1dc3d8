"""Where a flash_proxy training step's milliseconds go, module by module.

The trainer's setting on one GPU: fp32 parameters, bf16 autocast, each block's parts compiled as
the trainer compiles blocks (torch.compile, fullgraph), no activation checkpointing, B x S tokens.
Each part is timed alone, forward + backward with a random output gradient, summed over the blocks
that have it (the 4 layers and the MTP block):

    attention   attention_norm + Attention (projections, compressor, indexer, sparse attention)
    mHC         HyperConnection collapse + expand, two per block
    MoE         ffn_norm + V4MoE (router, shared expert, routed experts, balance loss)
    heads       HyperHead + norm + output head + cross-entropy (LM and MTP), eager head as in the
                trainer; cross-entropy eager and compiled (compile.components "loss")
    optimizer   torchtitan's clipping (foreach norm, then foreach scale) and fused AdamW, on the
                gradients of a real step

Then one whole step as the trainer runs it (blocks compiled, compiled loss, clip, AdamW), so the
table ends with what the parts do not account for (embedding, MTP input projections, the launches
and copies between the parts). Also timed: AdamW's fused kernel with the clip factor passed as
its ``grad_scale`` (one pass over the gradients instead of the clip's scaling pass).

    python -m benchmarks.modules                      # flash_proxy, S = 4096, on the GPU
    python -m benchmarks.modules --tiny --device cpu  # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
import torchtitan.distributed.utils as dist_utils

import titan_v4  # noqa: F401  (installs the CPU shim where there is no CUDA)
from titan_v4.flavors import deepseek_v4_args
from titan_v4.train.clip import FoldedClipping
from titan_v4.infra.parallelize import compile_blocks
from titan_v4.model.flops import count_params_and_flops
from titan_v4.model.loss import V4Loss, cross_entropy_loss
from titan_v4.model.model import DeepSeekV4Model

from benchmarks.timing import measure

PEAK_FLOPS = 989e12  # H100 SXM bf16 dense (datasheet)


def attention_part(block, h, cos, sin):
    return block.attention(block.attention_norm(h), cos, sin)


def mhc_part(hc, x):
    """collapse then expand with the collapsed stream as the sublayer's output: the mHC ops alone."""
    h, post, comb = hc.collapse(x)
    return hc.expand(x, h, post, comb)


def moe_part(block, h, token_ids):
    return block.moe(block.ffn_norm(h), token_ids)


def head_part(model, hc_head, norm, h, labels, cross_entropy):
    return cross_entropy(model.output(norm(hc_head(h))), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="the debugmodel flavor: a smoke run of the script")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = parser.parse_args()
    device, S = torch.device(opts.device), opts.seq_len
    args = deepseek_v4_args["debugmodel" if opts.tiny else "flash_proxy"].replace(max_seq_len=S)
    torch._dynamo.config.capture_scalar_outputs = True  # the MoE's token counts (as the trainer sets)
    torch._dynamo.config.cache_size_limit = 64  # one graph per block kind and part
    with torch.device(device):
        model = DeepSeekV4Model(args)
        model.init_weights()
    nparams, flops_per_token = count_params_and_flops(args, model, S)
    print(f"model: {'debugmodel' if opts.tiny else 'flash_proxy'}, {nparams:,} parameters, layers {args.attn_types} "
          f"+ MTP depth {args.mtp_depth}; B=1 x S={S}; fp32 parameters, bf16 autocast, no activation checkpointing")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")

    def median_ms(fn, before=None) -> float:
        """The median of `opts.reps` calls after 2 untimed ones; before() runs untimed before each."""
        return measure(fn, device, warmup=2, reps=opts.reps, before=before).median_ms

    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (1, S + 1), generator=gen).to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    D, hc = args.dim, args.hc_mult

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16)

    def zero_grads():
        model.zero_grad(set_to_none=True)

    def fwd_bwd(fn, *tensors):
        leaves = [t.requires_grad_() if t.is_floating_point() else t for t in tensors]

        def run():
            with autocast:
                out = fn(*leaves)
            out.backward(torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out))

        return run

    compiled = {name: torch.compile(fn, fullgraph=True) for name, fn in
                (("attention", attention_part), ("mhc", mhc_part), ("moe", moe_part))}  # fmt: skip
    blocks = [*model.layers.values(), *model.mtp.values()]
    rows: list[tuple[str, float]] = []
    by_part = {"attention": 0.0, "mHC": 0.0, "MoE": 0.0}
    for block in blocks:
        cos, sin = model.rope_for(block.attn_type, S)
        where = f"block {block.layer_id} ({block.attn_type}{', MTP' if block in model.mtp.values() else ''})"
        ms = median_ms(fwd_bwd(lambda h: compiled["attention"](block, h, cos, sin), rand(1, S, D)), zero_grads)
        rows.append((f"attention, {where}", ms))
        by_part["attention"] += ms
        for hc_module in (block.hc_attn, block.hc_ffn):
            ms = median_ms(fwd_bwd(lambda x: compiled["mhc"](hc_module, x), rand(1, S, hc, D)), zero_grads)
            by_part["mHC"] += ms
        ms = median_ms(fwd_bwd(lambda h: compiled["moe"](block, h, inputs), rand(1, S, D)), zero_grads)
        rows.append((f"MoE, {where}", ms))
        by_part["MoE"] += ms
        print(f"timed {where}", flush=True)

    compiled_ce = torch.compile(cross_entropy_loss, dynamic=False)
    heads = [(model.hc_head, model.norm, labels)] + [(b.hc_head, b.norm, labels[:, :-1] if k else labels)
                                                    for k, b in enumerate(model.mtp.values(), 1)]  # fmt: skip
    head_ms = {}
    for name, ce in (("eager", cross_entropy_loss), ("compiled", compiled_ce)):
        head_ms[name] = 0.0
        for hc_head, norm, target in heads:
            fn = fwd_bwd(lambda h: head_part(model, hc_head, norm, h, target, ce), rand(1, target.shape[1], hc, D))
            head_ms[name] += median_ms(fn, zero_grads)
    print("timed the heads", flush=True)

    # The whole step as the trainer runs it, then the optimizer alone on that step's gradients.
    compile_blocks(model, "inductor", fullgraph=True)
    loss_fn = V4Loss(0.3, compile_backend="inductor")
    params = list(model.parameters())
    len_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=device.type == "cuda")

    def clip() -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)  # skips parameters without a gradient

    def whole_step():
        zero_grads()
        with autocast:
            loss = loss_fn(model(inputs), labels) / S
        loss.backward()
        clip()
        optimizer.step()

    step_ms = median_ms(whole_step)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    # The optimizer's kernels take the same time whatever the gradients hold, so the step's own
    # gradients are reused (the clip scales them in place; nothing here reads their values).
    grads = [p.grad for p in params if p.grad is not None]  # the frozen indexer has none
    clip_ms = median_ms(clip)
    norm_ms = median_ms(lambda: torch.nn.utils.get_total_norm(grads, foreach=True))
    adam_ms = median_ms(optimizer.step)

    # The trainer's folded clipping (titan_v4/train/clip.py), called as torchtitan's step calls it.
    folded = FoldedClipping(SimpleNamespace(optimizers=[optimizer]))

    def adam_with_clip_folded_in():
        with folded.during_step():
            dist_utils.clip_grad_norm_(params, 1.0, foreach=True)
            optimizer.step()

    fused_ms = median_ms(adam_with_clip_folded_in) if folded.applies else float("nan")  # fused AdamW: CUDA

    opt_ms = clip_ms + adam_ms
    parts_ms = sum(by_part.values()) + head_ms["compiled"] + opt_ms
    tokens_per_s = S / (step_ms / 1e3)
    print()
    print("| part | ms per step (forward + backward) | share of the step |")
    print("|---|---|---|")
    for name, ms in [*by_part.items(), ("heads: HyperHead + norm + output + cross-entropy (compiled CE)", head_ms["compiled"]),
                     ("optimizer: clip (norm + scale) + fused AdamW", opt_ms),
                     ("not in the parts (embedding, MTP input projections, glue)", step_ms - parts_ms)]:  # fmt: skip
        print(f"| {name} | {ms:.1f} | {100 * ms / step_ms:.0f} % |")
    print(f"| **whole step** | **{step_ms:.1f}** | {tokens_per_s:,.0f} tokens/s, "
          f"{100 * tokens_per_s * flops_per_token / PEAK_FLOPS:.1f} % MFU"
          + (f", peak {peak:.1f} GiB |" if device.type == "cuda" else " |"))
    print()
    print("| detail | ms |")
    print("|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")
    print(f"| heads with eager cross-entropy | {head_ms['eager']:.2f} |")
    print(f"| heads with compiled cross-entropy | {head_ms['compiled']:.2f} |")
    print(f"| clip: foreach norm + foreach scale | {clip_ms:.2f} |")
    print(f"| clip: the norm alone | {norm_ms:.2f} |")
    print(f"| fused AdamW | {adam_ms:.2f} |")
    print(f"| norm + fused AdamW with the clip factor as grad_scale | {fused_ms:.2f} |")
    print(f"FLOPs per token (titan_v4/model/flops.py): {flops_per_token / 1e9:.3f} GFLOP; "
          f"AdamW moves 28 B x {len_params / 1e9:.2f}e9 parameters = {28 * len_params / 1e9:.0f} GB per step")


if __name__ == "__main__":
    main()
