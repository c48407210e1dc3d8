"""The one definition of the indexer ops' arguments and results.

Three ops serve the lightning indexer of a CSA layer (docs/design.md, "Op contracts"):

* ``v4::indexer_scores`` (differentiable): the index scores ``I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s])``
  at every entry (``indices=None``) or at listed entries, -inf where an entry is not visible;
* ``v4::indexer_topk`` (no gradient): the top-k visible entries by that score, fused with the scoring so
  that ``[S, H, P]`` is never built;
* ``v4::indexer_teacher`` (no gradient): the KL target, the main attention's head-summed probability mass
  on the same entries, computed from the attention queries, the pool and the attention op's lse.

Visibility (the CSA rule of the sparse-attention op): entry s is visible to query t iff
``s < (t + 1) // ratio`` (all of its source tokens are at or before t) and, with ``doc_ids`` (packed
documents, custom_ops/documents.py), ``s * ratio >= doc_start(t)`` (all of them in t's document). A
listed index that is negative (-1 = padding), ``>= P`` or not visible is ignored: its score / mass is
-inf.

Every layer of an op (public function in api.py, registration in ops.py, the reference, the Triton
launchers) passes the inputs around as one NamedTuple below, and the torch.library schemas are derived
from them (custom_ops/schema.py).
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class ScoresInputs(NamedTuple):
    """``v4::indexer_scores`` inputs, in positional order."""

    q: Tensor  # [B, S, H, D] indexer queries (roped), bf16 / fp32 / fp64
    weights: Tensor  # [B, S, H] per-head weights (every scale folded in), compute_dtype(q.dtype)
    keys: Tensor  # [B, P, D] the indexer's compressed keys, q's dtype
    indices: Optional[Tensor]  # [B, S, K] int32 listed entries, or None = every entry 0..P-1
    ratio: int
    doc_ids: Optional[Tensor] = None  # [B, S] integer document labels, or None = one document


class TopkInputs(NamedTuple):
    """``v4::indexer_topk`` inputs, in positional order."""

    q: Tensor  # as ScoresInputs
    weights: Tensor
    keys: Tensor
    k: int  # entries to keep per query (>= 1)
    ratio: int
    doc_ids: Optional[Tensor] = None  # as ScoresInputs


class TeacherInputs(NamedTuple):
    """``v4::indexer_teacher`` inputs, in positional order (the main attention's side)."""

    q: Tensor  # [B, S, Hq, Dq] the attention op's queries (normed, roped), bf16 / fp32 / fp64
    pool: Tensor  # [B, P, Dq] the attention op's compressed entries, q's dtype
    lse: Tensor  # [B, S, Hq] the attention op's lse (without the sink), compute_dtype(q.dtype)
    sink: Tensor  # [Hq] the attention sink logits, fp32 (fp64 allowed with fp64 q)
    indices: Optional[Tensor]  # [B, S, K] int32, or None = every entry 0..P-1
    scale: float  # the attention's logit scale
    ratio: int
    doc_ids: Optional[Tensor] = None  # as ScoresInputs


class ScoresGrads(NamedTuple):
    """Gradients of ``v4::indexer_scores``'s differentiable inputs, named ``d<input>``."""

    dq: Tensor
    dweights: Tensor
    dkeys: Tensor


class TeacherOutputs(NamedTuple):
    # [B, S, K or P] log of sum_h p[h, t, s] (p = the attention probabilities, sink in the denominator)
    # at the listed (or every) entry; -inf where not visible. compute_dtype(q.dtype).
    log_mass: Tensor
    # [B, S] log of the same mass summed over EVERY visible entry (-inf for a query that sees none).
    log_visible: Tensor


def compute_dtype(q_dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16 / fp32 inputs, fp64 for fp64 (so the fp64 reference is a true oracle)."""
    return torch.float64 if q_dtype == torch.float64 else torch.float32


def n_listed(indices: Optional[Tensor], n_entries: int) -> int:
    """Scores / masses per query: K with indices, P (every entry) without."""
    return n_entries if indices is None else indices.shape[-1]


def triton_applies(q: Tensor) -> bool:
    """Whether the Triton kernels serve these queries on CUDA: bf16 or fp32. fp64 stays on the
    reference: it is the oracle."""
    return q.dtype in (torch.bfloat16, torch.float32)
