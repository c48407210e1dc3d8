"""The MTP loss weight over a run: ``v4.mtp_loss_weight``, then ``v4.mtp_loss_weight_in_lr_decay``
from the first step whose learning rate torchtitan's schedule decays (DeepSeek-V4: 0.3, then 0.1).

torchtitan 0.2.2's schedule (``build_lr_schedulers``) is a LambdaLR whose lambda is a
``functools.partial`` of its warm-up / stable / decay function, holding ``warmup_steps`` and
``stable_steps``. Training step s (1-based) runs with ``lambda(s - 1)``, which decays from
``s - 1 >= warmup_steps + stable_steps`` on; the start is read from that partial, so it follows
whatever torchtitan computed (its clamping of warm-up and decay steps included).
"""

from __future__ import annotations

import functools


def lr_decay_start(lr_schedulers) -> int | None:
    """The first 1-based training step with a decayed lr, or None when the schedule never decays
    within the run (or is not torchtitan's warm-up / stable / decay lambda)."""
    schedulers = getattr(lr_schedulers, "schedulers", [])
    if not schedulers:
        return None
    lr_lambda = schedulers[0].lr_lambdas[0]
    if not isinstance(lr_lambda, functools.partial) or "stable_steps" not in lr_lambda.keywords:
        return None
    if lr_lambda.keywords["decay_steps"] == 0:
        return None
    return lr_lambda.keywords["warmup_steps"] + lr_lambda.keywords["stable_steps"] + 1


def mtp_loss_weight_at(step: int, weight: float, weight_in_decay: float, decay_start: int | None) -> float:
    """The MTP loss weight of training step ``step`` (1-based)."""
    if weight_in_decay < 0 or decay_start is None or step < decay_start:
        return weight
    return weight_in_decay
