"""titan_v4.train.loss_terms: the loss-term line of the training log (single process)."""

import pytest
import torch

from titan_v4.model.aux_loss import AuxLoss
from titan_v4.model.loss import V4Loss
from titan_v4.train.loss_terms import format_loss_terms, read_loss_terms


def test_terms_are_means_over_records_and_absent_terms_are_left_out():
    aux = torch.nn.ModuleList([AuxLoss("indexer_loss", "indexer_recall"), AuxLoss("indexer_loss", "indexer_recall")])
    aux[0].sums.copy_(torch.tensor([1.0, 0.5]))
    aux[0].count.fill_(1)
    aux[1].sums.copy_(torch.tensor([5.0, 1.5]))
    aux[1].count.fill_(3)
    loss_fn = V4Loss(0.3)
    logits = torch.zeros(1, 4, 8)  # uniform: CE = log 8 per token
    loss_fn(logits, torch.zeros(1, 4, dtype=torch.long))
    terms = read_loss_terms([aux], loss_fn, torch.device("cpu"))
    assert list(terms) == ["lm_loss", "indexer_loss", "indexer_recall"]
    assert terms["lm_loss"] == pytest.approx(torch.log(torch.tensor(8.0)).item(), rel=1e-6)
    assert terms["indexer_loss"] == pytest.approx(6.0 / 4) and terms["indexer_recall"] == pytest.approx(2.0 / 4)
    assert read_loss_terms([aux], loss_fn, torch.device("cpu")) == {}  # reset by the read
    assert format_loss_terms(7, {"lm_loss": 2.0, "indexer_recall": 0.5}) == "step:  7  lm_loss: 2.0000  indexer_recall: 0.5000"
