"""Tests of v4::sparse_attention: reference vs a dense fp64 oracle, op registration, compile, validation."""

import math
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import custom_ops
from custom_ops.sparse_attention import reference
from custom_ops.sparse_attention.contract import Inputs, Outputs, compute_dtype
from tests.helpers.graph_capture import GraphCapture, count_calls
from tests.helpers.tolerances import assert_close

# ---------------------------------------------------------------------------------------------------
# Dense oracle: builds the full [S, S + P] visibility mask literally from the rules, then a masked
# softmax with an explicit sink column. Independent of reference.py (no unfold, no gathers, no chunks).
# ---------------------------------------------------------------------------------------------------


def oracle_visibility(
    batch: int,
    seq_len: int,
    n_pool: int,
    window: int,
    ratio: int,
    doc_ids: Optional[torch.Tensor],
    topk: Optional[torch.Tensor],
) -> torch.Tensor:
    """``[B, S, S + P]`` bool: column j < S is kv row j, column S + w is pool entry w."""
    vis = torch.zeros(batch, seq_len, seq_len + n_pool, dtype=torch.bool)
    for b in range(batch):
        doc = [0] * seq_len if doc_ids is None else doc_ids[b].tolist()
        for t in range(seq_len):
            # Walk back to the first token of t's run of equal ids: the document start.
            start = t
            while start > 0 and doc[start - 1] == doc[t]:
                start -= 1
            for j in range(max(0, t - window + 1, start), t + 1):
                vis[b, t, j] = True
            if topk is None:
                candidates = range(n_pool)
            else:
                candidates = [i for i in topk[b, t].tolist() if 0 <= i < n_pool]
            for w in candidates:
                first, last = w * ratio, (w + 1) * ratio - 1  # source tokens of entry w
                if last <= t and first >= start:
                    vis[b, t, seq_len + w] = True
    return vis


def oracle(q, kv, sink, pool, topk, doc_ids, window, scale, ratio):
    """fp64 out ``[B, S, H, D]`` and lse ``[B, S, H]`` (without the sink), differentiable."""
    q, kv, sink = q.double(), kv.double(), sink.double()
    batch, seq_len, heads, _ = q.shape
    keys = kv if pool is None else torch.cat([kv, pool.double()], dim=1)  # [B, S + P, D]
    n_pool = 0 if pool is None else pool.shape[1]
    vis = oracle_visibility(batch, seq_len, n_pool, window, ratio, doc_ids, topk)
    logits = scale * torch.einsum("bshd,bnd->bhsn", q, keys)
    logits = logits.masked_fill(~vis[:, None], float("-inf"))
    sink_col = sink.view(1, heads, 1, 1).expand(batch, heads, seq_len, 1)
    probs = torch.softmax(torch.cat([logits, sink_col], dim=-1), dim=-1)[..., :-1]  # drop the sink column
    out = torch.einsum("bhsn,bnd->bshd", probs, keys)
    lse = torch.logsumexp(logits, dim=-1).transpose(1, 2)
    return out, lse


# ---------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    B: int
    S: int
    H: int
    D: int
    window: int
    ratio: int = 1
    P: Optional[int] = None  # None: no pool (SWA)
    K: Optional[int] = None  # None with a pool: HCA; else CSA with K indices per query
    docs: bool = False
    seed: int = 0


CASES = [
    pytest.param(Case(1, 5, 4, 8, window=8), id="swa-S_lt_window"),
    pytest.param(Case(2, 23, 4, 8, window=6, docs=True, seed=1), id="swa-B2-docs"),
    pytest.param(Case(1, 9, 4, 8, window=1, ratio=2, P=4, seed=2), id="hca-window1"),
    pytest.param(Case(2, 19, 4, 8, window=4, ratio=4, P=4, seed=3), id="hca-ratio4-S_not_multiple"),
    pytest.param(Case(2, 37, 4, 64, window=8, ratio=8, P=4, docs=True, seed=4), id="hca-ratio8-docs-D64"),
    pytest.param(Case(1, 6, 4, 8, window=3, ratio=8, P=1, seed=5), id="hca-no_visible_entry"),
    pytest.param(Case(1, 7, 4, 8, window=3, ratio=2, P=0, seed=6), id="hca-empty_pool"),
    pytest.param(Case(2, 21, 64, 8, window=4, ratio=4, P=5, seed=7), id="hca-H64"),
    pytest.param(Case(2, 21, 4, 8, window=4, ratio=4, P=5, K=9, seed=8), id="csa-topk_gt_pool"),
    pytest.param(Case(2, 33, 4, 8, window=5, ratio=2, P=16, K=6, docs=True, seed=9), id="csa-docs"),
    pytest.param(Case(1, 30, 1, 64, window=7, ratio=4, P=7, K=3, seed=10), id="csa-H1-D64"),
    pytest.param(Case(2, 40, 4, 8, window=4, ratio=8, P=5, K=4, docs=True, seed=11), id="csa-ratio8-docs"),
    pytest.param(Case(1, 12, 64, 8, window=16, ratio=4, P=3, K=2, seed=12), id="csa-H64-S_lt_window"),
    pytest.param(Case(1, 7, 2, 8, window=3, ratio=2, P=0, K=3, seed=13), id="csa-empty_pool"),
]


def make_doc_ids(batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """Packed documents of random lengths; ids alternate 0/1 so that runs reuse ids."""
    new_doc = torch.rand(batch, seq_len, generator=gen) < 0.15
    new_doc[:, 0] = False
    return (new_doc.long().cumsum(dim=1) % 2).to(torch.int32)


def make_topk(batch, seq_len, k, n_pool, gen) -> torch.Tensor:
    """Per query: distinct candidates from [0, P + 3) (so some are >= P), ~25% replaced by -1.

    Most candidates are in the future of early queries, so future indices are exercised too.
    """
    rows = torch.full((batch, seq_len, k), -1, dtype=torch.int32)
    for b in range(batch):
        for t in range(seq_len):
            cand = torch.randperm(n_pool + 3, generator=gen)[:k]
            rows[b, t, : cand.numel()] = cand.to(torch.int32)
    drop = torch.rand(batch, seq_len, k, generator=gen) < 0.25
    return rows.masked_fill(drop, -1)


def make_inputs(case: Case, dtype: torch.dtype) -> dict:
    """Arguments of custom_ops.sparse_attention; float tensors are leaves requiring grad."""
    gen = torch.Generator().manual_seed(case.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    sink_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    args = dict(
        q=randn(case.B, case.S, case.H, case.D),
        kv=randn(case.B, case.S, case.D),
        sink=torch.randn(case.H, generator=gen, dtype=torch.float64).to(sink_dtype).requires_grad_(),
        pool=None if case.P is None else randn(case.B, case.P, case.D),
        topk=None if case.K is None else make_topk(case.B, case.S, case.K, case.P, gen),
        window=case.window,
        scale=case.D**-0.5,
        ratio=case.ratio,
        doc_ids=make_doc_ids(case.B, case.S, gen) if case.docs else None,
    )
    return args


def float_inputs(args: dict) -> dict:
    return {k: v for k, v in args.items() if k in ("q", "kv", "sink", "pool") and v is not None}


def oracle_outputs(args: dict, grad_out: torch.Tensor):
    """Oracle out, lse and the gradients of ``sum(out * grad_out)`` w.r.t. the float inputs (fp64)."""
    leaves = {k: v.detach().double().requires_grad_() for k, v in float_inputs(args).items()}
    full = {**args, **leaves}
    out, lse = oracle(
        full["q"], full["kv"], full["sink"], full["pool"], full["topk"], full["doc_ids"],
        full["window"], full["scale"], full["ratio"],
    )
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.double())
    return out, lse, dict(zip(leaves, grads))


def run_op(args: dict, grad_out: torch.Tensor):
    out, lse = custom_ops.sparse_attention(**args)
    leaves = float_inputs(args)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return out, lse, dict(zip(leaves, grads))


def make_grad_out(case: Case, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case.seed + 1000)
    return torch.randn(case.B, case.S, case.H, case.D, generator=gen, dtype=torch.float64).to(dtype)


def check_against_oracle(case: Case, dtype: torch.dtype, run) -> None:
    args = make_inputs(case, dtype)
    grad_out = make_grad_out(case, dtype)
    out, lse, grads = run(args, grad_out)
    ref_out, ref_lse, ref_grads = oracle_outputs(args, grad_out)
    assert out.dtype == dtype and lse.dtype == compute_dtype(dtype)
    assert_close(out, ref_out, dtype, "out", "out")
    assert_close(lse, ref_lse, dtype, "lse", "lse")
    for name, grad in grads.items():
        assert grad.dtype == args[name].dtype, name
        assert_close(grad, ref_grads[name], dtype, "grad", f"d{name}")


# ---------------------------------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_fp64_matches_oracle(case):
    check_against_oracle(case, torch.float64, run_op)


@pytest.mark.parametrize("chunk", [pytest.param(1, id="chunk1"), pytest.param(5, id="chunk5")])
@pytest.mark.parametrize("case", CASES)
def test_reference_chunked_matches_oracle(case, chunk):
    """Chunk boundaries of the reference (the op uses one chunk at these sizes)."""

    def run(args, grad_out):
        inputs = Inputs(**args)
        with torch.no_grad():
            out, lse = reference.sparse_attention_fwd(inputs, query_chunk=chunk)
            dq, dkv, dsink, dpool = reference.sparse_attention_bwd(inputs, grad_out, Outputs(out, lse), query_chunk=chunk)
        grads = dict(q=dq, kv=dkv, sink=dsink)
        if args["pool"] is not None:
            grads["pool"] = dpool
        return out, lse, grads

    check_against_oracle(case, torch.float64, run)


LOW_PRECISION_CASES = [CASES[1], CASES[4], CASES[9], CASES[12]]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
def test_low_precision_matches_oracle(case, dtype):
    """fp32 / bf16 inputs against the fp64 oracle on the same (rounded) inputs."""
    check_against_oracle(case, dtype, run_op)


def test_hand_single_query():
    """One query, one key: p = e^2 / (e^2 + e^0), out = 2p, lse = 2 (the sink is not in lse)."""
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    kv = torch.full((1, 1, 1), 2.0, dtype=torch.float64)
    sink = torch.zeros(1, dtype=torch.float64)
    out, lse = custom_ops.sparse_attention(q, kv, sink, window=4, scale=1.0)
    p = math.exp(2) / (math.exp(2) + 1)
    assert out.item() == pytest.approx(2 * p, rel=1e-14)
    assert lse.item() == pytest.approx(2.0, rel=1e-7)


def test_hand_two_keys_with_sink():
    """t=1 sees logits 0 and ln 3, sink 0: Z = 1 + 3 + 1, p = (0.2, 0.6), lse = ln 4."""
    q = torch.ones(1, 2, 1, 1, dtype=torch.float64)
    kv = torch.tensor([0.0, math.log(3)], dtype=torch.float64).view(1, 2, 1)
    sink = torch.zeros(1, dtype=torch.float64)
    out, lse = custom_ops.sparse_attention(q, kv, sink, window=2, scale=1.0)
    assert out[0, 1, 0, 0].item() == pytest.approx(0.6 * math.log(3), rel=1e-14)
    assert lse[0, 1, 0].item() == pytest.approx(math.log(4), rel=1e-7)
    # t=0 sees only its own key, logit 0: p = 1/2, out = 0.
    assert out[0, 0, 0, 0].item() == 0.0
    assert lse[0, 0, 0].item() == pytest.approx(0.0, abs=1e-12)


def _uniform_case(n_tokens: int):
    """q = 0 makes every visible logit 0, so out = (sum of visible rows) / (n_visible + 1 for the sink)."""
    q = torch.zeros(1, n_tokens, 1, 1, dtype=torch.float64)
    kv = torch.arange(1, n_tokens + 1, dtype=torch.float64).view(1, n_tokens, 1)
    sink = torch.zeros(1, dtype=torch.float64)
    return q, kv, sink


def test_hand_pool_causal_rule():
    """ratio 2, window 1: entry 0 (tokens 0-1) is visible from t=1, entry 1 (tokens 2-3) from t=3."""
    q, kv, sink = _uniform_case(4)
    pool = torch.tensor([10.0, 100.0], dtype=torch.float64).view(1, 2, 1)
    out, lse = custom_ops.sparse_attention(q, kv, sink, pool, window=1, scale=1.0, ratio=2)
    expected = [1 / 2, (2 + 10) / 3, (3 + 10) / 3, (4 + 10 + 100) / 4]
    n_visible = [1, 2, 2, 3]
    assert out.flatten().tolist() == pytest.approx(expected, rel=1e-14)
    assert lse.flatten().tolist() == pytest.approx([math.log(n) for n in n_visible], abs=1e-7)


def test_hand_topk_rule():
    """Only listed, valid, complete entries count; -1, out-of-range and future indices are ignored."""
    q, kv, sink = _uniform_case(4)
    pool = torch.tensor([10.0, 100.0], dtype=torch.float64).view(1, 2, 1)
    topk = torch.tensor([[[0, 1, -1], [1, 0, 7], [1, -1, -1], [1, 5, -1]]], dtype=torch.int32)
    out, _ = custom_ops.sparse_attention(q, kv, sink, pool, topk, window=1, scale=1.0, ratio=2)
    # t=0: no entry complete; t=1: entry 0 (1 is future, 7 out of range); t=2: 1 is future; t=3: entry 1.
    expected = [1 / 2, (2 + 10) / 3, 3 / 2, (4 + 100) / 3]
    assert out.flatten().tolist() == pytest.approx(expected, rel=1e-14)


def test_hand_documents():
    """doc_ids [0, 0, 1, 1], window 4: t=2 starts a new document and does not see tokens 0-1."""
    q, kv, sink = _uniform_case(4)
    doc_ids = torch.tensor([[0, 0, 1, 1]])
    out, _ = custom_ops.sparse_attention(q, kv, sink, window=4, scale=1.0, doc_ids=doc_ids)
    assert out.flatten().tolist() == pytest.approx([1 / 2, 3 / 3, 3 / 2, 7 / 3], rel=1e-14)


def test_hand_pool_straddling_documents():
    """ratio 2, documents [0 0 0 | 1 1 1]: entry 1 (tokens 2-3) straddles the boundary, never visible."""
    q, kv, sink = _uniform_case(6)
    pool = torch.tensor([10.0, 100.0, 1000.0], dtype=torch.float64).view(1, 3, 1)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    out, _ = custom_ops.sparse_attention(q, kv, sink, pool, window=1, scale=1.0, ratio=2, doc_ids=doc_ids)
    # t=1,2: entry 0; t=3,4: nothing (entry 1 straddles, entry 2 incomplete); t=5: entry 2.
    expected = [1 / 2, (2 + 10) / 3, (3 + 10) / 3, 4 / 2, 5 / 2, (6 + 1000) / 3]
    assert out.flatten().tolist() == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=["bf16", "fp32", "fp64"])
def test_output_dtypes(dtype):
    args = make_inputs(Case(1, 9, 2, 8, window=3, ratio=2, P=4, K=2), dtype)
    out, lse = custom_ops.sparse_attention(**args)
    # lse in the compute dtype: fp64 for fp64 queries, so the fp64 op is a true oracle.
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (1, 9, 2, 8) and lse.shape == (1, 9, 2)
    assert out.is_contiguous() and lse.is_contiguous()
    assert not lse.requires_grad
    out.float().sum().backward()
    for name, value in float_inputs(args).items():
        assert value.grad.dtype == value.dtype and value.grad.shape == value.shape, name


def test_non_contiguous_inputs_are_accepted():
    args = make_inputs(Case(1, 6, 2, 8, window=3, ratio=2, P=3), torch.float64)
    q_t = args["q"].detach().transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not q_t.is_contiguous()
    out, _ = custom_ops.sparse_attention(**{**args, "q": q_t})
    ref, _ = custom_ops.sparse_attention(**args)
    assert torch.equal(out, ref)


def test_gradcheck():
    args = make_inputs(Case(1, 6, 2, 3, window=3, ratio=2, P=3, K=2, docs=True, seed=3), torch.float64)
    names = ["q", "kv", "sink", "pool"]

    def fn(q, kv, sink, pool):
        return custom_ops.sparse_attention(**{**args, "q": q, "kv": kv, "sink": sink, "pool": pool})[0]

    assert torch.autograd.gradcheck(fn, [args[n] for n in names])


def test_gradcheck_hca_without_topk():
    args = make_inputs(Case(1, 7, 2, 3, window=2, ratio=2, P=3, seed=4), torch.float64)

    def fn(q, kv, sink, pool):
        return custom_ops.sparse_attention(**{**args, "q": q, "kv": kv, "sink": sink, "pool": pool})[0]

    assert torch.autograd.gradcheck(fn, [args[n] for n in ["q", "kv", "sink", "pool"]])


# ---------------------------------------------------------------------------------------------------
# Registration: opcheck, compile
# ---------------------------------------------------------------------------------------------------


def _op_args(args: dict) -> tuple:
    """Positional arguments of torch.ops.v4.sparse_attention from the public keyword arguments."""
    return tuple(Inputs(**args))


OPCHECK_CASES = [
    pytest.param(Case(1, 5, 2, 8, window=3), torch.float32, id="swa-fp32"),
    pytest.param(Case(2, 9, 2, 8, window=3, ratio=2, P=4, docs=True), torch.float64, id="hca-docs-fp64"),
    pytest.param(Case(1, 9, 2, 8, window=3, ratio=2, P=4, K=3), torch.bfloat16, id="csa-bf16"),
]


@pytest.mark.parametrize("case,dtype", OPCHECK_CASES)
def test_opcheck(case, dtype):
    args = make_inputs(case, dtype)
    torch.library.opcheck(torch.ops.v4.sparse_attention.default, _op_args(args))


@pytest.mark.parametrize("case,dtype", OPCHECK_CASES)
def test_opcheck_backward_op(case, dtype):
    args = make_inputs(case, dtype)
    with torch.no_grad():
        out, lse = custom_ops.sparse_attention(**args)
    op_args = _op_args({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    grad_out = make_grad_out(case, dtype)
    torch.library.opcheck(torch.ops.v4.sparse_attention_bwd.default, (grad_out, out, lse, *op_args))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(Case(2, 9, 4, 8, window=3, ratio=2, P=4, K=3, docs=True, seed=5), id="csa"),
        pytest.param(Case(1, 9, 4, 8, window=3), id="swa"),
    ],
)
def test_compile_fullgraph_matches_eager(case):
    """One graph (fullgraph raises on a break), the op and its backward one node each, eager numbers."""
    torch._dynamo.reset()
    args = make_inputs(case, torch.float32)
    grad_out = make_grad_out(case, torch.float32)

    def loss_fn(q, kv, sink, pool):
        out, lse = custom_ops.sparse_attention(
            q, kv, sink, pool, args["topk"], window=case.window, scale=case.D**-0.5, ratio=case.ratio,
            doc_ids=args["doc_ids"],
        )
        return (out * grad_out).sum() + lse.sum()

    leaves = [args["q"], args["kv"], args["sink"], args["pool"]]
    backend = GraphCapture()
    compiled = torch.compile(loss_fn, backend=backend, fullgraph=True)
    loss_c = compiled(*leaves)
    grads_c = torch.autograd.grad(loss_c, [x for x in leaves if x is not None])
    loss_e = loss_fn(*leaves)
    grads_e = torch.autograd.grad(loss_e, [x for x in leaves if x is not None])

    assert len(backend.dynamo_graphs) == 1
    assert count_calls(backend.dynamo_graphs, torch.ops.v4.sparse_attention.default) == 1
    assert count_calls(backend.fw_graphs, torch.ops.v4.sparse_attention.default) == 1
    assert count_calls(backend.bw_graphs, torch.ops.v4.sparse_attention_bwd.default) == 1
    assert_close(loss_c.detach(), loss_e.detach(), torch.float32, "out", "loss")
    for g_c, g_e in zip(grads_c, grads_e):
        assert_close(g_c, g_e, torch.float32, "grad", "grad")


def test_import_is_torch_only():
    """Importing custom_ops must not pull in titan_v4 (nor triton, not needed until the kernels)."""
    code = "import sys, custom_ops; print('titan_v4' in sys.modules, 'triton' in sys.modules)"
    repo = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]


def test_nan_fixture_is_active():
    assert torch.isnan(torch.empty(3)).all()


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def _valid_args() -> dict:
    args = make_inputs(Case(2, 8, 2, 4, window=3, ratio=2, P=4, K=2, docs=True), torch.float32)
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


BAD_INPUTS = [
    pytest.param(dict(q=torch.zeros(2, 8, 4)), ValueError, "q must be", id="q-3d"),
    pytest.param(dict(q=torch.zeros(2, 8, 2, 4, dtype=torch.float16)), TypeError, "q must be", id="q-fp16"),
    pytest.param(dict(q=torch.zeros(2, 0, 2, 4)), ValueError, "q must have", id="q-empty"),
    pytest.param(dict(q=[1.0]), TypeError, "q must be a torch.Tensor", id="q-list"),
    pytest.param(dict(kv=torch.zeros(2, 8, 5)), ValueError, "kv must be", id="kv-shape"),
    pytest.param(dict(kv=torch.zeros(2, 8, 4, dtype=torch.float64)), TypeError, "kv must have", id="kv-dtype"),
    pytest.param(dict(sink=torch.zeros(3)), ValueError, "sink must be", id="sink-shape"),
    pytest.param(dict(sink=torch.zeros(2, dtype=torch.bfloat16)), TypeError, "sink must be", id="sink-dtype"),
    pytest.param(dict(sink=torch.zeros(2, dtype=torch.float64)), TypeError, "sink must be", id="sink-fp64-q-fp32"),
    pytest.param(dict(pool=torch.zeros(2, 4, 5)), ValueError, "pool must be", id="pool-shape"),
    pytest.param(dict(pool=torch.zeros(2, 4, 4, dtype=torch.bfloat16)), TypeError, "pool must have", id="pool-dtype"),
    pytest.param(dict(pool=None), ValueError, "topk was given without pool", id="topk-no-pool"),
    pytest.param(dict(topk=torch.zeros(2, 8, 2, dtype=torch.int64)), TypeError, "topk must be int32", id="topk-int64"),
    pytest.param(dict(topk=torch.zeros(2, 7, 2, dtype=torch.int32)), ValueError, "topk must be", id="topk-shape"),
    pytest.param(dict(doc_ids=torch.zeros(2, 7, dtype=torch.int64)), ValueError, "doc_ids must be", id="doc-shape"),
    pytest.param(dict(doc_ids=torch.zeros(2, 8)), TypeError, "doc_ids must be an integer", id="doc-float"),
    pytest.param(dict(window=0), ValueError, "window must be >= 1, got 0", id="window-0"),
    pytest.param(dict(window=2.0), TypeError, "window must be a Python int", id="window-float"),
    pytest.param(dict(ratio=0), ValueError, "ratio must be >= 1, got 0", id="ratio-0"),
    pytest.param(dict(ratio=True), TypeError, "ratio must be a Python int", id="ratio-bool"),
    pytest.param(dict(scale=float("nan")), TypeError, "scale must be", id="scale-nan"),
    pytest.param(dict(scale=torch.tensor(1.0)), TypeError, "scale must be", id="scale-tensor"),
    pytest.param(dict(kv=torch.zeros(2, 8, 4, device="meta")), ValueError, "kv is on meta", id="kv-device"),
]


@pytest.mark.parametrize("change,error,message", BAD_INPUTS)
def test_validation(change, error, message):
    args = {**_valid_args(), **change}
    with pytest.raises(error, match=message):
        custom_ops.sparse_attention(**args)
