"""Gradient clipping folded into the fused AdamW step: one pass over the gradients instead of two.

torchtitan 0.2.2's step computes the total gradient norm (one read of every gradient), multiplies
every gradient by min(1, max_norm / (norm + 1e-6)) (a read and a write), then the optimizer reads
them again. torch's fused Adam / AdamW kernels take a ``grad_scale`` tensor and divide each gradient
by it as they read it (the mechanism of ``torch.amp.GradScaler``), so passing
``max(1, (norm + 1e-6) / max_norm)`` applies the same clipping inside the optimizer's own pass.
What that saves a step is measured by ``python -m benchmarks.modules`` (docs/perf/2026-11-27-step-h100.md).

:class:`FoldedClipping` stands in for torchtitan's ``clip_grad_norm_`` during the trainer's step (the
step looks the function up in ``torchtitan.distributed.utils`` when it calls it): it returns the
same total norm, over every rank's shards, expert-parallel and pipeline stages included, and hands
the scale to the optimizers instead of scaling. The non-finite guard (nonfinite.py) checks that norm
rather than reading the gradients once more. It applies only where every optimizer is torch's
fused Adam or AdamW and the norm is the 2-norm; otherwise torchtitan's clipping runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.distributed as dist
import torchtitan.distributed.utils as dist_utils
from torch.distributed.tensor import DTensor

_EPS = 1e-6  # torch.nn.utils.clip_grads_with_norm_'s


def total_grad_norm(parameters, pp_mesh=None) -> torch.Tensor:
    """The 2-norm of all gradients of `parameters` on every rank (a replicated 0-dim fp32 tensor).

    Gradients are grouped by device mesh (the expert-parallel ones live on another mesh than the
    rest), each group's norm is reduced over its mesh, and the squares are summed, over the
    pipeline stages too: torchtitan's ``clip_grad_norm_`` norm without its scaling.
    """
    groups: dict = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            groups[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, False, True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if pp_mesh is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pp_mesh.get_group())
    return total.sqrt()


def _fused_adam(optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(
        group.get("fused") for group in optimizer.param_groups
    )


class FoldedClipping:
    """Clips through the fused optimizer's ``grad_scale``; use :meth:`during_step` around a train step."""

    def __init__(self, optimizers) -> None:
        self._optimizers = list(optimizers.optimizers)
        self.applies = bool(self._optimizers) and all(_fused_adam(o) for o in self._optimizers)
        self.norm: torch.Tensor | None = None  # this step's total norm, once computed

    def _norm_and_defer(self, parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None,
                        pp_mesh=None, ep_enabled=False):  # fmt: skip
        """torchtitan's ``clip_grad_norm_`` signature; returns the total norm, scales nothing."""
        if norm_type != 2.0 or error_if_nonfinite:
            return self._original(parameters, max_norm, norm_type, error_if_nonfinite, foreach, pp_mesh, ep_enabled)
        norm = total_grad_norm(parameters, pp_mesh)
        scale = torch.clamp((norm + _EPS) / max_norm, min=1.0)  # gradient / scale = gradient x clip factor
        for optimizer in self._optimizers:
            optimizer.grad_scale = scale
        self.norm = norm
        return norm

    @contextlib.contextmanager
    def during_step(self):
        if not self.applies:
            yield
            return
        self._original = dist_utils.clip_grad_norm_
        dist_utils.clip_grad_norm_ = self._norm_and_defer
        try:
            yield
        finally:
            dist_utils.clip_grad_norm_ = self._original
            for optimizer in self._optimizers:
                optimizer.__dict__.pop("grad_scale", None)
            self.norm = None
