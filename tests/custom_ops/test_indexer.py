"""Tests of the indexer ops (v4::indexer_scores / _topk / _teacher): the reference against literal
fp64 loops, gradients, the teacher against the attention's real probabilities, registration, compile,
validation. The Triton kernels are tested in test_indexer_triton.py."""

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import custom_ops
from custom_ops.indexer import reference
from custom_ops.indexer.contract import ScoresInputs, TeacherInputs, TopkInputs
from tests.custom_ops.test_sparse_attention import make_doc_ids, make_topk
from tests.helpers.graph_capture import GraphCapture, count_calls
from tests.helpers.tolerances import assert_close

NEG_INF = float("-inf")

# ---------------------------------------------------------------------------------------------------
# Literal oracles: one (t, s) pair at a time, from the rules in the op docstrings.
# ---------------------------------------------------------------------------------------------------


def listed(indices: Optional[torch.Tensor], b: int, t: int, n_entries: int) -> list[int]:
    return list(range(n_entries)) if indices is None else indices[b, t].tolist()


def doc_start(doc_ids: Optional[torch.Tensor], b: int, t: int) -> int:
    """First position of t's run of equal ids (0 without doc_ids), walking back."""
    start = t
    while doc_ids is not None and start > 0 and doc_ids[b, start - 1] == doc_ids[b, t]:
        start -= 1
    return 0 if doc_ids is None else start


def is_visible(s: int, t: int, n_entries: int, ratio: int, start: int = 0) -> bool:
    """Entry s exists, is complete at t and all its source tokens are in t's document."""
    return 0 <= s < n_entries and s < (t + 1) // ratio and s * ratio >= start


def oracle_scores(q, weights, keys, indices, ratio, doc_ids=None):
    """fp64 ``[B, S, n]`` (differentiable), -inf where not visible."""
    batch, seq_len, heads, _ = q.shape
    n_entries = keys.shape[1]
    rows = []
    for b in range(batch):
        for t in range(seq_len):
            row = []
            for s in listed(indices, b, t, n_entries):
                if not is_visible(s, t, n_entries, ratio, doc_start(doc_ids, b, t)):
                    row.append(torch.tensor(NEG_INF, dtype=torch.float64))
                    continue
                row.append(sum(weights[b, t, h].double() * torch.relu(q[b, t, h].double() @ keys[b, s].double()) for h in range(heads)))
            rows.append(torch.stack(row) if row else torch.zeros(0, dtype=torch.float64))
    n = rows[0].numel()
    return torch.stack(rows).view(batch, seq_len, n)


def oracle_teacher(q, pool, lse, sink, indices, scale, ratio, doc_ids=None):
    """fp64 (log_mass [B, S, n], log_visible [B, S]) with p = exp(scale q.pool - logaddexp(lse, sink))."""
    batch, seq_len, heads, _ = q.shape
    n_entries = pool.shape[1]
    q, pool, lse, sink = q.double(), pool.double(), lse.double(), sink.double()

    def mass(b, t, s):
        denom = torch.logaddexp(lse[b, t], sink)  # [H]
        return torch.exp(scale * (q[b, t] @ pool[b, s]) - denom).sum()

    log_mass = torch.full((batch, seq_len, len(listed(indices, 0, 0, n_entries))), NEG_INF, dtype=torch.float64)
    log_visible = torch.full((batch, seq_len), NEG_INF, dtype=torch.float64)
    for b in range(batch):
        for t in range(seq_len):
            start = doc_start(doc_ids, b, t)
            for j, s in enumerate(listed(indices, b, t, n_entries)):
                if is_visible(s, t, n_entries, ratio, start):
                    log_mass[b, t, j] = torch.log(mass(b, t, s))
            total = sum(mass(b, t, s) for s in range(n_entries) if is_visible(s, t, n_entries, ratio, start))
            if torch.is_tensor(total):
                log_visible[b, t] = torch.log(total)
    return log_mass, log_visible


# ---------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    B: int
    S: int
    H: int
    D: int
    P: int
    ratio: int = 4
    K: Optional[int] = None  # None: every entry
    seed: int = 0
    docs: bool = False  # packed documents (doc_ids)


CASES = [
    pytest.param(Case(1, 9, 3, 8, P=2), id="dense-S_not_multiple"),
    pytest.param(Case(2, 16, 4, 12, P=4, K=3, seed=1), id="listed-B2"),
    pytest.param(Case(1, 3, 2, 8, P=0, seed=2), id="dense-no_entry"),
    pytest.param(Case(1, 3, 2, 8, P=0, K=2, seed=3), id="listed-no_entry"),
    pytest.param(Case(2, 12, 2, 8, P=3, K=6, seed=4), id="listed-K_gt_P"),
    pytest.param(Case(1, 20, 64, 16, P=10, ratio=2, K=4, seed=5), id="listed-H64-ratio2"),
    pytest.param(Case(1, 7, 1, 4, P=7, ratio=1, seed=6), id="dense-ratio1-H1"),
    pytest.param(Case(2, 30, 3, 8, P=7, ratio=2, docs=True, seed=7), id="dense-docs"),
    pytest.param(Case(2, 33, 4, 8, P=8, ratio=2, K=6, docs=True, seed=8), id="listed-docs"),
    pytest.param(Case(1, 40, 2, 8, P=10, ratio=4, K=5, docs=True, seed=9), id="listed-docs-ratio4"),
]


def make_indices(case: Case, gen: torch.Generator) -> Optional[torch.Tensor]:
    """Distinct candidates per query, some >= P and many in the future, ~25% set to -1 (the
    sparse-attention tests' generator)."""
    return None if case.K is None else make_topk(case.B, case.S, case.K, case.P, gen)


def make_case_doc_ids(case: Case) -> Optional[torch.Tensor]:
    return make_doc_ids(case.B, case.S, torch.Generator().manual_seed(case.seed + 50)) if case.docs else None


def make_scores_inputs(case: Case, dtype: torch.dtype) -> ScoresInputs:
    gen = torch.Generator().manual_seed(case.seed)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt).requires_grad_()

    return ScoresInputs(
        q=randn(case.B, case.S, case.H, case.D),
        weights=randn(case.B, case.S, case.H, dt=wdt),
        keys=randn(case.B, case.P, case.D),
        indices=make_indices(case, gen),
        ratio=case.ratio,
        doc_ids=make_case_doc_ids(case),
    )


def make_teacher_inputs(case: Case, dtype: torch.dtype) -> TeacherInputs:
    gen = torch.Generator().manual_seed(case.seed + 100)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    q = torch.randn(case.B, case.S, case.H, case.D, generator=gen, dtype=torch.float64)
    pool = torch.randn(case.B, case.P, case.D, generator=gen, dtype=torch.float64)
    # lse of a softmax over more than the pool (the window): around log(#keys) + the logit scale.
    lse = 2.0 + torch.randn(case.B, case.S, case.H, generator=gen, dtype=torch.float64)
    sink = torch.randn(case.H, generator=gen, dtype=torch.float64)
    indices = make_indices(case, gen)
    return TeacherInputs(
        q.to(dtype), pool.to(dtype), lse.to(cdt), sink.to(cdt), indices, case.D**-0.5, case.ratio, make_case_doc_ids(case)
    )


def scores_grads(inputs: ScoresInputs, run, grad: torch.Tensor):
    out = run(inputs)
    leaves = [inputs.q, inputs.weights, inputs.keys]
    finite = torch.isfinite(out)
    if not out.requires_grad:  # the oracle of a query set without any entry: nothing to differentiate
        return out, [torch.zeros_like(x) for x in leaves]
    grads = torch.autograd.grad(torch.where(finite, out, 0.0), leaves, grad.to(out.dtype), allow_unused=True)
    return out, [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def run_api(inputs: ScoresInputs):
    return custom_ops.indexer_scores(
        inputs.q, inputs.weights, inputs.keys, inputs.indices, ratio=inputs.ratio, doc_ids=inputs.doc_ids
    )


def run_oracle(inputs: ScoresInputs):
    return oracle_scores(*inputs)


def check_scores(case: Case, dtype: torch.dtype, run) -> None:
    inputs = make_scores_inputs(case, dtype)
    n = case.P if case.K is None else case.K
    grad = torch.randn(case.B, case.S, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out, grads = scores_grads(inputs, run, grad)
    leaves64 = ScoresInputs(*(x.detach().double().requires_grad_() if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs))
    ref, ref_grads = scores_grads(leaves64, run_oracle, grad)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref, dtype, "out", "scores")
    for name, g, r in zip(("dq", "dweights", "dkeys"), grads, ref_grads):
        assert_close(g, r, dtype, "grad", name)


# ---------------------------------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_scores_and_grads_match_oracle_fp64(case):
    check_scores(case, torch.float64, run_api)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5], CASES[8]])
def test_scores_chunked_match_oracle(case):
    """Chunk boundaries of the reference (the op uses one chunk at these sizes)."""

    def run(inputs):
        return _ChunkedScores.apply(*inputs)

    check_scores(case, torch.float64, run)


class _ChunkedScores(torch.autograd.Function):
    """The reference's forward and backward with 2-query chunks, as an autograd function."""

    @staticmethod
    def forward(ctx, q, weights, keys, indices, ratio, doc_ids):
        ctx.inputs = ScoresInputs(q.detach(), weights.detach(), keys.detach(), indices, ratio, doc_ids)
        return reference.indexer_scores_fwd(ctx.inputs, chunk=2)

    @staticmethod
    def backward(ctx, grad):
        return (*reference.indexer_scores_bwd(ctx.inputs, grad, chunk=2), None, None, None)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("case", [CASES[1], CASES[5]])
def test_scores_low_precision(case, dtype):
    check_scores(case, dtype, run_api)


def test_scores_hand_case():
    """One head, w = 2, q = 1: I = 2 relu(k); ratio 2: t = 0 sees nothing, t = 1.. sees entry 0."""
    q = torch.ones(1, 4, 1, 1, dtype=torch.float64)
    weights = torch.full((1, 4, 1), 2.0, dtype=torch.float64)
    keys = torch.tensor([3.0, -1.0], dtype=torch.float64).view(1, 2, 1)
    scores = custom_ops.indexer_scores(q, weights, keys, ratio=2)
    assert scores[0].tolist() == [[NEG_INF, NEG_INF], [6.0, NEG_INF], [6.0, NEG_INF], [6.0, 0.0]]
    picks = custom_ops.indexer_topk(q, weights, keys, k=3, ratio=2)
    assert picks[0].tolist() == [[-1, -1, -1], [0, -1, -1], [0, -1, -1], [0, 1, -1]]


@pytest.mark.parametrize("case", CASES)
def test_topk_picks_the_highest_visible_scores(case):
    inputs = make_scores_inputs(case, torch.float64)
    k = case.K or 3
    with torch.no_grad():
        picks = custom_ops.indexer_topk(inputs.q, inputs.weights, inputs.keys, k=k, ratio=case.ratio, doc_ids=inputs.doc_ids)
        scores = oracle_scores(inputs.q, inputs.weights, inputs.keys, None, case.ratio, inputs.doc_ids)
    assert picks.dtype == torch.int32 and picks.shape == (case.B, case.S, k)
    for b in range(case.B):
        for t in range(case.S):
            first = -(-doc_start(inputs.doc_ids, b, t) // case.ratio)  # the document's first entry
            n_vis = min(case.P, (t + 1) // case.ratio)
            row = picks[b, t].tolist()
            n_valid = min(max(0, n_vis - first), k)
            assert row[n_valid:] == [-1] * (k - n_valid), (t, row)
            valid = row[:n_valid]
            assert len(set(valid)) == n_valid and all(first <= s < n_vis for s in valid), (t, row)
            # Sorted by descending score, and the best n_valid scores (compare values: relu makes ties).
            got = scores[b, t, valid]
            assert torch.all(got[:-1] >= got[1:]), (t, got)
            best = scores[b, t, :n_vis].sort(descending=True).values[:n_valid]
            assert torch.allclose(got, best, rtol=1e-12, atol=0), (t, got, best)


def test_topk_chunked_equals_one_chunk():
    inputs = make_scores_inputs(CASES[5].values[0], torch.float64)
    topk_inputs = TopkInputs(inputs.q.detach(), inputs.weights.detach(), inputs.keys.detach(), 4, inputs.ratio)
    whole = reference.indexer_topk(topk_inputs)
    scores = reference.indexer_scores_fwd(ScoresInputs(*topk_inputs[:3], None, inputs.ratio))
    chunked = reference.indexer_topk(topk_inputs, chunk=3)
    # Same selected score values (ids may differ between exact ties).
    pick = lambda p: torch.where(p >= 0, scores.gather(-1, p.clamp_min(0).long()), NEG_INF)  # noqa: E731
    assert torch.equal(pick(whole), pick(chunked)) and torch.equal(whole < 0, chunked < 0)


@pytest.mark.parametrize("case", CASES)
def test_teacher_matches_oracle_fp64(case):
    inputs = make_teacher_inputs(case, torch.float64)
    log_mass, log_visible = custom_ops.indexer_teacher(*inputs[:5], scale=inputs.scale, ratio=inputs.ratio, doc_ids=inputs.doc_ids)
    ref_mass, ref_visible = oracle_teacher(*inputs)
    assert_close(log_mass, ref_mass, torch.float64, "out", "log_mass")
    assert_close(log_visible, ref_visible, torch.float64, "out", "log_visible")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_teacher_low_precision(dtype):
    inputs = make_teacher_inputs(CASES[5].values[0], dtype)
    log_mass, log_visible = custom_ops.indexer_teacher(*inputs[:5], scale=inputs.scale, ratio=inputs.ratio)
    ref_mass, ref_visible = oracle_teacher(*inputs)
    # Masses, not logs: the relative error of a probability is what the KL sees.
    assert_close(log_mass.exp(), ref_mass.exp(), dtype, "out", "mass")
    assert_close(log_visible.exp(), ref_visible.exp(), dtype, "out", "visible mass")


@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "docs"])
def test_teacher_is_the_attention_probability_mass(docs):
    """With every visible entry attended (HCA-style call of the attention op) and its lse, exp(log_mass)
    is the attention's own probability of each entry summed over heads (sink in the denominator), and
    exp(log_visible) the whole compressed share; checked against an explicit softmax. With packed
    documents both ops see only the query's document."""
    gen = torch.Generator().manual_seed(11)
    batch, seq_len, heads, dim, ratio, window = 2, 23, 4, 8, 2, 3
    q = torch.randn(batch, seq_len, heads, dim, generator=gen, dtype=torch.float64)
    kv = torch.randn(batch, seq_len, dim, generator=gen, dtype=torch.float64)
    pool = torch.randn(batch, seq_len // ratio, dim, generator=gen, dtype=torch.float64)
    sink = torch.randn(heads, generator=gen, dtype=torch.float64)
    doc_ids = make_doc_ids(batch, seq_len, gen) if docs else None
    scale = dim**-0.5
    _, lse = custom_ops.sparse_attention(q, kv, sink, pool, window=window, scale=scale, ratio=ratio, doc_ids=doc_ids)
    log_mass, log_visible = custom_ops.indexer_teacher(q, pool, lse, sink, scale=scale, ratio=ratio, doc_ids=doc_ids)
    for b in range(batch):
        for t in range(seq_len):
            start = doc_start(doc_ids, b, t)
            local = [kv[b, j] for j in range(max(start, t - window + 1), t + 1)]
            first, n_vis = -(-start // ratio), (t + 1) // ratio
            seen = list(range(first, n_vis))
            keys = torch.stack(local + [pool[b, s] for s in seen])  # [n, D]
            logits = torch.cat([scale * q[b, t] @ keys.T, sink[:, None]], dim=1)  # [H, n + 1]: sink column
            probs = logits.softmax(dim=1)[:, len(local) : len(local) + len(seen)]  # [H, n_seen]
            expected = probs.sum(0)
            assert torch.allclose(log_mass[b, t, seen].exp(), expected, rtol=1e-12, atol=0)
            unseen = [s for s in range(pool.shape[1]) if s not in seen]
            assert torch.all(log_mass[b, t, unseen] == NEG_INF)
            if seen:
                assert math.isclose(log_visible[b, t].exp().item(), expected.sum().item(), rel_tol=1e-12)
            else:
                assert log_visible[b, t].item() == NEG_INF


def test_scores_gradcheck():
    inputs = make_scores_inputs(Case(1, 10, 2, 3, P=5, ratio=2, K=3, seed=9), torch.float64)

    def fn(q, weights, keys):
        out = custom_ops.indexer_scores(q, weights, keys, inputs.indices, ratio=inputs.ratio)
        return torch.where(torch.isfinite(out), out, 0.0)

    assert torch.autograd.gradcheck(fn, (inputs.q, inputs.weights, inputs.keys))


# ---------------------------------------------------------------------------------------------------
# Registration: opcheck, compile, outputs
# ---------------------------------------------------------------------------------------------------


def _detached(inputs):
    return type(inputs)(*(x.detach() if torch.is_tensor(x) else x for x in inputs))


OPCHECK = [pytest.param(Case(1, 9, 2, 8, P=2), id="dense"), pytest.param(Case(2, 12, 2, 8, P=3, K=4, seed=4), id="listed")]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("case", OPCHECK)
def test_opcheck(case, dtype):
    inputs = make_scores_inputs(case, dtype)
    torch.library.opcheck(torch.ops.v4.indexer_scores.default, tuple(inputs))
    grad = torch.randn(case.B, case.S, case.K or case.P)
    torch.library.opcheck(torch.ops.v4.indexer_scores_bwd.default, (grad, *_detached(inputs)))
    topk = TopkInputs(*_detached(inputs)[:3], 2, case.ratio)
    torch.library.opcheck(torch.ops.v4.indexer_topk.default, tuple(topk))
    teacher = make_teacher_inputs(case, dtype)
    torch.library.opcheck(torch.ops.v4.indexer_teacher.default, tuple(teacher))


def test_compile_fullgraph_matches_eager():
    """One graph; each op one node (the scores' backward one node too); eager numbers."""
    torch._dynamo.reset()
    case = Case(2, 12, 2, 8, P=3, K=4, seed=4)
    inputs = make_scores_inputs(case, torch.float32)
    teacher = make_teacher_inputs(case, torch.float32)

    def loss_fn(q, weights, keys):
        picks = custom_ops.indexer_topk(q, weights, keys, k=2, ratio=case.ratio)
        scores = custom_ops.indexer_scores(q, weights, keys, picks, ratio=case.ratio)
        log_mass, _ = custom_ops.indexer_teacher(*teacher[:4], picks, scale=teacher.scale, ratio=case.ratio)
        return torch.where(torch.isfinite(scores), scores * log_mass.exp(), 0.0).sum()

    leaves = [inputs.q, inputs.weights, inputs.keys]
    backend = GraphCapture()
    loss_c = torch.compile(loss_fn, backend=backend, fullgraph=True)(*leaves)
    grads_c = torch.autograd.grad(loss_c, leaves)
    loss_e = loss_fn(*leaves)
    grads_e = torch.autograd.grad(loss_e, leaves)
    assert len(backend.dynamo_graphs) == 1
    for op in (torch.ops.v4.indexer_topk.default, torch.ops.v4.indexer_scores.default, torch.ops.v4.indexer_teacher.default):
        assert count_calls(backend.fw_graphs, op) == 1, op
    assert count_calls(backend.bw_graphs, torch.ops.v4.indexer_scores_bwd.default) == 1
    assert_close(loss_c.detach(), loss_e.detach(), torch.float32, "out", "loss")
    for g_c, g_e in zip(grads_c, grads_e):
        assert_close(g_c, g_e, torch.float32, "grad", "grad")


def test_non_contiguous_inputs_are_accepted():
    inputs = make_scores_inputs(CASES[1].values[0], torch.float64)
    q_t = inputs.q.detach().transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_t.is_contiguous()
    assert torch.equal(
        custom_ops.indexer_scores(q_t, inputs.weights, inputs.keys, inputs.indices, ratio=4), run_api(inputs)
    )


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def _valid_scores() -> dict:
    inputs = _detached(make_scores_inputs(Case(2, 8, 2, 4, P=2, K=2), torch.float32))
    return dict(inputs._asdict())


BAD_SCORES = [
    pytest.param(dict(q=torch.zeros(2, 8, 4)), ValueError, "q must be", id="q-3d"),
    pytest.param(dict(q=torch.zeros(2, 8, 2, 4, dtype=torch.float16)), TypeError, "q must be", id="q-fp16"),
    pytest.param(dict(weights=torch.zeros(2, 8, 3)), ValueError, "weights must be", id="weights-shape"),
    pytest.param(dict(weights=torch.zeros(2, 8, 2, dtype=torch.bfloat16)), TypeError, "weights must be torch.float32 \\(the compute dtype", id="weights-dtype"),
    pytest.param(dict(keys=torch.zeros(2, 2, 5)), ValueError, "keys must be", id="keys-shape"),
    pytest.param(dict(keys=torch.zeros(2, 2, 4, dtype=torch.float64)), TypeError, "keys must have q's dtype torch.float32", id="keys-dtype"),
    pytest.param(dict(indices=torch.zeros(2, 8, 2, dtype=torch.int64)), TypeError, "indices must be int32", id="indices-int64"),
    pytest.param(dict(indices=torch.zeros(2, 7, 2, dtype=torch.int32)), ValueError, "indices must be", id="indices-shape"),
    pytest.param(dict(ratio=0), ValueError, "ratio must be >= 1, got 0", id="ratio-0"),
    pytest.param(dict(ratio=2.0), TypeError, "ratio must be a Python int", id="ratio-float"),
    pytest.param(dict(keys=torch.zeros(2, 2, 4, device="meta")), ValueError, "keys is on meta", id="keys-device"),
]


BAD_DOC_IDS = [
    pytest.param(dict(doc_ids=torch.zeros(2, 7, dtype=torch.int32)), ValueError, "doc_ids must be \\[B, S\\]", id="doc_ids-shape"),
    pytest.param(dict(doc_ids=torch.zeros(2, 8)), TypeError, "doc_ids must be an integer tensor", id="doc_ids-float"),
]

@pytest.mark.parametrize("change,error,message", BAD_SCORES + BAD_DOC_IDS)
def test_scores_validation(change, error, message):
    args = {**_valid_scores(), **change}
    with pytest.raises(error, match=message):
        custom_ops.indexer_scores(
            args["q"], args["weights"], args["keys"], args["indices"], ratio=args["ratio"], doc_ids=args["doc_ids"]
        )


def test_topk_validation():
    args = _valid_scores()
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        custom_ops.indexer_topk(args["q"], args["weights"], args["keys"], k=0, ratio=4)
    with pytest.raises(TypeError, match="doc_ids must be an integer tensor"):
        custom_ops.indexer_topk(args["q"], args["weights"], args["keys"], k=1, ratio=4, doc_ids=torch.zeros(2, 8))


BAD_TEACHER = [
    pytest.param(dict(pool=torch.zeros(2, 2, 5)), ValueError, "pool must be", id="pool-shape"),
    pytest.param(dict(lse=torch.zeros(2, 8, 3)), ValueError, "lse must be", id="lse-shape"),
    pytest.param(dict(lse=torch.zeros(2, 8, 2, dtype=torch.bfloat16)), TypeError, "lse must be torch.float32 \\(the compute dtype", id="lse-dtype"),
    pytest.param(dict(sink=torch.zeros(3)), ValueError, "sink must be", id="sink-shape"),
    pytest.param(dict(sink=torch.zeros(2, dtype=torch.float64)), TypeError, "sink must be float32", id="sink-dtype"),
    pytest.param(dict(scale=float("inf")), TypeError, "scale must be", id="scale-inf"),
]


@pytest.mark.parametrize("change,error,message", BAD_TEACHER + BAD_DOC_IDS)
def test_teacher_validation(change, error, message):
    args = {**make_teacher_inputs(Case(2, 8, 2, 4, P=2, K=2), torch.float32)._asdict(), **change}
    with pytest.raises(error, match=message):
        custom_ops.indexer_teacher(
            args["q"], args["pool"], args["lse"], args["sink"], args["indices"],
            scale=args["scale"], ratio=args["ratio"], doc_ids=args["doc_ids"],
        )  # fmt: skip
