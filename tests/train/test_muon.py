"""Muon (titan_v4/train/muon.py) against an independent fp64 reference written from the paper's
formulas: a plain loop over every matrix, nothing shared with the implementation."""

import copy
import math

import pytest
import torch

from titan_v4.train.muon import DEFAULT_NS_COEFFICIENTS, Muon, MuonWithAdamW, newton_schulz

PAPER_STEPS = [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2


def reference_orthogonalise(M: torch.Tensor, steps=PAPER_STEPS, eps=1e-7) -> torch.Tensor:
    """One 2-D matrix, fp64: X0 = M / (||M||_F + eps), X = a X + (b A + c A A) X with A = X X^T, on
    the transposed matrix when it is tall."""
    X = M.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (math.sqrt(float((X * X).sum())) + eps)
    for a, b, c in steps:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def reference_muon(W0, grads, lr, wd, mu, nesterov=True, rms=0.18, row_blocks=None):
    """The paper's Muon on one parameter ``[..., n, m]``, every matrix (and row block) on its own."""
    W = W0.double().clone()
    M = torch.zeros_like(W)
    for G in grads:
        G = G.double()
        M = mu * M + G
        U = mu * M + G if nesterov else M
        update = torch.zeros_like(W).reshape(-1, *W.shape[-2:])
        for k, matrix in enumerate(U.reshape(-1, *W.shape[-2:])):
            start = 0
            for rows in row_blocks or [matrix.shape[0]]:
                block = matrix[start:start + rows]
                O = reference_orthogonalise(block)
                update[k, start:start + rows] = O * math.sqrt(max(block.shape)) * rms
                start += rows
        W = W * (1 - lr * wd) - lr * update.reshape(W.shape)
    return W


def run_muon(W0, grads, **options):
    p = torch.nn.Parameter(W0.clone())
    opt = Muon([p], **options)
    for G in grads:
        p.grad = G.to(p.dtype)
        opt.step()
    return p.detach(), opt


SHAPES = [(16, 48), (48, 16), (3, 16, 24), (2, 2, 20, 12)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_fp64_reference(shape, nesterov):
    # fp64 parameters make the implementation's matmuls fp64: the comparison is exact up to rounding.
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]
    W, _ = run_muon(W0, grads, lr=0.05, weight_decay=0.1, momentum=0.95, nesterov=nesterov)
    expected = reference_muon(W0, grads, lr=0.05, wd=0.1, mu=0.95, nesterov=nesterov)
    assert W.dtype == torch.float64
    torch.testing.assert_close(W, expected, rtol=0, atol=1e-11)
    assert not torch.allclose(W, W0, atol=1e-3)  # the steps moved it


def test_row_blocks_are_separate_matrices():
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(2, 24, 40, generator=g, dtype=torch.float64)
    grads = [torch.randn(2, 24, 40, generator=g, dtype=torch.float64) for _ in range(3)]
    p = torch.nn.Parameter(W0.clone())
    opt = Muon([{"params": [p], "row_blocks": (4, 4, 16)}], lr=0.02)
    for G in grads:
        p.grad = G
        opt.step()
    expected = reference_muon(W0, grads, lr=0.02, wd=0.1, mu=0.95, row_blocks=(4, 4, 16))
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-11)
    whole = reference_muon(W0, grads, lr=0.02, wd=0.1, mu=0.95)
    assert (p.detach() - whole).abs().max() > 1e-3  # blocks differ from one 24-row matrix


@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (4, 32, 32)], ids=str)
def test_bf16_matmuls_close_to_reference(shape):
    g = torch.Generator().manual_seed(2)
    W0 = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) for _ in range(3)]
    lr = 0.05
    W, _ = run_muon(W0, grads, lr=lr, weight_decay=0.1)
    expected = reference_muon(W0, grads, lr=lr, wd=0.1, mu=0.95)
    decayed = W0.double() * (1 - lr * 0.1) ** 3
    # Relative error of the accumulated update: bf16 has 8 significant bits (~0.4% per rounding);
    # measured ~1e-2 here.
    error = ((W.double() - expected).norm() / (expected - decayed).norm()).item()
    assert error < 3e-2, error


def test_singular_values_of_the_hybrid_schedule():
    g = torch.Generator().manual_seed(3)
    for shape in [(64, 128), (128, 64), (256, 256), (8, 128)]:
        M = torch.randn(shape, generator=g)
        # Measured on these: the 8 fast steps leave singular values in ~[0.67, 1.15] (the quintic's
        # oscillation band); the 2 cleanup steps bring them within ~0.7% of 1 with bf16 matmuls and
        # within 6e-4 in fp64 (the cleanup polynomial's residual from the band's edges).
        s8 = torch.linalg.svdvals(newton_schulz(M, DEFAULT_NS_COEFFICIENTS[:8]).double())
        assert 0.6 < s8.min() and s8.max() < 1.2, (shape, s8.min(), s8.max())
        assert s8.max() - s8.min() > 0.05  # not yet at 1: the cleanup steps have work to do
        s10 = torch.linalg.svdvals(newton_schulz(M, DEFAULT_NS_COEFFICIENTS).double())
        assert (s10 - 1).abs().max() < 1.5e-2, (shape, s10.min(), s10.max())
        s64 = torch.linalg.svdvals(newton_schulz(M.double(), DEFAULT_NS_COEFFICIENTS))
        assert (s64 - 1).abs().max() < 1e-3, (shape, s64.min(), s64.max())


def test_newton_schulz_matches_reference_and_dtypes():
    g = torch.Generator().manual_seed(4)
    M = torch.randn(3, 20, 12, generator=g, dtype=torch.float64)
    out = newton_schulz(M, DEFAULT_NS_COEFFICIENTS)
    assert out.shape == M.shape and out.dtype == torch.float64
    for k in range(3):
        torch.testing.assert_close(out[k], reference_orthogonalise(M[k]), rtol=0, atol=1e-12)
    for dtype in (torch.float32, torch.bfloat16):
        assert newton_schulz(M.to(dtype), DEFAULT_NS_COEFFICIENTS).dtype == torch.bfloat16
    # scale multiplies the result (folded into the last step)
    torch.testing.assert_close(newton_schulz(M, DEFAULT_NS_COEFFICIENTS, scale=2.5), 2.5 * out, rtol=0, atol=1e-12)


def test_stacked_experts_equal_separate_matrices():
    g = torch.Generator().manual_seed(5)
    E = 4
    W0 = torch.randn(E, 24, 16, generator=g)
    grads = [torch.randn(E, 24, 16, generator=g) for _ in range(3)]
    stacked, _ = run_muon(W0, grads, lr=0.03)
    for e in range(E):
        alone, _ = run_muon(W0[e], [G[e] for G in grads], lr=0.03)
        torch.testing.assert_close(stacked[e], alone, rtol=0, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(6)
    shapes = [(16, 24), (3, 8, 8)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    opt = Muon(params, lr=0.02)

    def step(opt, params, gs):
        for p, G in zip(params, gs):
            p.grad = G.clone()
        opt.step()

    for gs in grads[:2]:
        step(opt, params, gs)
    saved = copy.deepcopy(opt.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = Muon(resumed_params, lr=0.5, momentum=0.5)  # overwritten by the loaded groups
    resumed.load_state_dict(saved)
    for gs in grads[2:]:
        step(opt, params, gs)
        step(resumed, resumed_params, gs)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    assert resumed.param_groups[0]["momentum"] == 0.95


@pytest.mark.parametrize(
    "option, value, allowed",
    [("momentum", 1.0, "[0, 1)"), ("momentum", -0.1, "[0, 1)"), ("ns_coefficients", (), "non-empty"),
     ("update_rms", 0.0, "> 0"), ("lr", -1e-3, ">= 0"), ("weight_decay", -0.1, ">= 0")],
)  # fmt: skip
def test_validation_names_the_field(option, value, allowed):
    p = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError) as error:
        Muon([p], **{option: value})
    assert f"{option}={value!r}" in str(error.value) and allowed in str(error.value)


def test_refuses_vectors_and_bad_row_blocks():
    with pytest.raises(ValueError, match="parameter dim=1"):
        Muon([torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match=r"row_blocks=\(2, 3\).*sum to the parameter's 4 rows"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "row_blocks": (2, 3)}])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dtypes_kept(dtype):
    p = torch.nn.Parameter(torch.randn(8, 12).to(dtype))
    opt = Muon([p], lr=0.1)
    p.grad = torch.randn(8, 12).to(dtype)
    before = p.detach().clone()
    opt.step()
    assert p.dtype == dtype and not torch.equal(p, before)
    expected_state = torch.float64 if dtype == torch.float64 else torch.float32
    assert opt.state[p]["momentum_buffer"].dtype == expected_state


@pytest.mark.parametrize("implementation", ["for-loop", "foreach", "fused"])
def test_adamw_groups_equal_torch_adamw(implementation):
    g = torch.Generator().manual_seed(7)
    vec0, mat0 = torch.randn(10, generator=g), torch.randn(6, 8, generator=g)
    grads = [(torch.randn(10, generator=g), torch.randn(6, 8, generator=g)) for _ in range(3)]
    settings = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-20, weight_decay=0.1)
    vec, mat = torch.nn.Parameter(vec0.clone()), torch.nn.Parameter(mat0.clone())
    hybrid = MuonWithAdamW([{"params": [mat]}, {"params": [vec], "algorithm": "adamw",
                                                 "implementation": implementation, **settings}], lr=0.01)  # fmt: skip
    ref_vec, ref_mat = torch.nn.Parameter(vec0.clone()), torch.nn.Parameter(mat0.clone())
    adamw = torch.optim.AdamW([ref_vec], **settings)
    muon = Muon([ref_mat], lr=0.01)
    for gv, gm in grads:
        vec.grad, mat.grad, ref_vec.grad, ref_mat.grad = gv, gm, gv.clone(), gm.clone()
        hybrid.step()
        adamw.step()
        muon.step()
    torch.testing.assert_close(vec, ref_vec, rtol=0, atol=1e-7)
    assert torch.equal(mat, ref_mat)
    assert set(hybrid.state[vec]) == {"step", "exp_avg", "exp_avg_sq"} and float(hybrid.state[vec]["step"]) == 3
