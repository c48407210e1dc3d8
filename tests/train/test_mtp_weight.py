"""The MTP loss weight schedule (titan_v4/train/mtp_weight.py): the step it switches at is the first
step whose lr torchtitan's own schedule has decayed, found here by running that schedule."""

import pytest
import torch
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.config import LRScheduler

from titan_v4.config import V4, V4ConfigError
from titan_v4.train.mtp_weight import lr_decay_start, mtp_loss_weight_at


def first_decayed_step(schedulers, steps: int, peak: float) -> int | None:
    """Step the schedule as the trainer does (step s runs at the current lr, then the scheduler
    steps): the first 1-based step after warm-up whose lr is below the peak."""
    optimizer = schedulers.schedulers[0].optimizer
    warmed_up = False
    for step in range(1, steps + 1):
        lr = optimizer.param_groups[0]["lr"]
        warmed_up = warmed_up or lr == pytest.approx(peak)
        if warmed_up and lr < peak * (1 - 1e-9):
            return step
        optimizer.step()
        schedulers.step()
    return None


@pytest.mark.parametrize(
    "steps, warmup, decay_ratio, decay_type",
    [(100, 10, None, "cosine"), (100, 10, 0.1, "cosine"), (50, 5, 0.5, "linear"), (20, 30, 0.1, "cosine"),
     (1000, 20, 0.25, "sqrt"), (10, 0, 0.2, "cosine")],  # fmt: skip
)
def test_decay_start_is_the_first_step_with_a_decayed_lr(steps, warmup, decay_ratio, decay_type):
    peak = 1e-3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=peak)
    config = LRScheduler(warmup_steps=warmup, decay_ratio=decay_ratio, decay_type=decay_type, min_lr_factor=0.1)
    schedulers = build_lr_schedulers([optimizer], config, steps)
    start = lr_decay_start(schedulers)
    assert start == first_decayed_step(schedulers, steps, peak)


def test_weight_switches_at_the_decay_start():
    assert [mtp_loss_weight_at(s, 0.3, 0.1, 5) for s in range(1, 8)] == [0.3] * 4 + [0.1] * 3
    assert [mtp_loss_weight_at(s, 0.3, -1.0, 5) for s in range(1, 8)] == [0.3] * 7
    assert [mtp_loss_weight_at(s, 0.3, 0.1, None) for s in range(1, 8)] == [0.3] * 7


def test_no_schedule_means_no_decay_start():
    assert lr_decay_start(None) is None
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    other = type("Schedulers", (), {"schedulers": [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)]})()
    assert lr_decay_start(other) is None


@pytest.mark.parametrize("value", [-0.5, -2, "0.1", True])
def test_config_refuses_bad_values(value):
    with pytest.raises(V4ConfigError, match=r"v4.mtp_loss_weight_in_lr_decay=.* is invalid: allowed values are numbers >= 0, or -1"):
        V4(mtp_loss_weight_in_lr_decay=value)
    assert V4(mtp_loss_weight_in_lr_decay=-1).mtp_loss_weight_in_lr_decay == -1
    assert V4(mtp_loss_weight_in_lr_decay=0).mtp_loss_weight_in_lr_decay == 0
