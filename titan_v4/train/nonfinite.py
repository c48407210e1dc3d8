"""Stop a diverging run before it writes a checkpoint: the non-finite loss / gradient guard.

torchtitan 0.2.2 logs ``loss: nan`` and goes on: it applies NaN updates, writes NaN checkpoints
(rotating the good ones out under ``checkpoint.keep_latest_k``) and exits 0. :class:`NonFiniteGuard`
wraps the optimizer container's ``step``. Before each update it checks, on every rank, the step's
losses and the (already reduced and clipped) gradients, agrees on the answer with one all-reduce,
and on a non-finite value either

* skips the update (no optimizer step, no expert-bias update; the LR schedule still advances),
  while fewer than ``v4.max_nonfinite_steps`` steps have been skipped in this process, or
* raises :class:`NonFiniteError`: the run stops with a non-zero exit before the step's checkpoint
  is written, so every checkpoint on disk holds finite weights.

After clipping, a non-finite total norm always leaves a non-finite gradient (NaN norm: every
gradient is NaN; infinite norm: the clip factor is 0 and the infinite entries become NaN), so
checking the gradients the optimizer is about to use is the same as checking the norm. Where the
step's norm is at hand (clipping folded into the optimizer, clip.py), the guard checks that norm and
does not read the gradients again; a norm whose square overflows fp32 then also counts as
non-finite (torchtitan's clipping would have zeroed those gradients).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torchtitan.tools.logging import logger


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was NaN or infinite (and no more such steps are tolerated)."""


class NonFiniteGuard:
    """Wraps ``optimizers.step``; feed it each microbatch loss through :meth:`observe_loss`."""

    def __init__(self, optimizers, model_parts, device: torch.device, max_nonfinite_steps: int, step_fn,
                 grad_norm_fn=lambda: None) -> None:  # fmt: skip
        """grad_norm_fn: () -> this step's total gradient norm over every rank, or None (then the
        guard computes the local gradients' norms itself)."""
        self._model_parts = model_parts
        self._grad_norm = grad_norm_fn
        self._device = device
        self._budget = max_nonfinite_steps
        self._current_step = step_fn  # () -> the trainer's step counter
        self._loss_finite = True
        self.skipped = 0
        self._step = optimizers.step
        optimizers.step = self._guarded_step

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Record one microbatch loss of the current step (cheap: no host sync)."""
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is True else self._loss_finite & finite

    def _local_grads_finite(self) -> torch.Tensor:
        grads = []
        for part in self._model_parts:
            for p in part.parameters():
                if p.grad is not None:
                    g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                    if g.numel():
                        grads.append(g)
        if not grads:
            return torch.tensor(True, device=self._device)
        norms = torch._foreach_norm(grads)
        return torch.isfinite(torch.stack([n.float() for n in norms])).all()

    def _guarded_step(self, *args, **kwargs):
        loss_finite = torch.as_tensor(self._loss_finite, device=self._device)
        self._loss_finite = True
        norm = self._grad_norm()
        grads_finite = torch.isfinite(norm) if norm is not None else self._local_grads_finite()
        bad = torch.stack([~loss_finite, ~grads_finite.to(self._device)]).to(torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        bad_loss, bad_grad = bool(bad[0]), bool(bad[1])
        if not (bad_loss or bad_grad):
            return self._step(*args, **kwargs)
        what = " and ".join(w for w, b in (("the loss", bad_loss), ("the gradient norm", bad_grad)) if b)
        step = self._current_step()
        if self.skipped < self._budget:
            self.skipped += 1
            logger.warning(
                f"titan_v4: step {step}: {what} is not finite (NaN or inf); the update is skipped "
                f"({self.skipped} of v4.max_nonfinite_steps={self._budget} tolerated)"
            )
            return None
        raise NonFiniteError(
            f"step {step}: {what} is not finite (NaN or inf): the run is diverging. It stopped before "
            "applying the update and before writing this step's checkpoint; the checkpoints on disk are "
            "intact. Lower optimizer.lr or raise lr_scheduler.warmup_steps, or set v4.max_nonfinite_steps "
            f"to skip up to that many such steps (now {self._budget})"
        )


class ObserveLoss:
    """Trainer mixin: hands every microbatch loss to ``self.nonfinite_guard`` (set after __init__)."""

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        loss = super().forward_backward_step(
            input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
        )
        guard = getattr(self, "nonfinite_guard", None)
        if guard is not None:
            guard.observe_loss(loss)
        return loss
