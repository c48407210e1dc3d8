"""Triton mHC kernels against the reference, forward and every gradient: compiled on CUDA, or under
the Triton interpreter (run by test_triton_interpreter.py in a child process) at small sizes; GPU
tests through the ops at the Flash size (4096 tokens, D=4096, hc=4, bf16).

The reference runs in fp64 on the same bf16 inputs, so the errors measured are the kernels' own: bf16
rounding of the stream-shaped outputs, fp32 accumulation for the rest.
"""

import pytest
import torch

import custom_ops
from custom_ops.mhc import reference
from tests.helpers.triton_device import DEVICE, gpu, needs_triton_device
from tests.helpers.tolerances import assert_close

HC_EPS, NORM_EPS = 1e-6, 1e-6
BF16, FP32 = torch.bfloat16, torch.float32


def make_case(tokens, hc, dim, mixes, scales, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=gen)).to(device)

    x = randn(tokens, hc, dim).to(BF16)
    fn, base, scale = randn(mixes, hc * dim, std=2.0 / (hc * dim) ** 0.5), randn(mixes), 0.5 + randn(scales).abs()
    return x, fn, base, scale


def double(*tensors):
    return [t.double() for t in tensors]


# (tokens, hc, dim): tokens not a multiple of any block, dim not a multiple of a column block,
# one K chunk and several (split-K), one D block and several in every D loop and grid (D=600: 2 expand
# column blocks of 512, 3 loop steps of 256, 10 column blocks of 64), hc = 2 and 4.
SHAPES = [
    pytest.param(70, 4, 48, id="T70-hc4-D48"),
    pytest.param(5, 4, 64, id="T5-hc4-D64"),
    pytest.param(3, 4, 600, id="T3-hc4-D600"),
    pytest.param(3, 2, 16, id="T3-hc2-D16"),
]


@needs_triton_device
@pytest.mark.parametrize("tokens,hc,dim", SHAPES)
def test_collapse_kernels_match_reference(tokens, hc, dim):
    from custom_ops.mhc.triton import mhc_collapse_bwd, mhc_collapse_fwd

    iters = 20
    x, fn, base, scale = make_case(tokens, hc, dim, (2 + hc) * hc, 3)
    got = mhc_collapse_fwd(x, fn, base, scale, HC_EPS, NORM_EPS, iters)
    expected = reference.collapse_fwd(*double(x, fn, base, scale), HC_EPS, NORM_EPS, iters)
    kinds = ((BF16, "collapsed"), (FP32, "post"), (FP32, "comb"), (FP32, "logits"), (FP32, "rstd"))
    for (dtype, name), g, e in zip(kinds, got, expected):
        assert g.dtype == (BF16 if name == "collapsed" else FP32)
        assert_close(g, e, dtype, "out", name)

    gen = torch.Generator().manual_seed(1)
    dcollapsed = torch.randn(tokens, dim, generator=gen).to(DEVICE, BF16)
    dpost = torch.randn(tokens, hc, generator=gen).to(DEVICE)
    dcomb = torch.randn(tokens, hc, hc, generator=gen).to(DEVICE)
    logits, rstd = got[3], got[4]
    got = mhc_collapse_bwd(dcollapsed, dpost, dcomb, x, fn, base, scale, logits, rstd, HC_EPS, iters)
    expected = reference.collapse_bwd(*double(dcollapsed, dpost, dcomb, x, fn, base, scale, logits, rstd), HC_EPS, iters)
    for (dtype, name), g, e in zip(((BF16, "dx"), (FP32, "dfn"), (FP32, "dbase"), (FP32, "dscale")), got, expected):
        assert_close(g, e, dtype, "grad", name)


@needs_triton_device
@pytest.mark.parametrize("tokens,hc,dim", SHAPES)
def test_head_kernels_match_reference(tokens, hc, dim):
    from custom_ops.mhc.triton import mhc_head_bwd, mhc_head_fwd

    x, fn, base, scale = make_case(tokens, hc, dim, hc, 1)
    out, logits, rstd = mhc_head_fwd(x, fn, base, scale, HC_EPS, NORM_EPS)
    expected = reference.head_fwd(*double(x, fn, base, scale), HC_EPS, NORM_EPS)
    for (dtype, name), g, e in zip(((BF16, "out"), (FP32, "logits"), (FP32, "rstd")), (out, logits, rstd), expected):
        assert_close(g, e, dtype, "out", name)
    dout = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(1)).to(DEVICE, BF16)
    got = mhc_head_bwd(dout, x, fn, base, scale, logits, rstd, HC_EPS)
    expected = reference.head_bwd(*double(dout, x, fn, base, scale, logits, rstd), HC_EPS)
    for (dtype, name), g, e in zip(((BF16, "dx"), (FP32, "dfn"), (FP32, "dbase"), (FP32, "dscale")), got, expected):
        assert_close(g, e, dtype, "grad", name)


@needs_triton_device
@pytest.mark.parametrize("tokens,hc,dim", SHAPES)
def test_expand_kernels_match_reference(tokens, hc, dim):
    from custom_ops.mhc.triton import mhc_expand_bwd, mhc_expand_fwd

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, hc, dim, generator=gen).to(DEVICE, BF16)
    out = torch.randn(tokens, dim, generator=gen).to(DEVICE, BF16)
    post = (2 * torch.rand(tokens, hc, generator=gen)).to(DEVICE)
    comb = torch.rand(tokens, hc, hc, generator=gen).to(DEVICE)
    dnew = torch.randn(tokens, hc, dim, generator=gen).to(DEVICE, BF16)
    new = mhc_expand_fwd(x, out, post, comb)
    assert new.dtype == BF16
    assert_close(new, reference.expand_fwd(*double(x, out, post, comb)), BF16, "out", "new")
    got = mhc_expand_bwd(dnew, x, out, post, comb)
    expected = reference.expand_bwd(*double(dnew, x, out, post, comb))
    for (dtype, name), g, e in zip(((BF16, "dx"), (BF16, "dout"), (FP32, "dpost"), (FP32, "dcomb")), got, expected):
        assert_close(g, e, dtype, "grad", name)


# ---------------------------------------------------------------------------------- GPU, real size
FLASH = dict(tokens=4096, hc=4, dim=4096)


def _output_grads(outputs, seed=5):
    """Random gradients for the outputs, in the outputs' dtypes (a bf16 output receives a bf16 gradient)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, device="cuda").to(o.dtype) for o in outputs]


def _grads(fn, inputs, output_grads):
    """Outputs of fn and the gradients w.r.t. inputs for the given output gradients (cast exactly to
    the outputs' dtypes, so an fp64 reference sees the same incoming values as the bf16 ops)."""
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return outputs, torch.autograd.grad(outputs, inputs, [g.to(o.dtype) for g, o in zip(output_grads, outputs)])


def _fp64_leaves(leaves):
    return [t.detach().double().requires_grad_() for t in leaves]


@gpu
def test_hyper_connection_ops_at_flash_size():
    """collapse + expand through the public ops (Triton) against the fp64 reference on the same inputs.
    The sub-layer output is an independent leaf, so both paths see the same gradients."""
    x, fn, base, scale = make_case(FLASH["tokens"], FLASH["hc"], FLASH["dim"], 24, 3, device="cuda")
    x = x.reshape(2, 2048, FLASH["hc"], FLASH["dim"])
    out = torch.randn(2, 2048, FLASH["dim"], device="cuda").to(BF16)
    leaves = [t.requires_grad_() for t in (x, fn, base, scale, out)]

    def ops(x, fn, base, scale, out):
        collapsed, post, comb = custom_ops.mhc_collapse(x, fn, base, scale, hc_eps=HC_EPS, norm_eps=NORM_EPS, sinkhorn_iters=20)
        return collapsed, post, comb, custom_ops.mhc_expand(x, out, post, comb)

    def ref(x, fn, base, scale, out):
        collapsed, post, comb, _, _ = reference.collapse_fwd(x, fn, base, scale, HC_EPS, NORM_EPS, 20)
        return collapsed, post, comb, reference.expand_fwd(x, out, post, comb)

    output_grads = _output_grads(ops(*leaves))
    outputs, grads = _grads(ops, leaves, output_grads)
    expected_outputs, expected_grads = _grads(ref, _fp64_leaves(leaves), output_grads)
    # post / comb come from 16384-long fp32 dot products and dfn sums over 4096 tokens: the fp32
    # bounds of whole-model comparisons (small-shape fp32 bounds assume short reductions); dbase /
    # dscale are sums over every token with heavy cancellation, likewise.
    kinds_out = (("collapsed", BF16, "out"), ("post", FP32, "model_out"), ("comb", FP32, "model_out"), ("new", BF16, "out"))
    for (name, dtype, kind), g, e in zip(kinds_out, outputs, expected_outputs):
        assert_close(g, e, dtype, kind, name)
    kinds = (("dx", BF16, "grad"), ("dfn", FP32, "model_grad"), ("dbase", FP32, "model_grad"), ("dscale", FP32, "model_grad"),
             ("dout", BF16, "grad"))
    for (name, dtype, kind), g, e in zip(kinds, grads, expected_grads):
        assert_close(g, e, dtype, kind, name)


@gpu
def test_hyper_head_op_at_flash_size():
    x, fn, base, scale = make_case(FLASH["tokens"], FLASH["hc"], FLASH["dim"], 4, 1, device="cuda")
    leaves = [t.requires_grad_() for t in (x, fn, base, scale)]
    output_grads = _output_grads([x[:, 0, :]])
    out, grads = _grads(lambda *a: custom_ops.hyper_head(*a, hc_eps=HC_EPS, norm_eps=NORM_EPS), leaves, output_grads)
    expected, expected_grads = _grads(lambda *a: reference.head_fwd(*a, HC_EPS, NORM_EPS)[0], _fp64_leaves(leaves), output_grads)
    assert_close(out[0], expected[0], BF16, "out", "out")
    kinds = (("dx", BF16, "grad"), ("dfn", FP32, "model_grad"), ("dbase", FP32, "model_grad"), ("dscale", FP32, "model_grad"))
    for (name, dtype, kind), g, e in zip(kinds, grads, expected_grads):
        assert_close(g, e, dtype, kind, name)


@gpu
def test_compiled_ops_match_eager_on_gpu():
    """torch.compile(fullgraph=True) with Inductor calls the same kernels: bitwise eager's results.
    (The collapsed output is fed straight to expand: an Inductor-generated op in between could round
    differently from ATen's.)"""
    torch._dynamo.reset()
    x, fn, base, scale = make_case(512, 4, 1024, 24, 3, device="cuda")
    leaves = [t.requires_grad_() for t in (x, fn, base, scale)]

    def step(x, fn, base, scale):
        collapsed, post, comb = custom_ops.mhc_collapse(x, fn, base, scale, hc_eps=HC_EPS, norm_eps=NORM_EPS, sinkhorn_iters=20)
        return custom_ops.mhc_expand(x, collapsed, post, comb)

    output_grads = _output_grads([x])
    eager, eager_grads = _grads(step, leaves, output_grads)
    compiled, compiled_grads = _grads(torch.compile(step, fullgraph=True), leaves, output_grads)
    assert torch.equal(compiled[0], eager[0])
    for g_c, g_e in zip(compiled_grads, eager_grads):
        assert torch.equal(g_c, g_e)


@gpu
def test_collapse_backward_is_deterministic():
    x, fn, base, scale = make_case(FLASH["tokens"], FLASH["hc"], FLASH["dim"], 24, 3, device="cuda")
    leaves = [t.requires_grad_() for t in (x, fn, base, scale)]

    def collapse(*a):
        return custom_ops.mhc_collapse(*a, hc_eps=HC_EPS, norm_eps=NORM_EPS, sinkhorn_iters=20)

    output_grads = _output_grads(collapse(*leaves))
    _, first = _grads(collapse, leaves, output_grads)
    _, second = _grads(collapse, leaves, output_grads)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
