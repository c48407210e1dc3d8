"""V4Trainer.post_dataloading_process: the document layout goes to every pipeline stage (extra_kwargs),
and with v4.document_masking a dataloader without one is refused, naming the setting."""

from types import SimpleNamespace

import pytest
import torch

import titan_v4  # noqa: F401  (CPU shim before torchtitan)
from tests.helpers.job_config import job_config
from titan_v4.config import JobConfigError
from titan_v4.train.trainer import V4Trainer


def bare_trainer(*args: str) -> V4Trainer:
    """A V4Trainer with only what post_dataloading_process reads (no model, no process group)."""
    trainer = object.__new__(V4Trainer)
    trainer.job_config = job_config(*args)
    trainer.model_args = SimpleNamespace()  # no flex / varlen attention: no torchtitan masks
    trainer.parallel_dims = SimpleNamespace(cp_enabled=False)
    return trainer


def test_doc_ids_travel_as_a_keyword_to_every_stage():
    tokens, doc_ids = torch.arange(8).view(2, 4), torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.int32)
    inputs, labels, extra_inputs, extra_kwargs = bare_trainer().post_dataloading_process(
        {"input": tokens, "doc_ids": doc_ids}, tokens
    )
    assert extra_inputs == {} and set(extra_kwargs) == {"token_ids", "doc_ids"}
    assert extra_kwargs["doc_ids"] is doc_ids and extra_kwargs["token_ids"] is inputs


def test_a_batch_without_a_document_layout_is_refused_when_masking():
    tokens = torch.arange(8).view(2, 4)
    with pytest.raises(JobConfigError, match=r"v4.document_masking=true but the dataloader's batches carry no document layout"):
        bare_trainer().post_dataloading_process({"input": tokens}, tokens)
    _, _, _, extra_kwargs = bare_trainer("--v4.no-document_masking").post_dataloading_process({"input": tokens}, tokens)
    assert set(extra_kwargs) == {"token_ids"}
