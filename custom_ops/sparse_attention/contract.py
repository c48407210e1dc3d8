"""The one definition of ``v4::sparse_attention``'s arguments and results, dtypes, and which
inputs the Triton kernels serve.

Every layer of the op (the public function in api.py, the registration, fakes and autograd in
ops.py, the reference and the kernels) passes the inputs around as one :class:`Inputs` tuple, and
the torch.library schemas are derived from it (custom_ops/schema.py), so adding an argument or an
output touches this file and the code that uses the new field, nothing else.
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class Inputs(NamedTuple):
    """The forward op's inputs, in its positional order (see api.py for the semantics)."""

    q: Tensor  # [B, S, H, D] bf16 / fp32 / fp64
    kv: Tensor  # [B, S, D], q's dtype (K = V)
    sink: Tensor  # [H] fp32 (fp64 allowed with fp64 q)
    pool: Optional[Tensor]  # [B, P, D], q's dtype
    topk: Optional[Tensor]  # [B, S, K] int32
    doc_ids: Optional[Tensor]  # [B, S] integer
    window: int
    scale: float
    ratio: int


class Outputs(NamedTuple):
    out: Tensor  # [B, S, H, D], q's dtype
    lse: Tensor  # [B, S, H] in compute_dtype(q.dtype); without the sink


class Grads(NamedTuple):
    """Gradients of the differentiable inputs, each named ``d<input>`` (dpool is None without a pool)."""

    dq: Tensor
    dkv: Tensor
    dsink: Tensor
    dpool: Optional[Tensor]


def compute_dtype(q_dtype: torch.dtype) -> torch.dtype:
    """The dtype the op computes in and returns lse in: fp32 for bf16 / fp32 queries, fp64 for fp64
    (so the fp64 reference is a true oracle, forward and backward)."""
    return torch.float64 if q_dtype == torch.float64 else torch.float32


def triton_applies(q: Tensor) -> bool:
    """Whether the Triton kernels serve these queries on CUDA: bf16 with D a multiple of 16 (what
    triton/fwd.py's check_inputs asserts). fp32 / fp64 queries and other D run the reference."""
    return q.dtype == torch.bfloat16 and q.shape[-1] % 16 == 0
