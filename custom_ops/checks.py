"""Argument checks shared by the ops' public functions (each error names the argument)."""

from typing import Optional

import torch
from torch import Tensor

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_device(name: str, value: Tensor, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but q is on {device}; all tensors must share q's device")


def check_same(name: str, value: Tensor, dtype: torch.dtype, device: torch.device) -> None:
    """``value`` has the dtype q's dtype implies and q's device."""
    if value.dtype != dtype:
        raise TypeError(f"{name} must have q's dtype {dtype}, got {value.dtype}")
    check_device(name, value, device)


def check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_sink(sink, heads: int, q: Tensor) -> None:
    """The attention sink: ``[H]`` logits in fp32 (fp64 allowed when q is fp64), on q's device."""
    check_tensor("sink", sink)
    if tuple(sink.shape) != (heads,):
        raise ValueError(f"sink must be [H] = {(heads,)} to match q, got shape {tuple(sink.shape)}")
    sink_dtypes = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
    if sink.dtype not in sink_dtypes:
        raise TypeError(f"sink must be float32 (or float64 when q is float64), got {sink.dtype} with q {q.dtype}")
    check_device("sink", sink, q.device)


def check_doc_ids(doc_ids: Optional[Tensor], q: Tensor) -> None:
    """``doc_ids`` is None or an integer ``[B, S]`` tensor on q's device (q is ``[B, S, ...]``)."""
    if doc_ids is None:
        return
    check_tensor("doc_ids", doc_ids)
    if tuple(doc_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(f"doc_ids must be [B, S] = {tuple(q.shape[:2])}, got shape {tuple(doc_ids.shape)}")
    if doc_ids.dtype not in _INT_DTYPES:
        raise TypeError(f"doc_ids must be an integer tensor, got {doc_ids.dtype}")
    check_device("doc_ids", doc_ids, q.device)
