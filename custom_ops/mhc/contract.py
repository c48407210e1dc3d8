"""The one definition of the mHC ops' arguments and results, dtypes, and which inputs the Triton
kernels serve.

Six ops (docs/design.md, "Op contracts"; reference.py states the math):

* ``v4::mhc_collapse`` (:class:`CollapseInputs` -> :class:`CollapseOutputs`), HyperConnection.collapse;
  its backward ``v4::mhc_collapse_bwd`` takes the gradients ``dcollapsed, dpost, dcomb`` followed by
  :class:`CollapseSaved` and returns :class:`Grads`;
* ``v4::mhc_head`` (:class:`HeadInputs` -> :class:`HeadOutputs`), HyperHead.forward; its backward
  ``v4::mhc_head_bwd`` takes ``dout`` followed by :class:`HeadSaved` and returns :class:`Grads`;
* ``v4::mhc_expand`` (:class:`ExpandInputs` -> ``new [..., H, D]``), HyperConnection.expand; its
  backward ``v4::mhc_expand_bwd`` takes ``dnew`` followed by :class:`ExpandInputs` and returns
  :class:`ExpandGrads`.

Streams are ``x [..., H, D]`` (H = hc_mult streams of width D), ``K = H * D``, M mixes (``(2 + H) * H``
for the collapse, H for the head). The torch.library schemas are derived from these NamedTuples
(custom_ops/schema.py).
"""

from typing import NamedTuple

import torch
from torch import Tensor

#: The stream dtypes the ops take: bf16 on GPU; the reference also takes fp32 / fp64.
STREAM_DTYPES = (torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics, logits and gates for streams of ``dtype``: fp64 for fp64 streams
    (oracle mode), fp32 for bf16 / fp32. fn, base, scale, post and comb have it too."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_applies(x: Tensor) -> bool:
    """Whether the Triton kernels serve these streams on CUDA: bf16, H a power of two (``tl.arange``)
    up to 16, at least one element. Other streams run the reference."""
    hc = x.shape[-2]
    return x.dtype == torch.bfloat16 and hc & (hc - 1) == 0 and hc <= 16 and x.numel() > 0


# ---------------------------------------------------------------------------------- collapse
class CollapseInputs(NamedTuple):
    """``v4::mhc_collapse`` inputs, in positional order (see api.py for the semantics)."""

    x: Tensor  # [..., H, D] streams, bf16 / fp32 / fp64
    fn: Tensor  # [(2 + H) * H, K] mixing weights, compute_dtype(x.dtype)
    base: Tensor  # [(2 + H) * H] mixing biases, fn's dtype
    scale: Tensor  # [3] gate scales (pre, post, comb), fn's dtype
    hc_eps: float  # >= 0: added to pre, and the Sinkhorn eps
    norm_eps: float  # > 0: the rms statistic's eps
    sinkhorn_iters: int  # >= 1


class CollapseOutputs(NamedTuple):
    collapsed: Tensor  # [..., D], x's dtype
    post: Tensor  # [..., H], compute dtype
    comb: Tensor  # [..., H, H], compute dtype
    # For the backward only (non-differentiable): the fp32 (fp64) mixing logits and rms statistic,
    # 4 * (M + 1) bytes per token instead of a second pass over the streams.
    logits: Tensor  # [..., M]
    rstd: Tensor  # [...]


# ---------------------------------------------------------------------------------- head
class HeadInputs(NamedTuple):
    """``v4::mhc_head`` inputs, in positional order: as :class:`CollapseInputs` with M = H mixes and
    one gate scale, no Sinkhorn."""

    x: Tensor  # [..., H, D] streams, bf16 / fp32 / fp64
    fn: Tensor  # [H, K], compute_dtype(x.dtype)
    base: Tensor  # [H], fn's dtype
    scale: Tensor  # [1], fn's dtype
    hc_eps: float
    norm_eps: float


class HeadOutputs(NamedTuple):
    out: Tensor  # [..., D], x's dtype
    logits: Tensor  # [..., H], compute dtype; for the backward only (non-differentiable)
    rstd: Tensor  # [...], compute dtype; for the backward only (non-differentiable)


# ---------------------------------------------------------------- collapse and head backward
class HeadSaved(NamedTuple):
    """What ``v4::mhc_head_bwd`` takes after ``dout``: the forward's tensor inputs, its logits and
    rstd, and hc_eps."""

    x: Tensor
    fn: Tensor
    base: Tensor
    scale: Tensor
    logits: Tensor
    rstd: Tensor
    hc_eps: float


#: What ``v4::mhc_collapse_bwd`` takes after ``dcollapsed, dpost, dcomb``: the head's saved values
#: (with the collapse's fn, base and scale) and the Sinkhorn iterations.
CollapseSaved = NamedTuple("CollapseSaved", [*HeadSaved.__annotations__.items(), ("sinkhorn_iters", int)])


class Grads(NamedTuple):
    """Gradients of the collapse's and the head's differentiable inputs, each named ``d<input>``:
    dx in x's dtype, the others in fn's dtype."""

    dx: Tensor
    dfn: Tensor
    dbase: Tensor
    dscale: Tensor


# ---------------------------------------------------------------------------------- expand
class ExpandInputs(NamedTuple):
    """``v4::mhc_expand`` inputs, in positional order; its result is ``new [..., H, D]`` in x's dtype."""

    x: Tensor  # [..., H, D] streams, bf16 / fp32 / fp64
    out: Tensor  # [..., D] the sub-layer output, x's dtype
    post: Tensor  # [..., H], compute_dtype(x.dtype)
    comb: Tensor  # [..., H, H], compute_dtype(x.dtype)


class ExpandGrads(NamedTuple):
    dx: Tensor  # x's dtype
    dout: Tensor  # out's dtype
    dpost: Tensor
    dcomb: Tensor
