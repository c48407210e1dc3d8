"""Benchmark of the mHC ops on one GPU: Sinkhorn alone, and one hyper-connection (collapse + expand)
forward + backward at Flash width (D=4096, hc=4, bf16 streams), for eager PyTorch, torch.compile of
the same math and the fused v4:: ops, against the memory-traffic floor at the copy bandwidth measured
in the same run.

    python -m benchmarks.mhc [--check] [--tokens 4096 16384 65536]

--check first compares the ops with the reference (fp32 on the same GPU) at 4096 tokens and exits
non-zero on a mismatch. The table is printed last. About 3 minutes on one H100 (most of it Inductor
compiling the baseline).
"""

import argparse
import sys

import torch
import torch.nn.functional as F
import triton

import custom_ops
from custom_ops.mhc import reference as mhc_reference
from custom_ops.sinkhorn import reference as sinkhorn_reference

from benchmarks.timing import kernel_median_ms

HC, DIM, ITERS, HC_EPS, NORM_EPS = 4, 4096, 20, 1e-6, 1e-6
MIXES = (2 + HC) * HC


# ---------------------------------------------------------------------------------- baseline math
def baseline_collapse(x, fn, base, scale):
    """HyperConnection.collapse as the model wrote it before the ops (titan_v4 at c11fb2f)."""
    hc = x.shape[-2]
    flat = x.flatten(-2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + NORM_EPS)
    pre, post, comb = F.linear(flat, fn).split((hc, hc, hc * hc), dim=-1)
    pre_base, post_base, comb_base = base.split((hc, hc, hc * hc))
    pre = torch.sigmoid(pre * scale[0] + pre_base) + HC_EPS
    post = 2 * torch.sigmoid(post * scale[1] + post_base)
    # The Sinkhorn reference is plain differentiable torch, exactly the model's math before the ops.
    comb = sinkhorn_reference.sinkhorn_fwd(comb.unflatten(-1, (hc, hc)) * scale[2] + comb_base.view(hc, hc), ITERS, HC_EPS)
    return (pre.unsqueeze(-1) * x).sum(dim=-2).to(x.dtype), post, comb


def baseline_expand(x, out, post, comb):
    dtype = x.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), x)


def baseline_hc(x, fn, base, scale, out):
    collapsed, post, comb = baseline_collapse(x, fn, base, scale)
    return collapsed, baseline_expand(x, out, post, comb)


def ops_hc(x, fn, base, scale, out):
    collapsed, post, comb = custom_ops.mhc_collapse(x, fn, base, scale, hc_eps=HC_EPS, norm_eps=NORM_EPS, sinkhorn_iters=ITERS)
    return collapsed, custom_ops.mhc_expand(x, out, post, comb)


# ---------------------------------------------------------------------------------- inputs / timing
def hc_inputs(tokens, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, HC, DIM, device="cuda", generator=gen).bfloat16().requires_grad_()
    fn = (0.02 * torch.randn(MIXES, HC * DIM, device="cuda", generator=gen)).requires_grad_()
    base = torch.randn(MIXES, device="cuda", generator=gen).requires_grad_()
    scale = (0.5 + torch.rand(3, device="cuda", generator=gen)).requires_grad_()
    # The sub-layer output is a fixed leaf: expand gets its gradient, and collapse receives a given
    # dcollapsed as if from the sub-layer's backward, so only the hyper-connection's own work is timed.
    out = torch.randn(tokens, DIM, device="cuda", generator=gen).bfloat16().requires_grad_()
    dcollapsed = torch.randn(tokens, DIM, device="cuda", generator=gen).bfloat16()
    dnew = torch.randn(tokens, HC, DIM, device="cuda", generator=gen).bfloat16()
    return (x, fn, base, scale, out), (dcollapsed, dnew)


def fwd_bwd(step, leaves, grads):
    def run():
        collapsed, new = step(*leaves)
        torch.autograd.grad((collapsed, new), leaves, grads)

    return run


def bench_us(fn) -> float:
    """Median microseconds; the L2 cache is evicted before every call, so every run reads from HBM."""
    return 1e3 * kernel_median_ms(fn, warmup_ms=10, rep_ms=200)


def cuda_graphed(fn):
    """`fn` captured once in a CUDA graph; replaying it times the kernels without the Python and
    dispatcher cost of launching them (which a 7 us kernel does not hide)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compiles the kernels and warms the allocator outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    seconds = bench_us(lambda: dst.copy_(src)) * 1e-6
    return 2 * src.numel() * src.element_size() / seconds


def floor_bytes(tokens: int, backward: bool = True) -> int:
    """The memory-traffic floor of one hyper-connection (the issue's definition).

    Forward: read the streams x and the sub-layer output once, write the new streams once:
    ``T * (H * D + D + H * D) * 2`` bytes (bf16). Backward: about twice that (read dnew, x, out and
    dcollapsed, write dx and dout). Forward + backward = 3 x forward.
    """
    forward = tokens * (2 * HC * DIM + DIM) * 2
    return 3 * forward if backward else forward


def design_bytes(tokens: int) -> int:
    """What the fused ops move (docs/perf/mhc_kernels.md): collapse 2 passes over x forward and 2
    backward, expand 1 forward and 1 backward, plus autograd's dx_collapse + dx_expand."""
    s, o = HC * DIM * 2, DIM * 2  # bytes per token: streams, sub-layer-shaped
    forward = (s) + (s + o) + (s + o + s)  # collapse pass 1, pass 2, expand
    backward = (3 * s + 2 * o) + (s + o) + (2 * s + o) + 3 * s  # expand, collapse pass 3, pass 4, add
    return tokens * (forward + backward)


# ---------------------------------------------------------------------------------- check
def check() -> bool:
    """Ops against the reference in fp32 on this GPU at 4096 tokens; prints the errors."""
    leaves, (dcollapsed, dnew) = hc_inputs(4096, seed=1)

    def ref_hc(x, fn, base, scale, out):
        collapsed, post, comb, _, _ = mhc_reference.collapse_fwd(x, fn, base, scale, HC_EPS, NORM_EPS, ITERS)
        return collapsed, mhc_reference.expand_fwd(x, out, post, comb)

    def outputs_and_grads(step):
        collapsed, new = step(*leaves)
        return [collapsed, new, *torch.autograd.grad((collapsed, new), leaves, (dcollapsed, dnew))]

    names = ["collapsed", "new", "dx", "dfn", "dbase", "dscale", "dout"]
    ok = True
    print("check: v4:: ops vs the fp32 reference at 4096 tokens (rel_rms, max_rel; bound)")
    for name, got, ref in zip(names, outputs_and_grads(ops_hc), outputs_and_grads(ref_hc)):
        diff = (got.double() - ref.double())
        rel_rms = (diff.norm() / ref.double().norm()).item()
        max_rel = (diff.abs().max() / ref.double().abs().max()).item()
        bound = 2e-2 if got.dtype == torch.bfloat16 else 1e-4
        ok &= rel_rms <= bound and max_rel <= 2 * bound
        print(f"  {name:10s} {rel_rms:.2e} {max_rel:.2e}  <= {bound:.0e}  {'ok' if rel_rms <= bound and max_rel <= 2 * bound else 'FAIL'}")
    logits = 3 * torch.randn(4096, 4, 4, device="cuda")
    grad = torch.randn_like(logits)
    for name, got, ref in (
        ("sinkhorn", custom_ops.sinkhorn(logits, ITERS, HC_EPS), sinkhorn_reference.sinkhorn_fwd(logits.double(), ITERS, HC_EPS)),
        ("dsinkhorn", torch.ops.v4.sinkhorn_bwd(grad, logits, ITERS, HC_EPS), sinkhorn_reference.sinkhorn_bwd(grad.double(), logits.double(), ITERS, HC_EPS)),
    ):
        rel_rms = ((got.double() - ref).norm() / ref.norm()).item()
        ok &= rel_rms <= 1e-5
        print(f"  {name:10s} {rel_rms:.2e}  <= 1e-05  {'ok' if rel_rms <= 1e-5 else 'FAIL'}")
    return ok


# ---------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare the ops with the reference first")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks.mhc needs a CUDA device")
        return 1
    if args.check and not check():
        print("check FAILED")
        return 1

    bandwidth = copy_bandwidth()
    rows = []

    logits = 3 * torch.randn(4096, HC, HC, device="cuda")
    grad = torch.randn_like(logits)
    compiled_fwd = torch.compile(sinkhorn_reference.sinkhorn_fwd)
    compiled_bwd = torch.compile(sinkhorn_reference.sinkhorn_bwd)
    for name, fwd, bwd in (
        ("eager", lambda: sinkhorn_reference.sinkhorn_fwd(logits, ITERS, HC_EPS), lambda: sinkhorn_reference.sinkhorn_bwd(grad, logits, ITERS, HC_EPS)),
        ("compile", lambda: compiled_fwd(logits, ITERS, HC_EPS), lambda: compiled_bwd(grad, logits, ITERS, HC_EPS)),
        ("v4 ops", lambda: custom_ops.sinkhorn(logits, ITERS, HC_EPS), lambda: torch.ops.v4.sinkhorn_bwd(grad, logits, ITERS, HC_EPS)),
    ):
        rows.append(("sinkhorn [4096,4,4] fwd", name, bench_us(fwd), None))
        rows.append(("sinkhorn [4096,4,4] bwd", name, bench_us(bwd), None))
    fwd_graph = cuda_graphed(lambda: custom_ops.sinkhorn(logits, ITERS, HC_EPS))
    bwd_graph = cuda_graphed(lambda: torch.ops.v4.sinkhorn_bwd(grad, logits, ITERS, HC_EPS))
    rows.append(("sinkhorn [4096,4,4] fwd", "v4 ops, CUDA graph", bench_us(fwd_graph), None))
    rows.append(("sinkhorn [4096,4,4] bwd", "v4 ops, CUDA graph", bench_us(bwd_graph), None))

    compiled_hc = torch.compile(baseline_hc)
    for tokens in args.tokens:
        leaves, grads = hc_inputs(tokens)
        for name, step in (("eager", baseline_hc), ("compile", compiled_hc), ("v4 ops", ops_hc)):
            rows.append((f"hc fwd      T={tokens}", name, bench_us(lambda: step(*leaves)), floor_bytes(tokens, backward=False)))
            rows.append((f"hc fwd+bwd  T={tokens}", name, bench_us(fwd_bwd(step, leaves, grads)), floor_bytes(tokens)))
        del leaves, grads
        torch.cuda.empty_cache()

    print()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"copy bandwidth (1 GiB device-to-device, read + write): {bandwidth / 1e9:.0f} GB/s")
    print("memory-traffic floor of one hyper-connection (D=4096, hc=4, bf16 streams):")
    print("  forward  = T x (hc*D + D + hc*D) x 2 bytes  (read x and the sub-layer output once, write new once)")
    print("  fwd+bwd  = 3 x forward                      (the backward moves about twice the forward)")
    for tokens in args.tokens:
        print(f"  T={tokens:<6d} fwd+bwd floor {floor_bytes(tokens) / 1e9:.3f} GB = {floor_bytes(tokens) / bandwidth * 1e6:.0f} us at the copy bandwidth")
    print(f"  the v4 ops move {design_bytes(1) / floor_bytes(1):.2f} x the fwd+bwd floor by construction (docs/perf/mhc_kernels.md)")
    print("GB/s = floor bytes / time; x floor = time / (floor bytes / copy bandwidth)")
    print()
    print(f"{'case':26s} {'impl':18s} {'us':>10s} {'GB/s':>8s} {'x floor':>8s}")
    for case, name, us, floor in rows:
        if floor is None:
            print(f"{case:26s} {name:18s} {us:10.1f}")
        else:
            print(f"{case:26s} {name:18s} {us:10.1f} {floor / us / 1e3:8.0f} {us / (floor / bandwidth * 1e6):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
