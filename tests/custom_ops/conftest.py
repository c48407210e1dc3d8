"""Op-test fixtures."""

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
