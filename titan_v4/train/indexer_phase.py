"""What the indexer phase (``[v4] indexer_phase``, titan_v4/config.py) changes outside the model.

Every parameter stays trainable and in the optimizer in every phase, so the set of optimizer
states, and with it a checkpoint, is the same whatever the phase (a resume may switch phases). The
phase decides which parameters get gradients instead:

* frozen: the indexer runs without a graph, so its parameters get no gradient;
* warmup: the model's backward still runs (it carries each CSA layer's KL gradient, attached to the
  layer's output), then every non-indexer gradient is dropped before clipping and the optimizer step,
  and the expert biases do not move (titan_v4/train/optimizer.py): only the indexer trains;
* dense / sparse: everything trains (the indexer by its KL only: its inputs are detached).
"""

from __future__ import annotations

from torch import nn

from titan_v4.config import WARMUP
from titan_v4.model.compressor import Indexer


def indexer_phase(model_parts: list[nn.Module]) -> str | None:
    """The phase the model parts were built for (every part carries the same model args); None for a
    model without a lightning indexer (V4Trainer also runs torchtitan's other models)."""
    return getattr(getattr(model_parts[0], "model_args", None), "indexer_phase", None)


def backbone_frozen(model_parts: list[nn.Module]) -> bool:
    """True in the warmup phase: only the indexer's parameters may change."""
    return indexer_phase(model_parts) == WARMUP


def drop_backbone_grads(model_parts: list[nn.Module]) -> None:
    """Set the gradient of every parameter outside the indexers to None (optimizers skip those)."""
    for part in model_parts:
        indexer = {id(p) for m in part.modules() if isinstance(m, Indexer) for p in m.parameters()}
        for p in part.parameters():
            if id(p) not in indexer:
                p.grad = None
