"""Tests of v4::sinkhorn: an independent element-loop oracle, doubly stochastic output, gradients,
opcheck, compile and validation."""

import math

import pytest
import torch

import custom_ops
from tests.helpers.graph_capture import GraphCapture, count_calls
from tests.helpers.tolerances import assert_close


def loop_sinkhorn(matrix: list[list[float]], iters: int, eps: float) -> list[list[float]]:
    """Plain-Python Sinkhorn of one N x N matrix, in HF DeepseekV4HyperConnection's order."""
    n = len(matrix)
    c = []
    for row in matrix:
        top = max(row)
        exps = [math.exp(x - top) for x in row]
        c.append([e / sum(exps) + eps for e in exps])

    def normalise_columns(c):
        sums = [sum(c[i][j] for i in range(n)) + eps for j in range(n)]
        return [[c[i][j] / sums[j] for j in range(n)] for i in range(n)]

    def normalise_rows(c):
        return [[x / (sum(row) + eps) for x in row] for row in c]

    c = normalise_columns(c)
    for _ in range(iters - 1):
        c = normalise_columns(normalise_rows(c))
    return c


def scaling_sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """The same projection written as Sinkhorn's diagonal scalings, differentiable by autograd.

    Each normalisation multiplies by a diagonal matrix: rows ``diag(1 / (C 1 + eps)) @ C``, columns
    ``C @ diag(1 / (1^T C + eps))``; the start is ``exp(L) / rowsum(exp(L)) + eps``.
    """
    n = logits.shape[-1]
    ones = torch.ones(n, 1, dtype=logits.dtype)
    e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    c = torch.diag_embed(1 / (e @ ones).squeeze(-1)) @ e + eps

    def columns(c):
        return c @ torch.diag_embed(1 / ((ones.mT @ c).squeeze(-2) + eps))

    def rows(c):
        return torch.diag_embed(1 / ((c @ ones).squeeze(-1) + eps)) @ c

    c = columns(c)
    for _ in range(iters - 1):
        c = columns(rows(c))
    return c


def make_logits(shape, dtype, seed=0, spread=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (spread * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()


SHAPES = [
    pytest.param((4, 4), 1, 1e-6, id="N4-iters1"),
    pytest.param((3, 4, 4), 5, 1e-6, id="B3-N4-iters5"),
    pytest.param((2, 3, 4, 4), 20, 1e-6, id="B2x3-N4-iters20"),
    pytest.param((5, 1, 1), 3, 0.0, id="N1-eps0"),
    pytest.param((2, 6, 6), 7, 1e-3, id="N6-eps1e-3"),
]


@pytest.mark.parametrize("shape,iters,eps", SHAPES)
def test_matches_loop_oracle(shape, iters, eps):
    logits = make_logits(shape, torch.float64)
    out = custom_ops.sinkhorn(logits, iters, eps)
    n = shape[-1]
    flat = logits.detach().reshape(-1, n, n)
    expected = torch.tensor([loop_sinkhorn(m.tolist(), iters, eps) for m in flat], dtype=torch.float64)
    assert out.shape == logits.shape and out.dtype == torch.float64
    assert_close(out, expected.reshape(shape), torch.float64, "out", "sinkhorn")


@pytest.mark.parametrize("shape,iters,eps", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_gradient_matches_autograd(shape, iters, eps, dtype):
    logits = make_logits(shape, dtype)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    out = custom_ops.sinkhorn(logits, iters, eps)
    (dlogits,) = torch.autograd.grad(out, logits, grad)
    ref_logits = logits.detach().double().requires_grad_()
    ref = scaling_sinkhorn(ref_logits, iters, eps)
    (ref_dlogits,) = torch.autograd.grad(ref, ref_logits, grad.double())
    assert out.dtype == dtype and dlogits.dtype == dtype
    assert_close(out, ref, dtype, "out", "sinkhorn")
    assert_close(dlogits, ref_dlogits, dtype, "grad", "dlogits")


def test_doubly_stochastic():
    """Columns sum to 1 after every iteration (up to eps); rows converge with enough iterations."""
    logits = make_logits((64, 4, 4), torch.float64, spread=1.0).detach()
    out = custom_ops.sinkhorn(logits, 50, 1e-6)
    assert (out > 0).all()
    ones = torch.ones(64, 4, dtype=torch.float64)
    # eps in the denominators keeps the sums ~1e-6 short of 1.
    torch.testing.assert_close(out.sum(dim=-2), ones, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.sum(dim=-1), ones, rtol=0, atol=1e-5)


def test_hand_uniform():
    """Equal logits give the uniform matrix 1/N (eps = 0)."""
    out = custom_ops.sinkhorn(torch.zeros(3, 3, dtype=torch.float64), 4, 0.0)
    torch.testing.assert_close(out, torch.full((3, 3), 1 / 3, dtype=torch.float64), rtol=1e-15, atol=0)


def test_gradcheck():
    logits = make_logits((2, 3, 3), torch.float64, spread=1.0)
    assert torch.autograd.gradcheck(lambda x: custom_ops.sinkhorn(x, 6, 1e-4), [logits])


def test_non_contiguous_input():
    view = make_logits((3, 4, 4), torch.float32).detach().transpose(-1, -2)
    assert not view.is_contiguous()
    assert torch.equal(custom_ops.sinkhorn(view, 3, 1e-6), custom_ops.sinkhorn(view.contiguous(), 3, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck(dtype):
    logits = make_logits((2, 3, 4, 4), dtype)
    torch.library.opcheck(torch.ops.v4.sinkhorn.default, (logits, 5, 1e-6))
    grad = torch.randn(2, 3, 4, 4, dtype=dtype)
    torch.library.opcheck(torch.ops.v4.sinkhorn_bwd.default, (grad, logits.detach(), 5, 1e-6))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    logits = make_logits((2, 5, 4, 4), torch.float32)
    weight = torch.randn(2, 5, 4, 4)

    def loss_fn(x):
        return (custom_ops.sinkhorn(x * 2.0, 8, 1e-6) * weight).sum()

    backend = GraphCapture()
    loss_c = torch.compile(loss_fn, backend=backend, fullgraph=True)(logits)
    (grad_c,) = torch.autograd.grad(loss_c, logits)
    loss_e = loss_fn(logits)
    (grad_e,) = torch.autograd.grad(loss_e, logits)
    assert len(backend.dynamo_graphs) == 1
    assert count_calls(backend.fw_graphs, torch.ops.v4.sinkhorn.default) == 1
    assert count_calls(backend.bw_graphs, torch.ops.v4.sinkhorn_bwd.default) == 1
    assert_close(loss_c.detach(), loss_e.detach(), torch.float32, "out", "loss")
    assert_close(grad_c, grad_e, torch.float32, "grad", "dlogits")


BAD_INPUTS = [
    pytest.param(dict(logits=[[0.0]]), TypeError, "logits must be a torch.Tensor", id="logits-list"),
    pytest.param(dict(logits=torch.zeros(4)), ValueError, "logits must be", id="logits-1d"),
    pytest.param(dict(logits=torch.zeros(2, 3, 4)), ValueError, "logits must be", id="logits-not-square"),
    pytest.param(dict(logits=torch.zeros(4, 4, dtype=torch.bfloat16)), TypeError, "logits must be float32", id="bf16"),
    pytest.param(dict(logits=torch.zeros(4, 4, dtype=torch.int32)), TypeError, "logits must be float32", id="int"),
    pytest.param(dict(iters=0), ValueError, "iters must be >= 1, got 0", id="iters-0"),
    pytest.param(dict(iters=2.0), TypeError, "iters must be a Python int", id="iters-float"),
    pytest.param(dict(eps=-1e-6), ValueError, "eps must be finite and >= 0", id="eps-negative"),
    pytest.param(dict(eps=float("inf")), ValueError, "eps must be finite and >= 0", id="eps-inf"),
    pytest.param(dict(eps="1e-6"), TypeError, "eps must be a Python float", id="eps-str"),
]


@pytest.mark.parametrize("change,error,message", BAD_INPUTS)
def test_validation(change, error, message):
    args = {"logits": torch.zeros(4, 4), "iters": 3, "eps": 1e-6, **change}
    with pytest.raises(error, match=message):
        custom_ops.sinkhorn(**args)
