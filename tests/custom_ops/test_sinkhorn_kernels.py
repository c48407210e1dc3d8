"""Triton Sinkhorn kernels against the reference: compiled on CUDA, or under the Triton interpreter
(run by test_triton_interpreter.py in a child process). GPU tests at the training size."""

import pytest
import torch

import custom_ops
from custom_ops.sinkhorn import reference
from tests.helpers.triton_device import DEVICE, gpu, needs_triton_device
from tests.helpers.tolerances import assert_close

CASES = [
    pytest.param(37, 4, 20, 1e-6, id="T37-N4-iters20"),
    pytest.param(8, 4, 1, 1e-6, id="T8-N4-iters1"),
    pytest.param(5, 2, 3, 0.0, id="N2-eps0"),
    pytest.param(3, 8, 7, 1e-3, id="N8"),
    pytest.param(2, 1, 2, 1e-6, id="N1"),
]


@needs_triton_device
@pytest.mark.parametrize("tokens,n,iters,eps", CASES)
def test_kernels_match_reference(tokens, n, iters, eps):
    from custom_ops.sinkhorn.triton import sinkhorn_bwd, sinkhorn_fwd

    gen = torch.Generator().manual_seed(tokens * n)
    logits = (2 * torch.randn(tokens, n, n, generator=gen)).to(DEVICE)
    grad = torch.randn(tokens, n, n, generator=gen).to(DEVICE)
    out = sinkhorn_fwd(logits, iters, eps)
    dlogits = sinkhorn_bwd(grad, logits, iters, eps)
    assert_close(out, reference.sinkhorn_fwd(logits.double(), iters, eps), torch.float32, "out", "out")
    assert_close(dlogits, reference.sinkhorn_bwd(grad.double(), logits.double(), iters, eps), torch.float32, "grad", "dlogits")


@gpu
@pytest.mark.parametrize("iters", [1, 20])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_op_matches_reference_at_4096_tokens(iters, direction):
    logits = 3 * torch.randn(2, 2048, 4, 4, device="cuda")
    grad = torch.randn_like(logits)
    if direction == "fwd":
        got = custom_ops.sinkhorn(logits, iters, 1e-6)
        assert_close(got, reference.sinkhorn_fwd(logits.double(), iters, 1e-6), torch.float32, "out", "out")
    else:
        got = torch.ops.v4.sinkhorn_bwd(grad, logits, iters, 1e-6)
        expected = reference.sinkhorn_bwd(grad.double(), logits.double(), iters, 1e-6)
        assert_close(got, expected, torch.float32, "grad", "dlogits")
