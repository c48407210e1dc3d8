"""The V4 training loss: next-token cross-entropy plus the weighted MTP losses.

torchtitan divides what the loss function returns by the global number of valid (non-ignored)
tokens, so the loss is a SUM. The sequence-wise balance loss and the indexer's KL loss are not here:
each layer attaches its own to its output's gradient (aux_loss.py), which also works under pipeline
parallelism. The loss records the detached sums of its two terms for the training log
(titan_v4/train/loss_terms.py).

With ``compile.enable`` and "loss" in ``compile.components`` (torchtitan's default) each head's
cross-entropy is one compiled function: the compiler fuses the fp32 upcast, log-softmax and the
target gather, keeps the bf16 logits and the per-row log-sum-exp for the backward instead of an fp32
log-softmax, and writes the bf16 logit gradient in one pass: each head holds half the bytes across
the backward (bf16 logits instead of an fp32 log-softmax) and reads its logits once fewer. How much
that saves on flash_proxy is measured in docs/perf/2026-11-27-step-h100.md.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss
from torchtitan.config import JobConfig
from torchtitan.tools.logging import logger

from titan_v4.config import v4_settings


def mtp_targets(labels: torch.Tensor, depth: int) -> torch.Tensor:
    """[B, S - depth]: the target of MTP depth `depth` (1-based) at positions 0 .. S - depth - 1.

    Position i predicts labels[:, i + depth] (token i + 1 + depth), and only when every next-token
    label from i to i + depth counts: an ignored label marks a position whose next token starts a new
    document (titan_v4/data/documents.py), so a target past a document boundary is ignored too.
    """
    ignored = (labels == IGNORE_INDEX).to(torch.int32)
    # Ignored labels among labels[i .. i + depth], from a cumulative sum.
    counts = F.pad(ignored.cumsum(dim=1), (1, 0))
    crossing = counts[:, depth + 1 :] - counts[:, : -depth - 1] > 0
    return labels[:, depth:].masked_fill(crossing, IGNORE_INDEX)


def mtp_cross_entropy(mtp_logits: torch.Tensor, labels: torch.Tensor, depth: int, cross_entropy=cross_entropy_loss) -> torch.Tensor:
    """Sum CE of MTP depth `depth` (1-based) against :func:`mtp_targets`.

    mtp_logits [B, S, V], labels [B, S] (labels[:, i] = token i+1). The last `depth` positions have
    no target. `cross_entropy(logits, labels)` is the sum cross-entropy to use (eager or compiled).
    """
    return cross_entropy(mtp_logits[:, :-depth], mtp_targets(labels, depth))


class V4Loss:
    """`loss(pred, labels)`: pred is logits [B,S,V] or (logits, mtp_logits_1, ..., mtp_logits_D); returns a SUM.

    total = CE(logits) + mtp_loss_weight / D * sum_k CE_k (DeepSeek-V3's MTP objective, D depths).
    `denom`, when set (pipeline parallelism, see train.py), divides the result so each microbatch
    loss is already token-normalised.
    """

    def __init__(self, mtp_loss_weight: float, compile_backend: str | None = None):
        """compile_backend: a torch.compile backend for each head's cross-entropy; None runs it eagerly."""
        if mtp_loss_weight < 0:
            raise ValueError(f"v4.mtp_loss_weight={mtp_loss_weight} is invalid: must be >= 0")
        self.mtp_loss_weight = mtp_loss_weight
        # One static graph per logits shape (the LM head's S rows, depth k's S - k): few and fixed.
        self.cross_entropy = (
            cross_entropy_loss if compile_backend is None
            else torch.compile(cross_entropy_loss, backend=compile_backend, dynamic=False)
        )  # fmt: skip
        self.denom: torch.Tensor | int | None = None
        # {term: (sum, count)} of the detached per-token cross-entropies since the last read_values().
        self._values: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, pred, labels: torch.Tensor) -> torch.Tensor:
        logits, *mtp_logits = (pred,) if isinstance(pred, torch.Tensor) else pred
        loss = self.cross_entropy(logits, labels)
        self._record("lm_loss", loss, labels)
        if mtp_logits and self.mtp_loss_weight > 0:
            mtp = 0.0
            for k, m in enumerate(mtp_logits):
                targets = mtp_targets(labels, k + 1)
                mtp_k = self.cross_entropy(m[:, : -(k + 1)], targets)
                self._record("mtp_loss", mtp_k, targets)
                mtp = mtp + mtp_k
            loss = loss + mtp * (self.mtp_loss_weight / len(mtp_logits))
        return loss if self.denom is None else loss / self.denom

    def _record(self, term: str, loss_sum: torch.Tensor, labels: torch.Tensor) -> None:
        total, count = self._values.get(term, (0.0, 0))
        self._values[term] = (total + loss_sum.detach(), count + (labels != IGNORE_INDEX).sum())

    @contextlib.contextmanager
    def recording_paused(self):
        """Losses computed inside are not recorded (a pipeline's shape inference on placeholder data)."""
        saved, self._values = self._values, {}
        try:
            yield
        finally:
            self._values = saved

    def read_values(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"lm_loss" | "mtp_loss": (sum of the per-token CE, number of tokens)}`` since the last read."""
        values, self._values = self._values, {}
        return values


def build_v4_loss(job_config: JobConfig, **kwargs) -> V4Loss:
    del kwargs
    weight = float(v4_settings(job_config).mtp_loss_weight)
    compiled = job_config.compile.enable and "loss" in job_config.compile.components
    backend = job_config.compile.backend if compiled else None
    how = f"compiled ({backend})" if compiled else "eager"
    logger.info(f"V4 loss: cross-entropy + {weight} x MTP cross-entropy (sum; normalised by the trainer), {how}")
    return V4Loss(weight, compile_backend=backend)


__all__ = ["IGNORE_INDEX", "V4Loss", "build_v4_loss", "mtp_cross_entropy"]
