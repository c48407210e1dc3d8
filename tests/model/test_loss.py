"""titan_v4.model.loss: the LM + MTP objective against cross-entropy written out per position."""

import pytest
import torch
import torch.nn.functional as F

from titan_v4.model.loss import IGNORE_INDEX, V4Loss, mtp_cross_entropy

VOCAB = 11


def per_position_ce(logits: torch.Tensor, targets: dict[tuple[int, int], int]) -> torch.Tensor:
    """Sum of -log softmax(logits[b, i])[target] over the (b, i) -> target pairs given."""
    return sum(-F.log_softmax(logits[b, i].double(), -1)[tok] for (b, i), tok in targets.items())


def test_mtp_depth_k_position_i_predicts_token_i_plus_1_plus_k():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels = tokens[:, 1:]  # labels[:, i] = token i + 1
    mtp = torch.randn(2, 8, VOCAB, generator=g)
    for depth in (1, 2):
        targets = {(b, i): tokens[b, i + 1 + depth].item() for b in range(2) for i in range(8 - depth)}
        assert mtp_cross_entropy(mtp, labels, depth).item() == pytest.approx(per_position_ce(mtp, targets).item(), rel=1e-5)


def test_v4_loss_is_lm_plus_weighted_mean_of_mtp_depths_as_a_sum():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, VOCAB, (2, 8), generator=g)
    logits, mtp1, mtp2 = torch.randn(3, 2, 8, VOCAB, generator=g)
    lm = per_position_ce(logits, {(b, i): labels[b, i].item() for b in range(2) for i in range(8)})
    d1 = per_position_ce(mtp1, {(b, i): labels[b, i + 1].item() for b in range(2) for i in range(7)})
    d2 = per_position_ce(mtp2, {(b, i): labels[b, i + 2].item() for b in range(2) for i in range(6)})
    loss = V4Loss(0.3)
    assert loss((logits, mtp1, mtp2), labels).item() == pytest.approx((lm + 0.3 / 2 * (d1 + d2)).item(), rel=1e-5)
    assert loss(logits, labels).item() == pytest.approx(lm.item(), rel=1e-5)  # no MTP head
    assert V4Loss(0.0)((logits, mtp1), labels).item() == pytest.approx(lm.item(), rel=1e-5)
    loss.denom = 4  # pipeline parallelism: each microbatch loss arrives token-normalised
    assert loss(logits, labels).item() == pytest.approx(lm.item() / 4, rel=1e-5)


def test_negative_mtp_weight_is_refused_by_name():
    with pytest.raises(ValueError, match=r"v4.mtp_loss_weight=-0.1 is invalid: must be >= 0"):
        V4Loss(-0.1)


def test_v4_loss_records_each_term_per_token():
    """read_values: the detached sums of the LM and MTP cross-entropies and their token counts, reset
    after each read (titan_v4/train/loss_terms.py logs sum / count)."""
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, VOCAB, (2, 8), generator=g)
    labels[0, 0] = IGNORE_INDEX
    logits, mtp1 = torch.randn(2, 2, 8, VOCAB, generator=g)
    loss = V4Loss(0.3)
    loss((logits, mtp1), labels)
    loss((logits, mtp1), labels)
    values = loss.read_values()
    lm = per_position_ce(logits, {(b, i): labels[b, i].item() for b in range(2) for i in range(8) if (b, i) != (0, 0)})
    # Row 0's first next-token label is ignored (a document boundary): its MTP target, past it, is too.
    d1 = per_position_ce(mtp1, {(b, i): labels[b, i + 1].item() for b in range(2) for i in range(7) if (b, i) != (0, 0)})
    assert values["lm_loss"][0].item() == pytest.approx(2 * lm.item(), rel=1e-5) and values["lm_loss"][1].item() == 30
    assert values["mtp_loss"][0].item() == pytest.approx(2 * d1.item(), rel=1e-5) and values["mtp_loss"][1].item() == 26
    assert loss.read_values() == {}


def test_losses_computed_while_recording_is_paused_are_not_logged():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, VOCAB, (1, 6), generator=g)
    logits = torch.randn(1, 6, VOCAB, generator=g)
    loss = V4Loss(0.3)
    loss(logits, labels)
    with loss.recording_paused():  # e.g. a pipeline's shape inference on placeholder outputs
        loss(torch.full_like(logits, float("nan")), labels)
    total, count = loss.read_values()["lm_loss"]
    assert int(count) == 6 and total.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum").item(), rel=1e-5)
    assert loss.read_values() == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_loss_equals_the_per_position_formula_in_value_and_gradient(dtype):
    """compile.components "loss": each head's cross-entropy compiled (inductor) gives the fp64 per-position
    value and the eager gradient, in the logits' dtype, ignored labels included."""
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, VOCAB, (2, 8), generator=g)
    labels[1, 2] = IGNORE_INDEX
    logits, mtp1 = (4 * torch.randn(2, 2, 8, VOCAB, generator=g)).to(dtype).unbind(0)
    lm = per_position_ce(logits, {(b, i): labels[b, i].item() for b in range(2) for i in range(8) if (b, i) != (1, 2)})
    # MTP position i predicts labels[i + 1] only when labels[i] and labels[i + 1] both count (loss.mtp_targets).
    d1 = per_position_ce(mtp1, {(b, i): labels[b, i + 1].item() for b in range(2) for i in range(7) if (b, i + 1) != (1, 2) and (b, i) != (1, 2)})
    grads = {}
    for name, loss_fn in (("eager", V4Loss(0.3)), ("compiled", V4Loss(0.3, compile_backend="inductor"))):
        leaves = [t.clone().requires_grad_() for t in (logits, mtp1)]
        loss = loss_fn(tuple(leaves), labels)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx((lm + 0.3 * d1).item(), rel=1e-5)
        loss.backward()
        grads[name] = [leaf.grad for leaf in leaves]
        assert all(grad.dtype == dtype for grad in grads[name])
        assert loss_fn.read_values()["mtp_loss"][1].item() == 12
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=2e-3)
    for compiled, eager in zip(grads["compiled"], grads["eager"]):
        torch.testing.assert_close(compiled, eager, **tol)
    assert grads["eager"][0][1, 2].abs().max() == 0 and grads["compiled"][0][1, 2].abs().max() == 0


def test_the_loss_is_compiled_exactly_when_the_config_asks():
    from tests.helpers.job_config import job_config
    from titan_v4.model.loss import build_v4_loss, cross_entropy_loss

    def built(*args):
        return build_v4_loss(job_config("--job.config_file", "train_configs/debug.toml", *args)).cross_entropy

    assert built() is cross_entropy_loss  # compile off
    assert built("--compile.enable", "--compile.components", "model") is cross_entropy_loss
    compiled = built("--compile.enable")  # torchtitan's default components: model and loss
    assert compiled is not cross_entropy_loss and getattr(compiled, "_torchdynamo_orig_callable", None) is cross_entropy_loss
