"""Every Triton kernel compiles for Hopper (sm_90) with the installed Triton, on a machine without a
GPU: the interpreter runs kernels as numpy and accepts code the compiler rejects (layouts, dot
shapes, dtypes), so this is the CPU check that the CUDA path builds. The configurations are the
launchers' choices at the Flash size (hc=4, D=4096, 20 Sinkhorn iterations)."""

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

from custom_ops.mhc.triton import collapse, expand  # noqa: E402
from custom_ops.sinkhorn.triton import kernels as sinkhorn  # noqa: E402

H, D, ITERS = 4, 4096, 20
F32, BF16 = "*fp32", "*bf16"


def _collapse_kernels(with_mix: bool):
    """(kernel, signature, constexprs, num_warps) of the collapse (with_mix) or head kernels."""
    mixes, m_pad = ((2 + H) * H, 32) if with_mix else (H, 16)
    gate = F32 if with_mix else "constexpr"  # the head passes None for post / comb
    gate_constexprs = {} if with_mix else dict(post_ptr=None, comb_ptr=None)
    dgate_constexprs = {} if with_mix else dict(dpost_ptr=None, dcomb_ptr=None)
    return [
        (collapse._mhc_collapse_fwd_dots_kernel,
         dict(x_ptr=BF16, fn_ptr=F32, dots_ptr=F32, sumsq_ptr=F32, n_tokens="i32"),
         dict(K=H * D, M=mixes, M_PAD=m_pad, BLOCK_T=64, BLOCK_K=128, SPLIT_K=4), 4),
        (collapse._mhc_collapse_fwd_kernel,
         dict(x_ptr=BF16, dots_ptr=F32, sumsq_ptr=F32, base_ptr=F32, scale_ptr=F32, out_ptr=BF16, post_ptr=gate,
              comb_ptr=gate, logits_ptr=F32, rstd_ptr=F32, n_tokens="i32", hc_eps="fp32", norm_eps="fp32"),
         dict(H=H, D=D, M=mixes, M_PAD=m_pad, SPLIT_K=4, ITERS=ITERS, WITH_MIX=with_mix, BLOCK_T=4, BLOCK_D=256,
              **gate_constexprs), 4),
        (collapse._mhc_collapse_bwd_gates_kernel,
         dict(dcollapsed_ptr=BF16, dpost_ptr=gate, dcomb_ptr=gate, x_ptr=BF16, base_ptr=F32, scale_ptr=F32,
              logits_ptr=F32, rstd_ptr=F32, dmix_ptr=F32, pre_ptr=F32, xcoef_ptr=F32, dbase_part_ptr=F32,
              dscale_part_ptr=F32, n_tokens="i32", hc_eps="fp32"),
         dict(H=H, D=D, M=mixes, ITERS=ITERS, WITH_MIX=with_mix, BLOCK_T=4, BLOCK_D=256, **dgate_constexprs), 4),
        (collapse._mhc_collapse_bwd_dx_kernel,
         dict(dcollapsed_ptr=BF16, x_ptr=BF16, fn_ptr=F32, dmix_ptr=F32, pre_ptr=F32, xcoef_ptr=F32, dx_ptr=BF16,
              dfn_ptr=F32, n_tokens="i32"),
         dict(H=H, D=D, M=mixes, M_PAD=m_pad, BLOCK_T=64, BLOCK_D=64), 4),
    ]


KERNELS = [
    (sinkhorn._sinkhorn_fwd_kernel, dict(logits_ptr=F32, out_ptr=F32, n_tokens="i32", eps="fp32"),
     dict(N=4, ITERS=ITERS, BLOCK_T=8), 1),
    (sinkhorn._sinkhorn_bwd_kernel, dict(grad_ptr=F32, logits_ptr=F32, dlogits_ptr=F32, n_tokens="i32", eps="fp32"),
     dict(N=4, ITERS=ITERS, BLOCK_T=8), 1),
    (expand._mhc_expand_fwd_kernel,
     dict(x_ptr=BF16, out_ptr=BF16, post_ptr=F32, comb_ptr=F32, new_ptr=BF16, n_tokens="i32"),
     dict(H=H, D=D, BLOCK_T=4, BLOCK_D=512), 4),
    (expand._mhc_expand_bwd_kernel,
     dict(dnew_ptr=BF16, x_ptr=BF16, out_ptr=BF16, post_ptr=F32, comb_ptr=F32, dx_ptr=BF16, dout_ptr=BF16,
          dpost_ptr=F32, dcomb_ptr=F32, n_tokens="i32"),
     dict(H=H, D=D, BLOCK_T=2, BLOCK_D=256), 4),
    *_collapse_kernels(with_mix=True),
    *_collapse_kernels(with_mix=False),
]


@pytest.mark.parametrize(
    "kernel,signature,constexprs,num_warps",
    [pytest.param(*k, id=f"{k[0].__name__}-{'head' if k[2].get('WITH_MIX') is False else 'main'}") for k in KERNELS],
)
def test_kernel_compiles_for_sm90(kernel, signature, constexprs, num_warps):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=3))
    assert compiled.asm["cubin"]
