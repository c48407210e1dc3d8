"""Op-test fixtures."""

import os

import pytest
import torch


def _poison(t: torch.Tensor) -> torch.Tensor:
    """Fills a fresh tensor with a value no op should leave behind: NaN, or the dtype's minimum."""
    # no_grad: the caller may have asked for requires_grad=True, and fill_ on such a leaf is an error.
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).min)
    return t


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """Makes ``torch.empty``, ``torch.empty_like`` and ``Tensor.new_empty`` return poisoned tensors.

    An op that allocates its output with ``empty`` and forgets to write some elements then returns
    NaN there, which every comparison catches.
    """
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poisoned_empty(*args, **kwargs):
        return _poison(empty(*args, **kwargs))

    def poisoned_empty_like(*args, **kwargs):
        return _poison(empty_like(*args, **kwargs))

    def poisoned_new_empty(self, *args, **kwargs):
        return _poison(new_empty(self, *args, **kwargs))

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", poisoned_empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned_new_empty)
    yield


def _interpreter_bf16_dot_fix() -> None:
    """Makes ``tl.dot`` of bf16 operands work under TRITON_INTERPRET=1.

    The interpreter (triton 3.6 to 3.9) stores bf16 as uint16 and its ``create_dot`` multiplies those
    integers with numpy; the compiled kernels use the tensor cores. Converting bf16 operands to fp32
    first gives the exact products the hardware forms (bf16 x bf16 is exact in fp32). Only the child
    process of test_triton_interpreter.py sets TRITON_INTERPRET, so no other test sees this patch.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot_bf16_as_fp32(self, a, b, d, *args, **kwargs):
        a, b = (self.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return create_dot(self, a, b, d, *args, **kwargs)

    interpreter.InterpreterBuilder.create_dot = create_dot_bf16_as_fp32


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_bf16_dot_fix()
