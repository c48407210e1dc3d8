"""The one definition of ``v4::sinkhorn``'s arguments, dtypes, and which inputs the Triton kernels
serve.

The op maps logits ``[..., N, N]`` to near doubly stochastic matrices of the same shape and dtype
(reference.py); its backward ``v4::sinkhorn_bwd`` takes the output's gradient ``grad`` followed by
the same arguments and returns the logits' gradient. The torch.library schemas are derived from
:class:`Inputs` (custom_ops/schema.py).
"""

from typing import NamedTuple

import torch
from torch import Tensor


class Inputs(NamedTuple):
    """``v4::sinkhorn`` inputs, in positional order (see api.py for the semantics)."""

    logits: Tensor  # [..., N, N] fp32 (fp64 for tests)
    iters: int  # >= 1
    eps: float  # >= 0


#: The dtypes of logits the op takes; it computes in that dtype.
DTYPES = (torch.float32, torch.float64)


def triton_applies(logits: Tensor) -> bool:
    """Whether the Triton kernels serve these logits on CUDA: fp32 with N a power of two (``tl.arange``)
    up to 16. fp64 logits and other N run the reference."""
    n = logits.shape[-1]
    return logits.dtype == torch.float32 and n & (n - 1) == 0 and n <= 16
