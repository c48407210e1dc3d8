"""Tests of the mHC ops' specification (reference.py, the CPU implementation) through the public API:
an independent plain formulation with autograd, bit-for-bit equality with the model's fp32 op
sequence, fp64 gradcheck, opcheck, compile and validation. The Triton kernels are tested against the
reference in test_mhc_kernels.py."""

import pytest
import torch
import torch.nn.functional as F

import custom_ops
from tests.helpers.graph_capture import GraphCapture, count_calls
from tests.helpers.tolerances import assert_close

HC_EPS, NORM_EPS = 1e-6, 1e-6


def make_inputs(shape, dtype, seed=0, mixes=None, scales=3):
    """Streams ``x [*shape]`` and mixing weights with magnitudes like a trained model's (gates away
    from saturation, scales ~1 so that every path carries gradient)."""
    gen = torch.Generator().manual_seed(seed)
    hc, dim = shape[-2:]
    mixes = (2 + hc) * hc if mixes is None else mixes
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*size, std=1.0):
        return std * torch.randn(*size, generator=gen, dtype=torch.float64)

    x = randn(*shape).to(dtype).requires_grad_()
    fn = randn(mixes, hc * dim, std=0.5).to(wdtype).requires_grad_()
    base = randn(mixes).to(wdtype).requires_grad_()
    scale = (0.5 + randn(scales).abs()).to(wdtype).requires_grad_()
    return x, fn, base, scale


# ---------------------------------------------------------------------------------- independent oracle
def plain_sinkhorn(logits, iters, eps):
    """Row softmax, then alternate column / row normalisation, written with explicit loops over iterations."""
    c = torch.exp(logits - logits.amax(-1, keepdim=True))
    c = c / c.sum(-1, keepdim=True) + eps
    for it in range(iters):
        if it > 0:
            c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def plain_collapse(x, fn, base, scale, iters):
    """HyperConnection.collapse computed another way: raw dot products per stream slice, then the rms
    scale applied to the logits (the linear map commutes with it), sigmoid written out."""
    hc, dim = x.shape[-2:]
    mean_sq = sum((x[..., h, :] ** 2).sum(-1) for h in range(hc)) / (hc * dim)
    raw = sum(x[..., h, :] @ fn[:, h * dim : (h + 1) * dim].T for h in range(hc))  # [..., M]
    logits = raw / torch.sqrt(mean_sq + NORM_EPS).unsqueeze(-1)
    z = logits * torch.cat([scale[0].expand(hc), scale[1].expand(hc), scale[2].expand(hc * hc)]) + base
    pre = 1 / (1 + torch.exp(-z[..., :hc])) + HC_EPS
    post = 2 / (1 + torch.exp(-z[..., hc : 2 * hc]))
    comb = plain_sinkhorn(z[..., 2 * hc :].reshape(*z.shape[:-1], hc, hc), iters, HC_EPS)
    collapsed = sum(pre[..., h : h + 1] * x[..., h, :] for h in range(hc))
    return collapsed, post, comb


def plain_head(x, fn, base, scale):
    hc, dim = x.shape[-2:]
    flat = x.reshape(*x.shape[:-2], hc * dim)
    logits = (flat @ fn.T) / flat.pow(2).mean(-1, keepdim=True).add(NORM_EPS).sqrt()
    pre = torch.sigmoid(logits * scale + base) + HC_EPS
    return sum(pre[..., h : h + 1] * x[..., h, :] for h in range(hc))


def plain_expand(x, out, post, comb):
    """Stream k = post[k] * out + sum_j comb[j, k] * x[j], as an explicit double loop."""
    hc = x.shape[-2]
    streams = []
    for k in range(hc):
        stream = post[..., k : k + 1] * out
        for j in range(hc):
            stream = stream + comb[..., j, k : k + 1] * x[..., j, :]
        streams.append(stream)
    return torch.stack(streams, dim=-2)


def grads(outputs, inputs, seed=1):
    """Gradients of sum(output * random weight) over the outputs, w.r.t. inputs."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


SHAPES = [
    pytest.param((2, 3, 4, 8), 20, id="B2-S3-hc4-D8-iters20"),
    pytest.param((5, 4, 16), 3, id="T5-hc4-D16-iters3"),
    pytest.param((1, 2, 2, 6), 1, id="hc2-iters1"),
    pytest.param((3, 3, 5), 4, id="hc3"),
]


@pytest.mark.parametrize("shape,iters", SHAPES)
def test_collapse_matches_plain_formulation(shape, iters):
    inputs = make_inputs(shape, torch.float64)
    got = custom_ops.mhc_collapse(*inputs, hc_eps=HC_EPS, norm_eps=NORM_EPS, sinkhorn_iters=iters)
    expected = plain_collapse(*inputs, iters)
    for name, g, e in zip(("collapsed", "post", "comb"), got, expected):
        assert_close(g, e, torch.float64, "out", name)
    for name, g, e in zip(("dx", "dfn", "dbase", "dscale"), grads(got, inputs), grads(expected, inputs)):
        assert_close(g, e, torch.float64, "grad", name)


@pytest.mark.parametrize("shape,iters", SHAPES)
def test_head_matches_plain_formulation(shape, iters):
    hc = shape[-2]
    inputs = make_inputs(shape, torch.float64, mixes=hc, scales=1)
    got = custom_ops.hyper_head(*inputs, hc_eps=HC_EPS, norm_eps=NORM_EPS)
    expected = plain_head(*inputs)
    assert_close(got, expected, torch.float64, "out", "head")
    for name, g, e in zip(("dx", "dfn", "dbase", "dscale"), grads([got], inputs), grads([expected], inputs)):
        assert_close(g, e, torch.float64, "grad", name)


def make_expand_inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hc, gate_dtype = shape[-2], torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    out = torch.randn(shape[:-2] + shape[-1:], generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    post = (2 * torch.rand(shape[:-1], generator=gen, dtype=torch.float64)).to(gate_dtype).requires_grad_()
    comb = torch.rand(shape[:-1] + (hc,), generator=gen, dtype=torch.float64).to(gate_dtype).requires_grad_()
    return x, out, post, comb


@pytest.mark.parametrize("shape,iters", SHAPES)
def test_expand_matches_plain_formulation(shape, iters):
    inputs = make_expand_inputs(shape, torch.float64)
    got = custom_ops.mhc_expand(*inputs)
    expected = plain_expand(*inputs)
    assert_close(got, expected, torch.float64, "out", "new")
    for name, g, e in zip(("dx", "dout", "dpost", "dcomb"), grads([got], inputs), grads([expected], inputs)):
        assert_close(g, e, torch.float64, "grad", name)


def test_hand_checked_expand():
    """One token, 2 streams: new[k] = post[k] * out + sum_j comb[j, k] * x[j]."""
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    out = torch.tensor([[10.0, 20.0]])
    post = torch.tensor([[0.5, 2.0]])
    comb = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]])
    expected = torch.tensor([[[5.0 + 0.25 + 1.5, 10.0 + 0.5 + 2.0], [20.0 + 0.75 + 1.5, 40.0 + 1.5 + 2.0]]])
    assert torch.equal(custom_ops.mhc_expand(x, out, post, comb), expected)


def test_hand_checked_head():
    """fn = 0 gives the gates sigmoid(base) + eps whatever the streams: a weighted stream sum."""
    x = torch.tensor([[[1.0, -2.0], [4.0, 8.0]]])
    base = torch.tensor([0.0, 1e9])  # gates 0.5 and 1
    got = custom_ops.hyper_head(x, torch.zeros(2, 4), base, torch.ones(1), hc_eps=0.0, norm_eps=1e-6)
    assert torch.equal(got, torch.tensor([[0.5 * 1 + 4.0, 0.5 * -2 + 8.0]]))


# ---------------------------------------------------------------------------------- the model's math
def model_collapse(x, fn, base, scale, iters):
    """HyperConnection.collapse's op sequence (titan_v4/model at c11fb2f), fp32."""
    hc = x.shape[-2]
    flat = x.flatten(2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + NORM_EPS)
    pre, post, comb = F.linear(flat, fn).split((hc, hc, hc * hc), dim=-1)
    pre_base, post_base, comb_base = base.split((hc, hc, hc * hc))
    pre = torch.sigmoid(pre * scale[0] + pre_base) + HC_EPS
    post = 2 * torch.sigmoid(post * scale[1] + post_base)
    comb = custom_ops.sinkhorn(comb.unflatten(-1, (hc, hc)) * scale[2] + comb_base.view(hc, hc), iters, HC_EPS)
    return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype), post, comb


def test_fp32_forward_is_bit_for_bit_the_models_math():
    """The CPU model must not change when it switches to the ops: same fp32 op sequence, same bits."""
    x, fn, base, scale = (t.detach() for t in make_inputs((2, 5, 4, 32), torch.float32))
    got = custom_ops.mhc_collapse(x, fn, base, scale, hc_eps=HC_EPS, norm_eps=NORM_EPS, sinkhorn_iters=20)
    for g, e in zip(got, model_collapse(x, fn, base, scale, 20)):
        assert torch.equal(g, e)
    h = got[0]
    post, comb = got[1], got[2]
    expected = post.unsqueeze(-1) * h.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), x)
    assert torch.equal(custom_ops.mhc_expand(x, h, post, comb), expected)
    flat = x.flatten(2).float()
    flat = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + NORM_EPS)
    pre = torch.sigmoid(F.linear(flat, fn[:4]) * scale[:1] + base[:4]) + HC_EPS
    head = custom_ops.hyper_head(x, fn[:4], base[:4], scale[:1], hc_eps=HC_EPS, norm_eps=NORM_EPS)
    assert torch.equal(head, (pre.unsqueeze(-1) * x).sum(dim=2))


# ---------------------------------------------------------------------------------- dtypes
def test_bf16_streams_on_cpu():
    """bf16 streams: stream-shaped results in bf16, gates fp32, all computed in fp32 and rounded once."""
    x, fn, base, scale = make_inputs((2, 3, 4, 16), torch.bfloat16)
    collapsed, post, comb = custom_ops.mhc_collapse(x, fn, base, scale, hc_eps=HC_EPS, norm_eps=NORM_EPS, sinkhorn_iters=5)
    assert (collapsed.dtype, post.dtype, comb.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    exact = plain_collapse(x.detach().double(), fn.detach().double(), base.detach().double(), scale.detach().double(), 5)
    assert_close(collapsed, exact[0], torch.bfloat16, "out", "collapsed")
    assert_close(post, exact[1], torch.float32, "out", "post")
    new = custom_ops.mhc_expand(x, collapsed, post, comb)
    assert new.dtype == torch.bfloat16
    dx, dfn = torch.autograd.grad(new.float().sum(), (x, fn))
    assert dx.dtype == torch.bfloat16 and dfn.dtype == torch.float32


def test_autocast_output_is_cast_to_the_streams_dtype():
    """An autocast sub-layer returns bf16 over fp32 streams: expand casts it (gradient flows back in bf16)."""
    x, out, post, comb = make_expand_inputs((2, 4, 8), torch.float32)
    out_bf16 = out.detach().bfloat16().requires_grad_()
    new = custom_ops.mhc_expand(x, out_bf16, post, comb)
    assert new.dtype == torch.float32
    (dout,) = torch.autograd.grad(new.sum(), out_bf16)
    assert dout.dtype == torch.bfloat16
    assert torch.equal(new, custom_ops.mhc_expand(x, out_bf16.float(), post, comb))


def test_gradcheck_fp64():
    x, fn, base, scale = make_inputs((2, 2, 4, 3), torch.float64)

    def all_ops(x, fn, base, scale):
        collapsed, post, comb = custom_ops.mhc_collapse(x, fn, base, scale, hc_eps=1e-4, norm_eps=1e-6, sinkhorn_iters=4)
        new = custom_ops.mhc_expand(x, torch.tanh(collapsed), post, comb)
        head = custom_ops.hyper_head(new, fn[:4], base[:4], scale[:1], hc_eps=1e-4, norm_eps=1e-6)
        return collapsed, post, comb, new, head

    assert torch.autograd.gradcheck(all_ops, (x, fn, base, scale))


def test_non_contiguous_inputs():
    x, fn, base, scale = (t.detach() for t in make_inputs((3, 4, 6), torch.float32))
    view = x.transpose(0, 2).contiguous().transpose(0, 2)
    assert not view.is_contiguous()
    args = dict(hc_eps=HC_EPS, norm_eps=NORM_EPS, sinkhorn_iters=3)
    for g, e in zip(custom_ops.mhc_collapse(view, fn, base, scale, **args), custom_ops.mhc_collapse(x, fn, base, scale, **args)):
        assert torch.equal(g, e)


# ---------------------------------------------------------------------------------- opcheck / compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_opcheck(dtype):
    ops = torch.ops.v4
    x, fn, base, scale = make_inputs((2, 3, 4, 8), dtype)
    torch.library.opcheck(ops.mhc_collapse.default, (x, fn, base, scale, HC_EPS, NORM_EPS, 3))
    _, post, comb, logits, rstd = ops.mhc_collapse(x, fn, base, scale, HC_EPS, NORM_EPS, 3)
    gen = torch.Generator().manual_seed(2)
    dcollapsed = torch.randn(2, 3, 8, generator=gen).to(dtype)
    dpost, dcomb = torch.randn(post.shape, generator=gen).to(post.dtype), torch.randn(comb.shape, generator=gen).to(post.dtype)
    saved = [t.detach() for t in (x, fn, base, scale, logits, rstd)]
    torch.library.opcheck(ops.mhc_collapse_bwd.default, (dcollapsed, dpost, dcomb, *saved, HC_EPS, 3))

    hx, hfn, hbase, hscale = make_inputs((2, 3, 4, 8), dtype, mixes=4, scales=1)
    torch.library.opcheck(ops.mhc_head.default, (hx, hfn, hbase, hscale, HC_EPS, NORM_EPS))
    _, hlogits, hrstd = ops.mhc_head(hx, hfn, hbase, hscale, HC_EPS, NORM_EPS)
    hsaved = [t.detach() for t in (hx, hfn, hbase, hscale, hlogits, hrstd)]
    torch.library.opcheck(ops.mhc_head_bwd.default, (dcollapsed, *hsaved, HC_EPS))

    ex = make_expand_inputs((2, 3, 4, 8), dtype)
    torch.library.opcheck(ops.mhc_expand.default, ex)
    dnew = torch.randn(2, 3, 4, 8, generator=gen).to(dtype)
    torch.library.opcheck(ops.mhc_expand_bwd.default, (dnew, *(t.detach() for t in ex)))


def test_compile_fullgraph_matches_eager():
    """collapse -> stand-in sub-layer -> expand -> head under torch.compile(fullgraph=True): one node
    per op forward and backward, and the same loss and gradients as eager."""
    torch._dynamo.reset()
    x, fn, base, scale = make_inputs((2, 5, 4, 8), torch.float32)
    _, hfn, hbase, hscale = make_inputs((2, 5, 4, 8), torch.float32, seed=3, mixes=4, scales=1)
    weight = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))
    params = (x, fn, base, scale, hfn, hbase, hscale)

    def loss_fn(x, fn, base, scale, hfn, hbase, hscale):
        h, post, comb = custom_ops.mhc_collapse(x, fn, base, scale, hc_eps=HC_EPS, norm_eps=NORM_EPS, sinkhorn_iters=6)
        new = custom_ops.mhc_expand(x, torch.tanh(h), post, comb)
        return (custom_ops.hyper_head(new, hfn, hbase, hscale, hc_eps=HC_EPS, norm_eps=NORM_EPS) * weight).sum()

    backend = GraphCapture()
    loss_c = torch.compile(loss_fn, backend=backend, fullgraph=True)(*params)
    grads_c = torch.autograd.grad(loss_c, params)
    loss_e = loss_fn(*params)
    grads_e = torch.autograd.grad(loss_e, params)
    assert len(backend.dynamo_graphs) == 1
    for name in ("mhc_collapse", "mhc_expand", "mhc_head"):
        assert count_calls(backend.fw_graphs, getattr(torch.ops.v4, name).default) == 1, name
        assert count_calls(backend.bw_graphs, getattr(torch.ops.v4, name + "_bwd").default) == 1, name
    assert_close(loss_c.detach(), loss_e.detach(), torch.float32, "out", "loss")
    for g_c, g_e in zip(grads_c, grads_e):
        assert_close(g_c, g_e, torch.float32, "grad")


# ---------------------------------------------------------------------------------- validation
def _collapse_args(**change):
    x, fn, base, scale = (t.detach() for t in make_inputs((2, 4, 8), torch.float32))
    args = dict(x=x, fn=fn, base=base, scale=scale, hc_eps=HC_EPS, norm_eps=NORM_EPS, sinkhorn_iters=3)
    args.update(change)
    return args


BAD_COLLAPSE = [
    pytest.param(dict(x=[[0.0]]), TypeError, "x must be a torch.Tensor", id="x-list"),
    pytest.param(dict(x=torch.zeros(8)), ValueError, r"x must be \[\.\.\., H, D\]", id="x-1d"),
    pytest.param(dict(x=torch.zeros(2, 4, 8, dtype=torch.int32)), TypeError, "x must be bfloat16, float32 or float64", id="x-int"),
    pytest.param(dict(x=torch.zeros(2, 4, 8, dtype=torch.float16)), TypeError, "x must be bfloat16", id="x-fp16"),
    pytest.param(dict(fn=torch.zeros(24, 31)), ValueError, r"fn must have shape \(24, 32\)", id="fn-shape"),
    pytest.param(dict(fn=torch.zeros(24, 32, dtype=torch.bfloat16)), TypeError, "fn must be torch.float32", id="fn-bf16"),
    pytest.param(dict(fn=torch.zeros(24, 32, dtype=torch.float64)), TypeError, "fn must be torch.float32", id="fn-fp64-with-fp32-x"),
    pytest.param(dict(base=torch.zeros(23)), ValueError, r"base must have shape \(24,\)", id="base-shape"),
    pytest.param(dict(scale=torch.zeros(1)), ValueError, r"scale must have shape \(3,\)", id="scale-shape"),
    pytest.param(dict(scale=torch.zeros(3, device="meta")), ValueError, "scale is on meta but x is on cpu", id="scale-device"),
    pytest.param(dict(hc_eps=-1.0), ValueError, "hc_eps must be finite and >= 0", id="hc-eps-negative"),
    pytest.param(dict(norm_eps=0.0), ValueError, "norm_eps must be finite and > 0", id="norm-eps-zero"),
    pytest.param(dict(norm_eps="1e-6"), TypeError, "norm_eps must be a Python float", id="norm-eps-str"),
    pytest.param(dict(sinkhorn_iters=0), ValueError, "sinkhorn_iters must be >= 1, got 0", id="iters-0"),
    pytest.param(dict(sinkhorn_iters=2.0), TypeError, "sinkhorn_iters must be a Python int", id="iters-float"),
]


@pytest.mark.parametrize("change,error,message", BAD_COLLAPSE)
def test_collapse_validation(change, error, message):
    with pytest.raises(error, match=message):
        custom_ops.mhc_collapse(**_collapse_args(**change))


def test_head_validation():
    x = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match=r"fn must have shape \(4, 32\)"):
        custom_ops.hyper_head(x, torch.zeros(24, 32), torch.zeros(4), torch.ones(1), hc_eps=HC_EPS, norm_eps=NORM_EPS)
    with pytest.raises(ValueError, match=r"scale must have shape \(1,\)"):
        custom_ops.hyper_head(x, torch.zeros(4, 32), torch.zeros(4), torch.ones(3), hc_eps=HC_EPS, norm_eps=NORM_EPS)


BAD_EXPAND = [
    pytest.param(dict(out=torch.zeros(2, 7)), ValueError, r"out must be \[\.\.\., D\]", id="out-shape"),
    pytest.param(dict(out=torch.zeros(2, 8, dtype=torch.int64)), TypeError, "out must be a floating tensor", id="out-int"),
    pytest.param(dict(post=torch.zeros(2, 3)), ValueError, r"post must have shape \(2, 4\)", id="post-shape"),
    pytest.param(dict(comb=torch.zeros(2, 4, 4, dtype=torch.bfloat16)), TypeError, "comb must be torch.float32", id="comb-bf16"),
    pytest.param(dict(comb="comb"), TypeError, "comb must be a torch.Tensor", id="comb-str"),
]


@pytest.mark.parametrize("change,error,message", BAD_EXPAND)
def test_expand_validation(change, error, message):
    args = dict(x=torch.zeros(2, 4, 8), out=torch.zeros(2, 8), post=torch.zeros(2, 4), comb=torch.zeros(2, 4, 4))
    args.update(change)
    with pytest.raises(error, match=message):
        custom_ops.mhc_expand(**args)
