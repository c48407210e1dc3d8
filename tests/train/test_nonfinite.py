"""titan_v4.train.nonfinite.NonFiniteGuard: a NaN/inf loss or gradient stops the run before the
update (and so before the step's checkpoint), or is skipped up to v4.max_nonfinite_steps times."""

import pytest
import torch
from torch import nn

from titan_v4.train.nonfinite import NonFiniteError, NonFiniteGuard


class _Optimizers:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


def _setup(budget=0):
    model = nn.Linear(3, 2)
    opt = _Optimizers()
    guard = NonFiniteGuard(opt, [model], torch.device("cpu"), budget, step_fn=lambda: 7)
    return model, opt, guard


def _backward(model, scale=1.0):
    model.zero_grad()
    loss = model(torch.ones(1, 3)).sum() * scale
    loss.backward()
    return loss


def test_finite_steps_pass_through():
    model, opt, guard = _setup()
    guard.observe_loss(_backward(model))
    opt.step()
    assert opt.steps == 1


@pytest.mark.parametrize("scale, what", [(float("nan"), "the loss and the gradient norm"), (float("inf"), "the loss and the gradient norm")])
def test_a_nonfinite_step_stops_before_the_update(scale, what):
    model, opt, guard = _setup()
    guard.observe_loss(_backward(model, scale))
    with pytest.raises(NonFiniteError, match=f"step 7: {what} is not finite.*v4.max_nonfinite_steps"):
        opt.step()
    assert opt.steps == 0


def test_a_nonfinite_loss_alone_stops_the_run():
    model, opt, guard = _setup()
    _backward(model)
    guard.observe_loss(torch.tensor(float("nan")))
    with pytest.raises(NonFiniteError, match="step 7: the loss is not finite"):
        opt.step()


def test_nonfinite_gradients_alone_stop_the_run():
    model, opt, guard = _setup()
    guard.observe_loss(_backward(model))
    model.weight.grad[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="step 7: the gradient norm is not finite"):
        opt.step()


def test_max_nonfinite_steps_skips_that_many_updates_then_stops():
    model, opt, guard = _setup(budget=2)
    for _ in range(2):
        guard.observe_loss(_backward(model, float("nan")))
        opt.step()  # skipped, no error
    assert opt.steps == 0 and guard.skipped == 2
    guard.observe_loss(_backward(model))
    opt.step()  # a good step still updates
    assert opt.steps == 1
    guard.observe_loss(_backward(model, float("nan")))
    with pytest.raises(NonFiniteError):
        opt.step()


@pytest.mark.parametrize("norm, stops", [(float("inf"), True), (float("nan"), True), (3.0, False)])
def test_a_known_step_norm_is_checked_instead_of_the_gradients(norm, stops):
    """With clipping folded into the optimizer (titan_v4/train/clip.py) the step's total norm is known:
    the guard decides on it and does not read the gradients again."""
    model, opt = nn.Linear(3, 2), _Optimizers()
    guard = NonFiniteGuard(opt, [model], torch.device("cpu"), 0, step_fn=lambda: 7, grad_norm_fn=lambda: torch.tensor(norm))
    guard._local_grads_finite = lambda: pytest.fail("the gradients were read although the norm was given")
    guard.observe_loss(_backward(model))
    if stops:
        with pytest.raises(NonFiniteError, match="step 7: the gradient norm is not finite"):
            opt.step()
    else:
        opt.step()
    assert opt.steps == (0 if stops else 1)
