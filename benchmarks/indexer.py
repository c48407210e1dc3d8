"""Benchmark of the indexer ops on one GPU: the Triton kernels (the ops' CUDA path) against the eager
reference, at the Flash and Pro shapes, S in {4096, 16384}.

    python -m benchmarks.indexer [--seq 4096 16384] [--out results.md]

Rows (B = 1, ratio 4, P = S / 4 entries, bf16 inputs):
* ``topk``: scoring + top-k selection (v4::indexer_topk);
* ``student-topk`` / ``student-dense``: the differentiable scores at the top-k / at every entry,
  forward + backward (v4::indexer_scores);
* ``teacher-topk`` / ``teacher-dense``: the KL target (v4::indexer_teacher).
The eager column is reference.py run on the GPU with the query chunk the indexer used before the
kernels (1024 queries: the ``[1024, heads, P]`` fp32 temporary). Times are the median of timed
repetitions after a warm-up call (the warm-up / first call, Triton compilation included, is printed
too); memory is the peak allocated during one call above what the inputs hold. FLOPs: 2 * D * H per
scored (query, entry) pair, the backward 2x the forward; pairs count the causally visible entries
(sum_t (t + 1) // 4) or the listed ones.
"""

import argparse

import torch

import custom_ops
from custom_ops.indexer import reference
from custom_ops.indexer.contract import ScoresInputs, TeacherInputs, TopkInputs

from benchmarks.timing import measure

# (indexer heads, indexer head dim, top-k, attention heads, attention head dim)
SHAPES = {"flash": (64, 128, 512, 64, 512), "pro": (64, 128, 1024, 128, 512)}
EAGER_CHUNK = 1024
RATIO = 4


def cases(flavor: str, seq_len: int):
    heads, dim, k, attn_heads, attn_dim = SHAPES[flavor]
    n_entries = seq_len // RATIO
    g = torch.Generator(device="cuda").manual_seed(0)
    randn = lambda *shape, dtype=torch.bfloat16: torch.randn(*shape, device="cuda", generator=g).to(dtype)  # noqa: E731
    q = randn(1, seq_len, heads, dim).requires_grad_()
    weights = randn(1, seq_len, heads, dtype=torch.float32).requires_grad_()
    keys = randn(1, n_entries, dim).requires_grad_()
    picks = custom_ops.indexer_topk(q, weights, keys, k=k, ratio=RATIO)
    attn_q, pool = randn(1, seq_len, attn_heads, attn_dim), randn(1, n_entries, attn_dim)
    lse = 4.0 + randn(1, seq_len, attn_heads, dtype=torch.float32)
    sink = randn(attn_heads, dtype=torch.float32)
    scale = attn_dim**-0.5
    visible = sum((t + 1) // RATIO for t in range(seq_len))
    listed = int((picks >= 0).sum())
    index_flop, teacher_flop = 2 * heads * dim, 2 * attn_heads * attn_dim

    def student(indices, eager):
        def run():
            if eager:
                inputs = ScoresInputs(q.detach(), weights.detach(), keys.detach(), indices, RATIO)
                out = reference.indexer_scores_fwd(inputs, chunk=EAGER_CHUNK)
                reference.indexer_scores_bwd(inputs, torch.ones_like(out), chunk=EAGER_CHUNK)
            else:
                out = custom_ops.indexer_scores(q, weights, keys, indices, ratio=RATIO)
                torch.autograd.grad(torch.where(torch.isfinite(out), out, 0.0).sum(), (q, weights, keys))

        return run

    def teacher(indices, eager):
        inputs = TeacherInputs(attn_q, pool, lse, sink, indices, scale, RATIO)
        if eager:
            return lambda: reference.indexer_teacher(inputs, chunk=EAGER_CHUNK)
        return lambda: custom_ops.indexer_teacher(*inputs[:5], scale=scale, ratio=RATIO)

    topk_inputs = TopkInputs(q.detach(), weights.detach(), keys.detach(), k, RATIO)
    yield "topk", index_flop * visible, (
        lambda: custom_ops.indexer_topk(*topk_inputs[:3], k=k, ratio=RATIO),
        lambda: reference.indexer_topk(topk_inputs, chunk=EAGER_CHUNK),
    )
    yield "student-topk", 3 * index_flop * listed, (student(picks, False), student(picks, True))
    yield "student-dense", 3 * index_flop * visible, (student(None, False), student(None, True))
    yield "teacher-topk", teacher_flop * (visible + listed), (teacher(picks, False), teacher(picks, True))
    yield "teacher-dense", teacher_flop * visible, (teacher(None, False), teacher(None, True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--flavors", nargs="+", default=list(SHAPES))
    parser.add_argument("--out", default="")
    opts = parser.parse_args()
    header = (
        "| flavor | S | op | GFLOP | triton ms | triton first-call ms | triton TFLOP/s | triton peak MiB "
        "| eager ms | eager peak MiB | speed-up |"
    )
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", "", header, "|" + "---|" * 11]
    print("\n".join(lines), flush=True)
    for flavor in opts.flavors:
        for seq_len in opts.seq:
            for name, flop, (fast, eager) in cases(flavor, seq_len):
                t = measure(fast, "cuda", warmup=1, reps=5, peak_memory=True)
                e = measure(eager, "cuda", warmup=1, reps=2, peak_memory=True)
                line = (
                    f"| {flavor} | {seq_len} | {name} | {flop / 1e9:.1f} | {t.median_ms:.2f} | {t.first_ms:.0f} | "
                    f"{flop / t.median_ms / 1e9:.0f} | {t.peak_mib:.0f} | {e.median_ms:.2f} | {e.peak_mib:.0f} | "
                    f"{e.median_ms / t.median_ms:.1f}x |"
                )
                lines.append(line)
                print(line, flush=True)
            torch.cuda.empty_cache()
    if opts.out:
        with open(opts.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
