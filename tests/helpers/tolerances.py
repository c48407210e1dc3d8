"""The one place for numerical tolerances in the tests, keyed by (compute dtype, output kind).

An output is compared with its reference (usually an fp64 oracle on the same, already-rounded inputs)
by two scale-free numbers:

* ``rel_rms = ||actual - expected|| / ||expected||`` (Frobenius norms), the typical error;
* ``max_rel = max|actual - expected| / max|expected|``, the worst element relative to the largest one.

Kinds: ``"out"`` (an op's main output), ``"lse"`` (attention log-sum-exp), ``"grad"`` (any gradient).
The dtype is the dtype the op was fed (bf16 / fp32 / fp64).

Where the numbers come from:
* fp64: the oracle's own rounding; the sparse-attention op computes and returns lse in fp64 for
  fp64 inputs, so forward and backward agree with an independent fp64 derivation to ~1e-14 on the
  test shapes (the bounds leave 100x room for longer reductions).
* fp32: ~10x what the dense math written eagerly in fp32 gives on the test shapes (<= 5e-7), leaving
  room for longer reductions.
* bf16: the outputs are rounded to bf16 (2**-9 = 2e-3 relative per element) and the backward reads
  the bf16 ``out`` (and bf16 inputs' gradients are rounded too); the same dense math written eagerly
  in bf16 gives up to 3e-3 rel_rms / 6e-3 max_rel on the outputs and 5e-3 / 9e-3 on the gradients of
  the test shapes, and these bounds are ~3x that. lse is fp32 from fp32 math on the rounded inputs.
"""

from typing import NamedTuple

import torch


class Tolerance(NamedTuple):
    rel_rms: float
    max_rel: float


TOLERANCES: dict[tuple[torch.dtype, str], Tolerance] = {
    (torch.float64, "out"): Tolerance(rel_rms=1e-12, max_rel=1e-11),
    (torch.float64, "lse"): Tolerance(rel_rms=1e-12, max_rel=1e-11),
    (torch.float64, "grad"): Tolerance(rel_rms=1e-12, max_rel=1e-11),
    (torch.float32, "out"): Tolerance(rel_rms=2e-6, max_rel=5e-6),
    (torch.float32, "lse"): Tolerance(rel_rms=1e-6, max_rel=2e-6),
    (torch.float32, "grad"): Tolerance(rel_rms=5e-6, max_rel=1e-5),
    (torch.bfloat16, "out"): Tolerance(rel_rms=1e-2, max_rel=2e-2),
    (torch.bfloat16, "lse"): Tolerance(rel_rms=1e-6, max_rel=2e-6),
    (torch.bfloat16, "grad"): Tolerance(rel_rms=1.5e-2, max_rel=3e-2),
    # Whole model / block against the same math computed another way (HF transformers; compiled vs
    # eager): fp32 rounding through ~10 layers of norms, softmaxes and the Sinkhorn iterations. The
    # relative error of the tiny mHC scale / base gradients (sums over every token with heavy
    # cancellation) is the largest. rel_rms bounds are the HF-parity acceptance numbers.
    (torch.float32, "model_out"): Tolerance(rel_rms=1e-5, max_rel=1e-4),
    (torch.float32, "model_grad"): Tolerance(rel_rms=1e-4, max_rel=1e-3),
}


# One fp32 training run under two parallel layouts (pipeline schedules, FSDP, EP, HSDP): the
# per-step loss and grad norm of the first 5 steps agree within this relative error (the pipeline
# issue's acceptance bound; the runs differ only in summation order). Measured on the debugmodel:
# <= 1.6e-7 for every pipeline layout, 5e-6 for HSDP's grad norm (its norm sums the shards in
# another order; its losses are identical).
LAYOUT_REL = 1e-5
# The same under bf16 autocast (a pipeline without FSDP against one process): both round to bf16,
# but at other points (the stage boundary stays fp32; the loss is outside the pipeline's autocast).
# Measured: <= 2.3e-4 over 5 steps on the debugmodel.
BF16_LAYOUT_REL = 1e-3


def errors(actual: torch.Tensor, expected: torch.Tensor) -> Tolerance:
    """(rel_rms, max_rel) of ``actual`` against ``expected`` over their finite elements, in fp64."""
    finite = torch.isfinite(expected)
    diff = (actual.double() - expected.double())[finite]
    ref = expected.double()[finite]
    if ref.numel() == 0:
        return Tolerance(0.0, 0.0)
    # A zero reference (e.g. the gradient of an unused input) must be matched exactly.
    ref_norm = max(ref.norm().item(), torch.finfo(torch.float64).tiny)
    ref_max = max(ref.abs().max().item(), torch.finfo(torch.float64).tiny)
    return Tolerance(diff.norm().item() / ref_norm, diff.abs().max().item() / ref_max)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str, name: str = "") -> None:
    """Asserts shapes match, non-finite elements match exactly, and the finite errors are in bounds."""
    tol = TOLERANCES[(dtype, kind)]
    label = f"{name} ({dtype}, {kind})"
    assert actual.shape == expected.shape, f"{label}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{label}: non-finite elements differ"
    assert torch.equal(actual.double()[~finite], expected.double()[~finite]), f"{label}: non-finite values differ"
    err = errors(actual, expected)
    assert err.rel_rms <= tol.rel_rms and err.max_rel <= tol.max_rel, f"{label}: {err} exceeds {tol}"
