"""Benchmark of the v4::sparse_attention Triton kernels at DeepSeek-V4 shapes (one CUDA GPU).

    python -m benchmarks.sparse_attention [--quick] [--check] [--sweep] [--compile-ref]

Shapes: B=1, S=4096, D=512, window 128; Flash H=64 (CSA top-k 512), Pro H=128 (top-k 1024); CSA
ratio 4, HCA ratio 128; bf16. For SWA, CSA and HCA it times, with benchmarks.timing.kernel_median_ms
(triton.testing.do_bench: median ms, the L2 cache evicted before each call), the forward and
forward+backward of (a) the Triton kernels (backward in both dpool modes: atomic and deterministic),
(b) the eager reference, (c) with ``--compile-ref``, torch.compile of the reference (Inductor takes
minutes on these graphs, hence opt-in; a total compile budget stops it).

FLOPs (docs/design.md, "Counting FLOPs": attended query-key pairs only): forward = 4 * D * H * pairs, backward = 2.5x
forward, where pairs = window pairs (sum_t min(t + 1, window)) + pool pairs (HCA: sum_t min(P,
(t + 1) // ratio); CSA: the visible valid top-k entries). CSA indices are realistic: distinct, drawn
at random among the query's visible entries, -1 padded where fewer are visible.

``--check`` compares kernel and reference (fp32 on the same bf16 inputs) at the real shapes and
prints the errors; ``--sweep`` times a small grid of tiles per kernel and prints the best, to set the
heuristics in custom_ops/sparse_attention/triton/config.py. The first call of each kernel (compile) is
timed with a fresh Triton cache. ``--quick``: Flash shapes only, fewer repetitions.
"""

import argparse
import os
import tempfile
import time

# A fresh cache, so that the first calls below measure compiling, not loading an earlier compile.
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-cache-"))
import torch  # noqa: E402
import triton  # noqa: E402

from custom_ops.sparse_attention import reference  # noqa: E402
from custom_ops.sparse_attention.contract import Inputs, Outputs  # noqa: E402
from custom_ops.sparse_attention import triton as kernels  # noqa: E402
from custom_ops.sparse_attention.triton import bwd, config, fwd  # noqa: E402

from benchmarks.timing import Stopwatch, kernel_median_ms  # noqa: E402

SEQ, DIM, WINDOW = 4096, 512, 128
RATIO = {"swa": 1, "csa": 4, "hca": 128}
SHAPES = {"flash": dict(heads=64, topk=512), "pro": dict(heads=128, topk=1024)}


# ---------------------------------------------------------------------------------------------------
# Inputs and FLOPs
# ---------------------------------------------------------------------------------------------------


def realistic_topk(seq_len: int, k: int, n_pool: int, ratio: int, gen: torch.Generator) -> torch.Tensor:
    """``[1, S, k]`` int32: distinct entries drawn at random among each query's visible ones, -1 padded."""
    n_visible = (torch.arange(1, seq_len + 1) // ratio).clamp(max=n_pool)  # [S]
    keys = torch.rand(1, seq_len, n_pool, generator=gen)
    keys = keys.masked_fill(torch.arange(n_pool) >= n_visible[:, None], 2.0)  # invisible entries last
    idx = keys.topk(min(k, n_pool), dim=-1, largest=False).indices
    idx = torch.cat([idx, idx.new_full((1, seq_len, k - idx.shape[-1]), -1)], dim=-1)
    return idx.masked_fill(torch.arange(k) >= n_visible[:, None], -1).to(torch.int32)


def make_inputs(kind: str, heads: int, topk: int, seed: int = 0) -> dict:
    """Positional arguments of the launchers (bf16 on the GPU) plus the output gradient."""
    gen = torch.Generator().manual_seed(seed)
    ratio = RATIO[kind]
    n_pool = SEQ // ratio

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16).cuda()

    return dict(
        q=randn(1, SEQ, heads, DIM), kv=randn(1, SEQ, DIM), sink=torch.randn(heads, generator=gen).cuda(),
        pool=None if kind == "swa" else randn(1, n_pool, DIM),
        topk=realistic_topk(SEQ, topk, n_pool, ratio, gen).cuda() if kind == "csa" else None,
        doc_ids=None, window=WINDOW, scale=DIM**-0.5, ratio=ratio, grad_out=randn(1, SEQ, heads, DIM),
    )


def visible_pairs(inp: dict) -> int:
    """Query-key pairs the op attends (no documents here)."""
    t = torch.arange(SEQ)
    pairs = int(torch.clamp(t + 1, max=WINDOW).sum())
    if inp["pool"] is None:
        return pairs
    n_pool, ratio = inp["pool"].shape[1], inp["ratio"]
    n_complete = torch.clamp((t + 1) // ratio, max=n_pool)  # [S]
    if inp["topk"] is None:
        return pairs + int(n_complete.sum())
    idx = inp["topk"][0].cpu().long()
    return pairs + int(((idx >= 0) & (idx < n_complete[:, None])).sum())


def forward_flops(inp: dict) -> float:
    return 4.0 * DIM * inp["q"].shape[2] * visible_pairs(inp)


# ---------------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------------


def op_inputs(inp: dict) -> Inputs:
    """The op's inputs (everything of ``inp`` but the output gradient)."""
    return Inputs(**{k: v for k, v in inp.items() if k != "grad_out"})


def triton_fns(inp: dict, deterministic: bool):
    """(forward, forward+backward) closures of the kernels' launchers."""
    inputs = op_inputs(inp)
    heads = inp["q"].shape[2]
    dq_tiles, dkv_tiles = config.bwd_dq_tiles(heads, DIM, torch.bfloat16), config.bwd_dkv_tiles(heads, DIM, torch.bfloat16)

    def forward():
        return kernels.sparse_attention_fwd(inputs)

    def forward_backward():
        return bwd.bwd_with_tiles(inputs, inp["grad_out"], forward(), dq_tiles, dkv_tiles, deterministic)

    return forward, forward_backward


def reference_fns(inp: dict, fwd_fn=reference.sparse_attention_fwd, bwd_fn=reference.sparse_attention_bwd):
    inputs = op_inputs(inp)

    def forward():
        return fwd_fn(inputs)

    def forward_backward():
        return bwd_fn(inputs, inp["grad_out"], Outputs(*forward()))

    return forward, forward_backward


def compiled_reference_fns(inp: dict):
    """torch.compile of the reference, with 1024-query chunks so that Inductor sees 4 loop bodies, not 20."""

    def fwd_fn(inputs):
        return reference.sparse_attention_fwd(inputs, query_chunk=1024)

    def bwd_fn(inputs, grad_out, outputs):
        return reference.sparse_attention_bwd(inputs, grad_out, outputs, query_chunk=1024)

    return reference_fns(inp, torch.compile(fwd_fn, dynamic=False), torch.compile(bwd_fn, dynamic=False))


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------

COMPILE_SECONDS: dict[str, float] = {}  # kernel name -> seconds of its first compile(s)


def _watch_compiles() -> None:
    """Time every Triton compile through triton.knobs' jit hooks (kernel name -> seconds)."""
    started = {}

    def before(*, key, fn, **_):
        started[(fn.name, str(key))] = time.perf_counter()
        return False  # do compile

    def after(*, key, fn, **_):
        elapsed = time.perf_counter() - started.pop((fn.name, str(key)))
        COMPILE_SECONDS[fn.name] = COMPILE_SECONDS.get(fn.name, 0.0) + elapsed

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if not hasattr(runtime, "jit_post_compile_hook"):
        print("(this triton has no jit compile hooks: per-kernel compile times not measured)")
        return
    runtime.jit_cache_hook = before
    runtime.jit_post_compile_hook = after


def first_call_seconds(fn) -> float:
    with Stopwatch("cuda") as watch:
        fn()
    return watch.ms / 1e3


def bench_ms(fn, quick: bool) -> float:
    return kernel_median_ms(fn, warmup_ms=10 if quick else 25, rep_ms=40 if quick else 100)


def run_benchmarks(kinds, shapes, quick: bool, compile_ref: bool, compile_budget_s: float) -> None:
    rows = []
    compile_used = 0.0
    for shape in shapes:
        for kind in kinds:
            inp = make_inputs(kind, **SHAPES[shape])
            flops = forward_flops(inp)
            print(f"{shape} {kind}: {visible_pairs(inp):,} visible pairs, forward {flops / 1e9:.1f} GFLOP, "
                  f"backward {2.5 * flops / 1e9:.1f} GFLOP", flush=True)
            impls = {"triton": triton_fns(inp, deterministic=False), "triton-det": triton_fns(inp, deterministic=True)}
            impls["reference"] = reference_fns(inp)
            if compile_ref and compile_used < compile_budget_s:
                impls["ref-compiled"] = compiled_reference_fns(inp)
            for name, (forward, forward_backward) in impls.items():
                first = first_call_seconds(forward) + first_call_seconds(forward_backward)
                if name == "ref-compiled":
                    compile_used += first
                # triton-det runs the same forward as triton: time only its forward+backward.
                fwd_ms = bench_ms(forward, quick) if name != "triton-det" else float("nan")
                fb_ms = bench_ms(forward_backward, quick)
                rows.append((shape, kind, name, first, fwd_ms, flops / fwd_ms / 1e9, fb_ms, 3.5 * flops / fb_ms / 1e9))
                print(f"  {name:12s} first call {first:6.1f} s  fwd {fwd_ms:8.3f} ms  fwd+bwd {fb_ms:8.3f} ms", flush=True)
            del inp
            torch.cuda.empty_cache()
    if compile_ref and compile_used >= compile_budget_s:
        print(f"(torch.compile of the reference stopped after {compile_used:.0f} s of first calls)")

    print("\nFirst compile of each Triton kernel (fresh cache; all variants of a kernel summed):")
    for name, seconds in sorted(COMPILE_SECONDS.items()):
        print(f"  {name:45s} {seconds:6.1f} s")
    print("\n| shape | kind | impl | first call s | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, kind, name, first, fwd_ms, fwd_tf, fb_ms, fb_tf in rows:
        print(f"| {shape} | {kind} | {name} | {first:.1f} | {fwd_ms:.3f} | {fwd_tf:.1f} | {fb_ms:.3f} | {fb_tf:.1f} |")
    print("(triton-det: deterministic dpool mode, backward only differs; TFLOP/s: fwd 4*D*H*pairs, bwd 2.5x that)")


# ---------------------------------------------------------------------------------------------------
# Correctness at the real shapes
# ---------------------------------------------------------------------------------------------------


def run_check(kinds, shapes) -> None:
    """Kernel (bf16) vs reference (fp32 on the same bf16 inputs): max abs error and rel RMS error."""
    print("\n| shape | kind | output | max abs err | rel rms err | ref max abs |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        for kind in kinds:
            inp = make_inputs(kind, **SHAPES[shape])
            ref_inp = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inp.items()}
            out, lse = kernels.sparse_attention_fwd(op_inputs(inp))
            grads = kernels.sparse_attention_bwd(op_inputs(inp), inp["grad_out"], Outputs(out, lse))
            ref_out, ref_lse = reference.sparse_attention_fwd(op_inputs(ref_inp))
            ref_grads = reference.sparse_attention_bwd(op_inputs(ref_inp), ref_inp["grad_out"], Outputs(ref_out, ref_lse))
            names = ("out", "lse", "dq", "dkv", "dsink", "dpool")
            for name, got, want in zip(names, (out, lse, *grads), (ref_out, ref_lse, *ref_grads)):
                if want is None:
                    continue
                diff = got.double() - want.double()
                rel = (diff.norm() / want.double().norm()).item()
                print(f"| {shape} | {kind} | {name} | {diff.abs().max().item():.3e} | {rel:.3e} | {want.abs().max().item():.3e} |")
            del inp, ref_inp
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# Tile sweep
# ---------------------------------------------------------------------------------------------------

# (block_h, block_n, block_d, block_dv, num_warps, num_stages); block_d 512 = whole rows. Whole rows
# do not fit the backward kernels' shared memory at D = 512 (300+ KiB), so their grids chunk D.
FWD_GRID = [
    (64, 32, 512, 512, 8, 2), (64, 32, 512, 256, 8, 2), (64, 64, 512, 512, 8, 2), (64, 32, 512, 512, 8, 3),
    (64, 16, 512, 512, 8, 3), (64, 32, 64, 256, 8, 2), (64, 64, 64, 256, 8, 2), (64, 32, 128, 256, 8, 2),
    (128, 32, 512, 256, 8, 2),
]
DQ_GRID = [
    (64, 32, 64, 256, 8, 2), (64, 32, 64, 128, 8, 2), (64, 64, 64, 128, 8, 2), (64, 16, 64, 256, 8, 2),
    (64, 32, 128, 256, 8, 2), (64, 32, 64, 256, 8, 3), (64, 32, 64, 512, 8, 2), (128, 32, 64, 128, 8, 2),
]
DKV_GRID = [
    (64, 32, 64, 256, 8, 2), (64, 64, 64, 256, 8, 2), (64, 32, 64, 128, 4, 2), (64, 64, 64, 128, 8, 2),
    (64, 128, 64, 128, 8, 2), (64, 32, 128, 256, 8, 2), (64, 32, 64, 256, 8, 3), (128, 32, 64, 128, 8, 2),
]


def _sweep(label: str, grid, run) -> None:
    results = []
    for spec in grid:
        tiles = config.Tiles(*spec)
        try:
            first = first_call_seconds(lambda: run(tiles))
            ms = kernel_median_ms(lambda: run(tiles), warmup_ms=5, rep_ms=30)
            results.append((ms, spec))
            print(f"  {label} {spec}: {ms:.3f} ms (first call {first:.1f} s)", flush=True)
        except Exception as exc:  # a tile that does not fit (shared memory, registers) is reported, not fatal
            print(f"  {label} {spec}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
    if results:
        ms, spec = min(results)
        print(f"best {label}: {spec} at {ms:.3f} ms  (block_h, block_n, block_d, block_dv, num_warps, num_stages)")


def run_sweep(shapes) -> None:
    for shape in shapes:
        heads = SHAPES[shape]["heads"]
        csa = make_inputs("csa", **SHAPES[shape])
        swa = make_inputs("swa", **SHAPES[shape])
        csa_out = kernels.sparse_attention_fwd(op_inputs(csa))
        swa_out = kernels.sparse_attention_fwd(op_inputs(swa))
        dq_default = config.bwd_dq_tiles(heads, DIM, torch.bfloat16)
        dkv_default = config.bwd_dkv_tiles(heads, DIM, torch.bfloat16)
        print(f"\nsweep at {shape} (H={heads}); forward and dq on CSA, dkv on SWA, deterministic dpool on CSA")
        grid = [s for s in FWD_GRID if s[0] <= max(64, heads)]
        _sweep(f"{shape} fwd", grid, lambda t: fwd.fwd_with_tiles(op_inputs(csa), t))
        # The dq kernel's time = backward(dq tiles) - the rest, which stays at its default tiles.
        _sweep(f"{shape} bwd(dq)", [s for s in DQ_GRID if s[0] <= max(64, heads)], lambda t: bwd.bwd_with_tiles(
            op_inputs(csa), csa["grad_out"], csa_out, t, dkv_default, False))
        _sweep(f"{shape} bwd(dkv)", [s for s in DKV_GRID if s[0] <= max(64, heads)], lambda t: bwd.bwd_with_tiles(
            op_inputs(swa), swa["grad_out"], swa_out, dq_default, t, False))
        _sweep(f"{shape} bwd(det dpool)", [s for s in DKV_GRID if s[0] <= max(64, heads)], lambda t: bwd.bwd_with_tiles(
            op_inputs(csa), csa["grad_out"], csa_out, dq_default, t, True))
        del csa, swa
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Flash shapes only, fewer repetitions")
    parser.add_argument("--check", action="store_true", help="kernel vs fp32 reference errors at the real shapes")
    parser.add_argument("--sweep", action="store_true", help="time a grid of tiles per kernel (instead of the benchmark)")
    parser.add_argument("--compile-ref", action="store_true", help="also time torch.compile of the reference")
    parser.add_argument("--compile-budget", type=float, default=240.0, help="seconds of reference compiles")
    opts = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    shapes = ["flash"] if opts.quick else ["flash", "pro"]
    kinds = ["swa", "csa", "hca"]
    _watch_compiles()
    if opts.check:
        run_check(kinds, shapes)
    if opts.sweep:
        run_sweep(shapes)
    else:
        run_benchmarks(kinds, shapes, opts.quick, opts.compile_ref, opts.compile_budget)


if __name__ == "__main__":
    main()
