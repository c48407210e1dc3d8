"""custom_ops/dispatch.py: every ``v4::`` op is defined through it, and its CUDA implementation
chooses the Triton kernels or the reference in that one place, obeying TITAN_V4_REFERENCE_OPS.

The ops are enumerated from torch's dispatcher, not listed here, so an op registered some other way
fails. Everything runs on the CPU: the recorded CUDA implementations are called directly, with
recording stubs in place of the Triton function and the reference (and of the predicate where the
test is about the flag).
"""

import importlib
from pathlib import Path

import pytest
import torch

import custom_ops  # importing it registers the ops
from custom_ops import dispatch, flags
from tests.helpers.triton_device import gpu

V4_OPS = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("v4::"))


def _set_flag(monkeypatch, value) -> None:
    if value is None:
        monkeypatch.delenv(flags.REFERENCE_OPS, raising=False)
    else:
        monkeypatch.setenv(flags.REFERENCE_OPS, value)


def _stub(monkeypatch, record: dispatch.RegisteredOp, *, applies: bool | None) -> list:
    """Replaces the record's reference and Triton function (and, unless ``applies`` is None, its
    predicate, answering ``applies``) with stubs that log their call and return their name."""
    calls = []

    def stub(kind, answer):
        return lambda *args: calls.append((kind, args)) or answer

    monkeypatch.setattr(record, "reference", stub("reference", "reference"))
    monkeypatch.setattr(record, "triton", stub("triton", "triton"))
    if applies is not None:
        monkeypatch.setattr(record, "applies", lambda value: stub("applies", applies)(value))
    return calls


def _arguments(record: dispatch.RegisteredOp, **given) -> tuple:
    """The op's arguments: a placeholder string per argument, except those ``given``."""
    return tuple(given.get(name, f"<{name}>") for name in record.arguments)


def test_the_namespace_has_ops():
    assert V4_OPS, "no v4:: op is registered: the tests below would check nothing"
    assert set(dispatch.OPS) <= set(V4_OPS)


def test_every_op_family_has_the_same_parts():
    root = Path(custom_ops.__file__).parent
    families = [path for path in sorted(root.iterdir()) if (path / "__init__.py").is_file()]
    assert families
    for family in families:
        parts = ("__init__.py", "api.py", "contract.py", "ops.py", "reference.py", "triton/__init__.py")
        assert [part for part in parts if not (family / part).is_file()] == [], family.name


# ---------------------------------------------------------------------------------- registration
@pytest.mark.parametrize("name", V4_OPS)
def test_cuda_implementation_comes_from_dispatch(name, monkeypatch):
    assert name in dispatch.OPS, f"{name} was not defined with custom_ops.dispatch.op"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name} has no CUDA kernel"
    applies = dispatch.OPS[name].applies
    assert (applies.__name__, applies.__module__.rpartition(".")[2]) == ("triton_applies", "contract")
    # The CUDA function torch holds for the op is the record's: through it, the stubs answer.
    record = dispatch.OPS[name]
    backend_fns = getattr(record.op, "_backend_fns", None)
    if backend_fns is None:
        pytest.skip("this torch keeps a custom op's device functions elsewhere")
    _stub(monkeypatch, record, applies=True)
    assert backend_fns["cuda"](*_arguments(record)) == "triton"


@pytest.mark.parametrize("name", V4_OPS)
def test_triton_function_exists(name):
    """The ``module:function`` each op names for its kernels imports (a typo would show only on a GPU)."""
    pytest.importorskip("triton")
    module, _, function = dispatch.OPS[name].triton_path.partition(":")
    assert callable(getattr(importlib.import_module(module), function))


# ---------------------------------------------------------------------------------- the flag
@pytest.mark.parametrize("flag,expected", [(None, "triton"), ("", "triton"), ("0", "triton"), ("1", "reference")])
@pytest.mark.parametrize("name", V4_OPS)
def test_every_op_obeys_the_flag(name, flag, expected, monkeypatch):
    _set_flag(monkeypatch, flag)
    record = dispatch.OPS[name]
    calls = _stub(monkeypatch, record, applies=True)
    args = _arguments(record)
    assert record.cuda(*args) == expected
    predicate = [("applies", (args[record.reads],))] if expected == "triton" else []
    assert calls == [*predicate, (expected, args)]


@pytest.mark.parametrize("value", ["yes", "true", "on", "2", " 1", "1 "])
def test_other_flag_values_are_refused(value, monkeypatch):
    _set_flag(monkeypatch, value)
    with pytest.raises(ValueError) as error:
        flags.reference_ops_only()
    message = str(error.value)
    assert "TITAN_V4_REFERENCE_OPS" in message and repr(value) in message, message
    assert all(allowed in message for allowed in ("unset", "'0'", "'1'")), message


@pytest.mark.parametrize("name", V4_OPS)
def test_a_refused_flag_value_raises_at_the_op_call(name, monkeypatch):
    _set_flag(monkeypatch, "yes")
    record = dispatch.OPS[name]
    calls = _stub(monkeypatch, record, applies=False)
    with pytest.raises(ValueError, match="TITAN_V4_REFERENCE_OPS='yes'"):
        record.cuda(*_arguments(record))
    assert calls == []


@pytest.mark.parametrize("flag,expected", [(None, False), ("", False), ("0", False), ("1", True)])
def test_allowed_flag_values(flag, expected, monkeypatch):
    _set_flag(monkeypatch, flag)
    assert flags.reference_ops_only() is expected


# ---------------------------------------------------------------------------------- the predicates
BF16, FP32, FP64 = torch.bfloat16, torch.float32, torch.float64

# Per op family (the module of its predicate): the argument the predicate reads, and cases of
# (shape, dtype, whether the Triton kernels serve that argument).
PREDICATES = {
    "custom_ops.sparse_attention.contract": ("q", [
        ((1, 2, 2, 16), BF16, True), ((1, 2, 2, 64), BF16, True), ((1, 2, 2, 24), BF16, False),
        ((1, 2, 2, 16), FP32, False), ((1, 2, 2, 16), FP64, False),
    ]),
    "custom_ops.sinkhorn.contract": ("logits", [
        ((3, 4, 4), FP32, True), ((1, 1), FP32, True), ((16, 16), FP32, True), ((3, 3), FP32, False),
        ((32, 32), FP32, False), ((4, 4), FP64, False),
    ]),
    "custom_ops.mhc.contract": ("x", [
        ((2, 4, 8), BF16, True), ((2, 16, 8), BF16, True), ((2, 3, 8), BF16, False), ((2, 32, 8), BF16, False),
        ((0, 4, 8), BF16, False), ((2, 4, 8), FP32, False), ((2, 4, 8), FP64, False),
    ]),
    "custom_ops.indexer.contract": ("q", [
        ((1, 2, 2, 16), BF16, True), ((1, 2, 2, 16), FP32, True), ((1, 2, 2, 16), FP64, False),
    ]),
}  # fmt: skip


@pytest.mark.parametrize("name", V4_OPS)
def test_predicate_chooses_by_the_inputs(name, monkeypatch):
    _set_flag(monkeypatch, None)
    record = dispatch.OPS[name]
    family = record.applies.__module__
    assert family in PREDICATES, f"{name}: add the cases of its predicate ({family}) to PREDICATES"
    argument, cases = PREDICATES[family]
    assert record.arguments[record.reads] == argument
    _stub(monkeypatch, record, applies=None)
    for shape, dtype, serves in cases:
        args = _arguments(record, **{argument: torch.zeros(shape, dtype=dtype)})
        assert record.cuda(*args) == ("triton" if serves else "reference"), (shape, dtype)


# ---------------------------------------------------------------------------------- on a GPU
def _run_every_op_on_cuda() -> None:
    """Calls every op, forward and backward, through the public functions on small CUDA inputs of
    the kinds the Triton kernels serve."""
    cuda = dict(device="cuda")

    def randn(*shape, dtype=FP32, std=1.0):
        return (std * torch.randn(*shape, **cuda)).to(dtype).requires_grad_()

    def finite_sum(t):
        return torch.where(torch.isfinite(t), t, 0).float().sum()

    q, kv, pool = randn(1, 32, 4, 64, dtype=BF16), randn(1, 32, 64, dtype=BF16), randn(1, 8, 64, dtype=BF16)
    sink = randn(4)
    topk = torch.randint(-1, 8, (1, 32, 2), dtype=torch.int32, **cuda)
    out, lse = custom_ops.sparse_attention(q, kv, sink, pool, topk, window=8, scale=0.125, ratio=4)
    out.float().sum().backward()

    custom_ops.sinkhorn(randn(8, 4, 4), 5, 1e-6).sum().backward()

    x = randn(2, 8, 4, 64, dtype=BF16)
    fn, base, scale = randn(24, 256, std=0.05), randn(24), randn(3)
    collapsed, post, comb = custom_ops.mhc_collapse(x, fn, base, scale, hc_eps=1e-6, norm_eps=1e-6, sinkhorn_iters=5)
    new = custom_ops.mhc_expand(x, collapsed, post, comb)
    custom_ops.hyper_head(new, fn[:4], base[:4], scale[:1], hc_eps=1e-6, norm_eps=1e-6).float().sum().backward()

    iq, weights, keys = randn(1, 32, 4, 32, dtype=BF16), randn(1, 32, 4), randn(1, 8, 32, dtype=BF16)
    picks = custom_ops.indexer_topk(iq, weights, keys, k=2, ratio=4)
    finite_sum(custom_ops.indexer_scores(iq, weights, keys, picks, ratio=4)).backward()
    custom_ops.indexer_teacher(q, pool, lse, sink, picks, scale=0.125, ratio=4)
    torch.cuda.synchronize()


@gpu
@pytest.mark.parametrize("flag,expected", [(None, "triton"), ("1", "reference")])
def test_on_cuda_every_op_runs_what_the_flag_says(flag, expected, monkeypatch):
    """Through torch's dispatcher: with the kernels' inputs every op runs its Triton function, and
    under TITAN_V4_REFERENCE_OPS=1 its reference (the indexer's ops included)."""
    _set_flag(monkeypatch, flag)
    ran = {name: set() for name in V4_OPS}
    for name in V4_OPS:
        record = dispatch.OPS[name]
        for kind in ("reference", "triton"):
            function = getattr(record, kind)

            def logged(*args, function=function, name=name, kind=kind):
                ran[name].add(kind)
                return function(*args)

            monkeypatch.setattr(record, kind, logged)
    _run_every_op_on_cuda()
    assert {name: kinds for name, kinds in ran.items() if kinds != {expected}} == {}
