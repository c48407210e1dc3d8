"""The indexer's Triton kernels against the fp64 reference: on the CPU under TRITON_INTERPRET=1 (small
shapes, a child process: see tests/helpers/indexer_interpret.py), and on a GPU at the Flash / Pro shapes
(marked gpu)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import custom_ops
from custom_ops.indexer import reference
from custom_ops.indexer.contract import ScoresInputs, TeacherInputs, TopkInputs
from tests.custom_ops.test_indexer import Case, make_scores_inputs, make_teacher_inputs
from tests.helpers.tolerances import assert_close

REPO = Path(__file__).resolve().parents[2]

# Small shapes that still reach every branch: several entry blocks (P > 64 with ratio 1), padded
# heads (H < 16) and head dims (D not a power of two), the 128-head teacher, no entry at all.
INTERPRET_CASES = {
    "dense-2blocks": Case(1, 80, 4, 12, P=80, ratio=1, seed=1),
    "listed-2blocks": Case(2, 40, 4, 12, P=40, ratio=1, K=70, seed=2),
    "listed-K_gt_P": Case(2, 19, 2, 16, P=4, K=6, seed=3),
    "dense-no_entry": Case(1, 3, 2, 16, P=0, seed=4),
    "teacher-H128-D72": Case(1, 21, 128, 72, P=5, K=3, seed=5),
    "dense-docs-2blocks": Case(2, 80, 4, 12, P=80, ratio=1, docs=True, seed=6),
    "listed-docs": Case(2, 40, 4, 16, P=20, ratio=2, K=12, docs=True, seed=7),
}


def _detach(inputs):
    return tuple(x.detach() if torch.is_tensor(x) else x for x in inputs)


def _grad(case: Case) -> torch.Tensor:
    n = case.P if case.K is None else case.K
    return torch.randn(case.B, case.S, n, generator=torch.Generator().manual_seed(case.seed + 7))


def _interpret_cases(dtype: torch.dtype) -> list[dict]:
    cases = []
    for case in INTERPRET_CASES.values():
        scores = ScoresInputs(*_detach(make_scores_inputs(case, dtype)))
        cases.append(dict(op="scores", inputs=tuple(scores), grad=_grad(case)))
        cases.append(dict(op="topk", inputs=tuple(TopkInputs(*scores[:3], 5, case.ratio, scores.doc_ids)), grad=None))
        cases.append(dict(op="teacher", inputs=tuple(make_teacher_inputs(case, dtype)), grad=None))
    return cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """(dtype, cases, results) of one interpreter run over every case, in fp32.

    Not bf16: triton 3.9's interpreter multiplies the raw uint16 bit patterns in ``tl.dot`` of bf16
    operands (``create_dot`` in triton/runtime/interpreter.py converts only fp8 first), so its bf16
    products are garbage (measured: 2e10 off on a 16 x 16 product). bf16 runs in the GPU tests below.
    """
    dtype = torch.float32
    folder = tmp_path_factory.mktemp("interpret")
    cases = _interpret_cases(dtype)
    torch.save(cases, folder / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.indexer_interpret", str(folder / "cases.pt"), str(folder / "results.pt")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dtype, cases, torch.load(folder / "results.pt")


def check_scores(dtype, inputs: ScoresInputs, grad, result) -> None:
    leaves = [x.detach().double() for x in inputs[:3]]
    ref = reference.indexer_scores_fwd(ScoresInputs(*leaves, inputs.indices, inputs.ratio, inputs.doc_ids))
    assert result["scores"].dtype == torch.float32
    assert_close(result["scores"], ref, dtype, "out", "scores")
    if grad is None:
        return
    ref_grads = reference.indexer_scores_bwd(ScoresInputs(*leaves, inputs.indices, inputs.ratio, inputs.doc_ids), grad.double())
    for name in ("dq", "dweights", "dkeys"):
        assert result[name].dtype == getattr(inputs, name[1:]).dtype, name
        assert_close(result[name], getattr(ref_grads, name), dtype, "grad", name)


def check_topk(inputs: TopkInputs, picks: torch.Tensor) -> None:
    """The selected entries carry the k best fp64 scores (ids may differ between near-ties)."""
    scores = reference.indexer_scores_fwd(ScoresInputs(*(x.double() for x in inputs[:3]), None, inputs.ratio, inputs.doc_ids))
    expected = scores.sort(dim=-1, descending=True).values[..., : inputs.k]
    if expected.shape[-1] < inputs.k:
        pad = expected.new_full((*expected.shape[:-1], inputs.k - expected.shape[-1]), float("-inf"))
        expected = torch.cat([expected, pad], dim=-1)
    assert picks.dtype == torch.int32 and picks.shape == expected.shape
    assert torch.equal(picks < 0, expected == float("-inf")), "-1 exactly where fewer entries are visible"
    padded = torch.nn.functional.pad(scores, (0, 1), value=float("-inf"))  # -1 reads the -inf column
    got = padded.gather(-1, torch.where(picks >= 0, picks, scores.shape[-1]).long())
    finite = torch.isfinite(expected)
    # Near-ties may swap with entries of a bf16-rounded score; compare the selected values' errors.
    err = (got[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    scale = expected[finite].abs().max().item() if finite.any() else 1.0
    tol = 1e-5 if inputs.q.dtype == torch.float32 else 2e-2
    assert err <= tol * scale, (err, scale)


def check_teacher(dtype, inputs: TeacherInputs, result) -> None:
    ref = reference.indexer_teacher(TeacherInputs(*(x.double() if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs)))
    assert_close(result["log_mass"].exp(), ref.log_mass.exp(), dtype, "out", "mass")
    assert_close(result["log_visible"].exp(), ref.log_visible.exp(), dtype, "out", "visible mass")
    assert torch.equal(torch.isinf(result["log_mass"]), torch.isinf(ref.log_mass))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(INTERPRET_CASES))
def test_kernels_under_interpreter(interpreted, name):
    dtype, cases, results = interpreted
    index = list(INTERPRET_CASES).index(name) * 3
    scores_case, topk_case, teacher_case = cases[index : index + 3]
    check_scores(dtype, ScoresInputs(*scores_case["inputs"]), scores_case["grad"], results[index])
    check_topk(TopkInputs(*topk_case["inputs"]), results[index + 1]["picks"])
    check_teacher(dtype, TeacherInputs(*teacher_case["inputs"]), results[index + 2])


# ---------------------------------------------------------------------------------------------------
# GPU: the registered CUDA path (the kernels) at the released shapes, against the fp64 reference.
# ---------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (index heads, index head dim, top-k) of the indexer; (attention heads, head dim) of the teacher.
SHAPES = {"flash": (64, 128, 512, 64, 512), "pro": (64, 128, 1024, 128, 512)}


def packed_documents(seq_len: int, seed: int) -> torch.Tensor:
    """``[1, S]`` int32 labels of documents of a few hundred to a few thousand tokens."""
    starts = torch.rand(1, seq_len, generator=torch.Generator().manual_seed(seed)) < 1 / 600
    starts[:, 0] = False
    return starts.cumsum(dim=1).to(torch.int32)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "docs"])
@pytest.mark.parametrize("flavor", list(SHAPES))
def test_cuda_ops_at_released_shapes(flavor, docs):
    """bf16 kernels at S = 4096 against the fp64 reference (run on the GPU too, so it takes seconds),
    one document or packed ones."""
    heads, dim, k, attn_heads, attn_dim = SHAPES[flavor]
    seq_len, ratio = 4096, 4
    doc_ids = packed_documents(seq_len, seed=5).cuda() if docs else None
    cuda = lambda inputs: type(inputs)(*(x.detach().cuda() if torch.is_tensor(x) else x for x in inputs))  # noqa: E731
    case = Case(1, seq_len, heads, dim, P=seq_len // ratio, ratio=ratio, seed=3)
    inputs = cuda(make_scores_inputs(case, torch.bfloat16))._replace(doc_ids=doc_ids)
    q, weights, keys = (x.requires_grad_() for x in inputs[:3])
    picks = custom_ops.indexer_topk(q, weights, keys, k=k, ratio=ratio, doc_ids=doc_ids)
    check_topk(TopkInputs(*inputs[:3], k, ratio, doc_ids), picks)

    for indices in (None, picks):
        scores = custom_ops.indexer_scores(q, weights, keys, indices, ratio=ratio, doc_ids=doc_ids)
        grad = torch.randn(scores.shape, device="cuda")
        grads = torch.autograd.grad(torch.where(torch.isfinite(scores), scores, 0.0), (q, weights, keys), grad)
        result = {"scores": scores.detach(), **dict(zip(("dq", "dweights", "dkeys"), grads))}
        check_scores(torch.bfloat16, inputs._replace(indices=indices), grad, result)

    teacher_case = Case(1, seq_len, attn_heads, attn_dim, P=seq_len // ratio, ratio=ratio, seed=4)
    teacher = cuda(make_teacher_inputs(teacher_case, torch.bfloat16))._replace(doc_ids=doc_ids)
    for indices in (None, picks):
        log_mass, log_visible = custom_ops.indexer_teacher(*teacher[:4], indices, scale=teacher.scale, ratio=ratio, doc_ids=doc_ids)
        check_teacher(torch.bfloat16, teacher._replace(indices=indices), {"log_mass": log_mass, "log_visible": log_visible})
