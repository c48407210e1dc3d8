"""A torchtitan plug-in that checks titan_v4.train's glue without the DeepSeek-V4 model.

Loaded by the tests with ``--experimental.custom_import tests.helpers.llama3_ids_plugin`` (the
repository root on PYTHONPATH). It registers torchtitan's llama3 ``debugmodel`` with titan_v4's data builders, a
forward that insists on receiving ``token_ids`` (what V4Trainer adds for hash-routed layers on
every pipeline stage), and two losses:

* ``llama3_ids``: a SUM cross-entropy with a settable ``denom`` (the PP gradient-scale fix applies);
* ``llama3_ids_plain``: torchtitan's plain cross-entropy (no ``denom``: V4Trainer leaves it alone).
"""

import dataclasses

import torch
from torchtitan.components.loss import cross_entropy_loss
from torchtitan.models.llama3 import get_train_spec
from torchtitan.models.llama3.model.model import Transformer
from torchtitan.protocols.train_spec import register_train_spec

from titan_v4.data import build_v4_dataloader, build_v4_tokenizer


class Llama3WithTokenIds(Transformer):
    """llama3 whose forward requires the token ids on every stage."""

    def forward(self, tokens, attention_masks=None, positions=None, token_ids=None, doc_ids=None):
        # doc_ids (titan_v4's document layout) is accepted and unused: this model checks the glue only.
        if token_ids is None or token_ids.dtype != torch.long or token_ids.shape[:2] != tokens.shape[:2]:
            raise AssertionError(f"bad token_ids {None if token_ids is None else (token_ids.dtype, token_ids.shape)}")
        # Pipeline shape inference runs each stage once under no_grad with placeholder positional
        # inputs (torch 2.11: zeros; 2.13: torch.empty) but the real kwargs: compare only in training.
        if self.tok_embeddings is not None and torch.is_grad_enabled() and not torch.equal(token_ids, tokens):
            raise AssertionError("token_ids differ from the tokens on the first stage")
        return super().forward(tokens, attention_masks=attention_masks, positions=positions)


class DenomLoss:
    """SUM cross-entropy, divided by ``denom`` when V4Trainer sets it (PP only)."""

    def __init__(self) -> None:
        self.denom = None

    def __call__(self, pred, labels):
        loss = cross_entropy_loss(pred, labels)
        return loss if self.denom is None else loss / self.denom


def _register(name: str, build_loss_fn) -> None:
    spec = dataclasses.replace(
        get_train_spec(),  # llama3's
        model_cls=Llama3WithTokenIds,
        build_tokenizer_fn=build_v4_tokenizer,
        build_dataloader_fn=build_v4_dataloader,
        build_loss_fn=build_loss_fn,
    )
    register_train_spec(name, spec)


_register("llama3_ids", lambda job_config, **kwargs: DenomLoss())
_register("llama3_ids_plain", lambda job_config, **kwargs: cross_entropy_loss)
