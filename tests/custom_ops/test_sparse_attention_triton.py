"""Triton kernels of v4::sparse_attention (custom_ops/sparse_attention/triton) against fp64 math.

The launchers are called directly (ops.py registers them as the op's CUDA implementation). Small
corner cases run compiled on CUDA (fp32 and bf16), and without a GPU in Triton's interpreter, in a
child process (tests/custom_ops/test_triton_interpreter.py; tests/helpers/triton_device.py says why),
in fp32 to keep the interpreter fast. The real Flash / Pro shapes run on CUDA only (marker ``gpu``).
"""

import pytest
import torch

from custom_ops.sparse_attention import reference
from custom_ops.sparse_attention.contract import Inputs, Outputs
from tests.custom_ops.test_sparse_attention import Case, make_grad_out, make_inputs, oracle_outputs
from tests.helpers.tolerances import assert_close
from tests.helpers.triton_device import DEVICE, gpu, needs_triton_device

pytest.importorskip("triton")
from custom_ops.sparse_attention import triton as kernels  # noqa: E402
from custom_ops.sparse_attention.triton import bwd, config, fwd  # noqa: E402

pytestmark = needs_triton_device
CUDA = DEVICE == "cuda"

# ---------------------------------------------------------------------------------------------------
# Running the kernels
# ---------------------------------------------------------------------------------------------------

FLOAT_NAMES = ("q", "kv", "sink", "pool")


def kernel_inputs(args: dict, device=DEVICE, dtype=None) -> Inputs:
    """The op's inputs from the public keyword arguments, detached, on `device`; the float tensors in
    `dtype` when given."""
    def move(name, value):
        if not isinstance(value, torch.Tensor):
            return value
        value = value.detach().to(device)
        return value.to(dtype) if dtype is not None and name in FLOAT_NAMES else value

    return Inputs(**{name: move(name, value) for name, value in args.items()})


def run_kernels(args: dict, grad_out: torch.Tensor, tiles=None, modes=(None,)):
    """out, lse and, per entry of ``modes``, the {name: gradient} of one backward run (on the CPU).

    A mode is the dpool determinism: None runs the public launchers (heuristic tiles, mode from
    torch's flag); True / False the ``*_with_tiles`` ones. ``tiles`` (None: the heuristic ones)
    applies to every kernel and needs the ``*_with_tiles`` launchers throughout.
    """
    inputs = kernel_inputs(args)
    grad_out = grad_out.to(DEVICE)
    heads, dim, dtype = args["q"].shape[2], args["q"].shape[3], args["q"].dtype
    if tiles is None:
        out, lse = kernels.sparse_attention_fwd(inputs)
    else:
        out, lse = fwd.fwd_with_tiles(inputs, tiles)
    names = FLOAT_NAMES if args["pool"] is not None else FLOAT_NAMES[:3]
    runs = []
    for deterministic in modes:
        if tiles is None and deterministic is None:
            grads = kernels.sparse_attention_bwd(inputs, grad_out, Outputs(out, lse))
        else:
            dq_tiles = tiles or config.bwd_dq_tiles(heads, dim, dtype)
            dkv_tiles = tiles or config.bwd_dkv_tiles(heads, dim, dtype)
            grads = bwd.bwd_with_tiles(inputs, grad_out, Outputs(out, lse), dq_tiles, dkv_tiles, deterministic)
        assert (grads[3] is None) == (args["pool"] is None)
        runs.append({name: g.cpu() for name, g in zip(names, grads)})
    return out.cpu(), lse.cpu(), runs


def reference_outputs(args: dict, grad_out: torch.Tensor):
    """The fp64 reference (reference.py, the specification) in the oracle's output format."""
    inputs = kernel_inputs(args, device="cpu", dtype=torch.float64)
    outputs = reference.sparse_attention_fwd(inputs)
    grads = reference.sparse_attention_bwd(inputs, grad_out.double(), outputs)
    return outputs.out, outputs.lse, dict(zip(FLOAT_NAMES, grads))


def check(args: dict, grad_out: torch.Tensor, expected, dtype: torch.dtype, tiles=None, modes=(None,)) -> None:
    """The kernels' out, lse and every gradient (each backward mode) against ``expected``."""
    out, lse, runs = run_kernels(args, grad_out, tiles, modes)
    ref_out, ref_lse, ref_grads = expected
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, dtype, "out", "out")
    assert_close(lse, ref_lse, dtype, "lse", "lse")
    for mode, grads in zip(modes, runs):
        for name, grad in grads.items():
            assert grad.dtype == args[name].dtype, name
            assert_close(grad, ref_grads[name], dtype, "grad", f"d{name} (deterministic={mode})")


# ---------------------------------------------------------------------------------------------------
# Corner cases at small shapes
# ---------------------------------------------------------------------------------------------------


def topk_all_invalid(args: dict) -> dict:
    return {**args, "topk": torch.full_like(args["topk"], -1)}


def topk_repeated(args: dict) -> dict:
    """Slots 0 and 1 both name the latest complete entry (valid when it exists): counted twice."""
    topk = args["topk"].clone()
    seq_len = topk.shape[1]
    latest = (torch.arange(1, seq_len + 1) // args["ratio"] - 1).clamp(min=-1).to(torch.int32)
    topk[:, :, 0] = latest
    topk[:, :, 1] = latest
    return {**args, "topk": topk}


def sink_extreme(args: dict) -> dict:
    """A -inf sink (no sink), a dominant one (the keys get ~e^-12 of the mass), 0 and -4."""
    sink = torch.tensor([float("-inf"), 12.0, 0.0, -4.0][: args["q"].shape[2]], dtype=args["sink"].dtype)
    return {**args, "sink": sink.requires_grad_()}


# (case, edit of the inputs); cases keep S <= 40 and H, D small so that the interpreter stays fast.
CASES = [
    pytest.param(Case(1, 5, 4, 32, window=8), None, id="swa-S_lt_window"),
    pytest.param(Case(2, 23, 2, 32, window=6, docs=True, seed=1), None, id="swa-B2-docs"),
    pytest.param(Case(1, 9, 4, 32, window=1, seed=2), sink_extreme, id="swa-window1-only_sink_competes"),
    pytest.param(Case(2, 19, 4, 32, window=4, ratio=4, P=4, seed=3), None, id="hca-S_not_multiple_of_ratio"),
    pytest.param(Case(2, 37, 2, 64, window=8, ratio=8, P=4, docs=True, seed=4), None, id="hca-docs-D64"),
    pytest.param(Case(1, 6, 4, 32, window=3, ratio=8, P=1, seed=5), None, id="hca-no_visible_entry"),
    pytest.param(Case(1, 7, 4, 32, window=3, ratio=2, P=0, seed=6), None, id="hca-empty_pool"),
    pytest.param(Case(2, 21, 4, 32, window=4, ratio=4, P=5, K=9, seed=8), None, id="csa-topk_gt_pool-out_of_range"),
    pytest.param(Case(2, 33, 4, 32, window=5, ratio=2, P=16, K=6, docs=True, seed=9), None, id="csa-B2-docs"),
    pytest.param(Case(1, 30, 2, 64, window=7, ratio=4, P=7, K=3, seed=10), None, id="csa-D64"),
    pytest.param(Case(1, 12, 4, 32, window=3, ratio=2, P=6, K=4, seed=11), topk_all_invalid, id="csa-all_invalid"),
    pytest.param(Case(1, 17, 4, 32, window=3, ratio=2, P=8, K=4, seed=12), topk_repeated, id="csa-repeated"),
    pytest.param(Case(1, 7, 2, 32, window=3, ratio=2, P=0, K=3, seed=13), None, id="csa-empty_pool"),
    pytest.param(Case(1, 11, 4, 48, window=4, ratio=2, P=5, K=3, seed=14), sink_extreme, id="csa-D48_padded-sink"),
]

DTYPES = [pytest.param(torch.float32, id="fp32")]
if CUDA:  # bf16 under the interpreter would be slow (see the module docstring)
    DTYPES.append(pytest.param(torch.bfloat16, id="bf16"))


def case_inputs(case: Case, edit, dtype: torch.dtype):
    args = make_inputs(case, dtype)
    if edit is not None:
        args = edit(args)
    grad_out = make_grad_out(case, dtype)
    # Repeated indices are counted per occurrence by the specification, once by the dense oracle.
    expected = reference_outputs(args, grad_out) if edit is topk_repeated else oracle_outputs(args, grad_out)
    return args, grad_out, expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,edit", CASES)
def test_kernels_match_oracle(case, edit, dtype):
    """Public launchers (heuristic tiles); with a pool, also the deterministic dpool path."""
    args, grad_out, expected = case_inputs(case, edit, dtype)
    check(args, grad_out, expected, dtype, modes=(None,) if args["pool"] is None else (None, True))


# block_h, block_n, block_d, block_dv, num_warps, num_stages, block_t
TILES = [
    # D walked in chunks, two D slices, several key blocks per loop, 2 query blocks in dpool.
    pytest.param(config.Tiles(16, 16, 16, 16, 4, 1, block_t=8), id="chunked-split_dv"),
    # Whole rows with the value slice re-read (block_dv < D).
    pytest.param(config.Tiles(16, 16, 32, 16, 4, 1, block_t=16), id="whole-split_dv"),
]


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize(
    "case,edit",
    [
        pytest.param(Case(1, 14, 20, 32, window=13, ratio=2, P=7, K=18, docs=True, seed=20), None, id="csa-H20"),
        pytest.param(Case(2, 18, 2, 32, window=17, ratio=3, P=6, seed=21), None, id="hca"),
    ],
)
def test_tile_variants_match_oracle(case, edit, tiles):
    """The code paths the heuristics do not take at small shapes; H = 20 > block_h gives 2 head blocks."""
    args, grad_out, expected = case_inputs(case, edit, torch.float32)
    check(args, grad_out, expected, torch.float32, tiles=tiles, modes=(False, True))


def assert_deterministic_bwd_reproducible(args: dict, grad_out: torch.Tensor) -> None:
    """Two runs of the public launchers under torch.use_deterministic_algorithms(True) agree bitwise."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = run_kernels(args, grad_out, modes=(None, None))[2]
    finally:
        torch.use_deterministic_algorithms(previous)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(Case(2, 33, 4, 32, window=5, ratio=2, P=16, K=6, docs=True, seed=30), id="csa"),
        pytest.param(Case(1, 37, 4, 32, window=6, ratio=4, P=9, seed=31), id="hca"),
    ],
)
def test_deterministic_mode_is_bitwise_reproducible(case):
    dtype = torch.bfloat16 if CUDA else torch.float32
    assert_deterministic_bwd_reproducible(make_inputs(case, dtype), make_grad_out(case, dtype))


# ---------------------------------------------------------------------------------------------------
# Real shapes (GPU): bf16 kernels against the reference in fp32 on the same bf16-rounded inputs
# ---------------------------------------------------------------------------------------------------


def realistic_topk(batch, seq_len, k, n_pool, ratio, gen) -> torch.Tensor:
    """Per query: k distinct entries drawn at random among its visible ones, -1 padded where fewer."""
    n_visible = (torch.arange(1, seq_len + 1) // ratio).clamp(max=n_pool)  # [S]
    keys = torch.rand(batch, seq_len, n_pool, generator=gen)
    keys = keys.masked_fill(torch.arange(n_pool) >= n_visible[:, None], 2.0)  # invisible sort last
    idx = keys.topk(min(k, n_pool), dim=-1, largest=False).indices
    idx = torch.cat([idx, idx.new_full((batch, seq_len, k - idx.shape[-1]), -1)], dim=-1)
    return idx.masked_fill(torch.arange(k) >= n_visible[:, None], -1).to(torch.int32)


def real_inputs(kind: str, heads: int, k: int, seq_len: int = 4096, dim: int = 512, seed: int = 0) -> dict:
    """bf16 inputs at V4's shapes (window 128; CSA ratio 4, HCA ratio 128), on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    ratio = {"swa": 1, "csa": 4, "hca": 128}[kind]
    n_pool = seq_len // ratio

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16).cuda()

    return dict(
        q=randn(1, seq_len, heads, dim), kv=randn(1, seq_len, dim), sink=torch.randn(heads, generator=gen).cuda(),
        pool=None if kind == "swa" else randn(1, n_pool, dim),
        topk=realistic_topk(1, seq_len, k, n_pool, ratio, gen).cuda() if kind == "csa" else None,
        doc_ids=None, window=128, scale=dim**-0.5, ratio=ratio,
    )


REAL_SHAPES = [
    pytest.param("swa", 64, 0, id="flash-swa"),
    pytest.param("csa", 64, 512, id="flash-csa"),
    pytest.param("hca", 64, 0, id="flash-hca"),
    pytest.param("swa", 128, 0, id="pro-swa"),
    pytest.param("csa", 128, 1024, id="pro-csa"),
    pytest.param("hca", 128, 0, id="pro-hca"),
]


@gpu
@pytest.mark.parametrize("kind,heads,k", REAL_SHAPES)
def test_real_shapes_match_fp32_reference(kind, heads, k):
    args = real_inputs(kind, heads, k)
    grad_out = torch.randn(args["q"].shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).cuda()
    fp32 = kernel_inputs(args, dtype=torch.float32)
    ref_out, ref_lse = reference.sparse_attention_fwd(fp32)
    ref_grads = reference.sparse_attention_bwd(fp32, grad_out.float(), Outputs(ref_out, ref_lse))
    expected = (ref_out.cpu(), ref_lse.cpu(), {n: g.cpu() for n, g in zip(FLOAT_NAMES, ref_grads) if g is not None})
    check(args, grad_out, expected, torch.bfloat16)


@gpu
@pytest.mark.parametrize("kind,heads,k", [REAL_SHAPES[1], REAL_SHAPES[2]])
def test_real_shapes_deterministic_mode_is_bitwise_reproducible(kind, heads, k):
    args = real_inputs(kind, heads, k, seq_len=1024)
    grad_out = torch.randn(args["q"].shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert_deterministic_bwd_reproducible(args, grad_out)
