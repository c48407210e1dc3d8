"""Manifold-constrained hyper-connections (mHC): the hc_mult residual streams of DeepSeek-V4.

Every sub-layer (attention, MoE) sits between a HyperConnection's `collapse` (streams -> the
sub-layer input) and `expand` (sub-layer output + Sinkhorn-mixed streams -> new streams); the
HyperHead collapses the final streams once more before the norm and the output head. The mixing
statistics, logits and the Sinkhorn projection run in fp32 (compute_dtype) whatever the streams'
dtype. The math runs in the fused ops of custom_ops.mhc (Triton on CUDA for bf16 streams, the
reference elsewhere; their reference.py states it in full).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

import custom_ops
from torchtitan.models.utils import trunc_normal_

from .args import DeepSeekV4ModelArgs
from .precision import compute_dtype, full_precision


def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """param.copy_(full) for a plain or an FSDP-sharded (DTensor) parameter; full is unsharded."""
    if isinstance(param, DTensor):
        full = distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    param.copy_(full.to(param.device))


# Init, inferred (docs/deepseek_v4.md, "mHC init"): small gating factors (the mHC paper's
# alpha = 0.01) and collapse logits whose sigmoid averages the streams at the start
# (sigmoid(-log(hc - 1)) = 1 / hc).
MHC_GATE_INIT = 0.01


def stream_average_logit(hc: int) -> float:
    return -math.log(hc - 1) if hc > 1 else 0.0


class HyperConnection(nn.Module):
    """mHC around one sub-layer: collapse hc streams into the sub-layer input, then mix the
    residual streams with a Sinkhorn-projected (doubly stochastic) matrix and add the output.

    From the RMS-normalised flattened streams (fp32): pre = sigmoid(.)+eps collapse weights [hc],
    post = 2*sigmoid(.) output placement [hc], comb = sinkhorn(.) stream mixer [hc, hc].
    """

    def __init__(self, args: DeepSeekV4ModelArgs):
        super().__init__()
        hc = args.hc_mult
        self.hc_mult = hc
        self.sinkhorn_iters = args.hc_sinkhorn_iters
        self.hc_eps = args.hc_eps
        self.norm_eps = args.norm_eps
        mixes = (2 + hc) * hc
        self.fn = nn.Parameter(torch.empty(mixes, hc * args.dim, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(mixes, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(3, dtype=torch.float32))

    def collapse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, hc, D] -> (sub-layer input [B, S, D] in x's dtype, post [B, S, hc] and comb
        [B, S, hc, hc] in compute_dtype: fp32, fp64 for an fp64 model)."""
        dtype = compute_dtype(x.dtype)
        with full_precision(x):
            return custom_ops.mhc_collapse(
                x, self.fn.to(dtype), self.base.to(dtype), self.scale.to(dtype),
                hc_eps=self.hc_eps, norm_eps=self.norm_eps, sinkhorn_iters=self.sinkhorn_iters,
            )  # fmt: skip

    @staticmethod
    def expand(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """New streams [B,S,hc,D] in x's dtype: stream k = post[k] * out + sum_j comb[j, k] * x[j]."""
        return custom_ops.mhc_expand(x, out, post, comb)

    def init_weights(self) -> None:
        # Collapse = stream average, post = 1 (logit 0), uniform mixer (logits 0).
        trunc_normal_(self.fn, mean=0.0, std=0.02)
        hc = self.hc_mult
        base = torch.zeros(self.base.shape, dtype=self.base.dtype)
        base[:hc] = stream_average_logit(hc)
        with torch.no_grad():
            copy_full_(self.base, base)
            self.scale.fill_(MHC_GATE_INIT)


class HyperHead(nn.Module):
    """Final collapse of the hc streams: sum_k (sigmoid(fn . x_norm * scale + base)_k + eps) x_k."""

    def __init__(self, args: DeepSeekV4ModelArgs):
        super().__init__()
        self.hc_eps = args.hc_eps
        self.norm_eps = args.norm_eps
        self.fn = nn.Parameter(torch.empty(args.hc_mult, args.hc_mult * args.dim, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(args.hc_mult, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(1, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, hc, D] -> [B, S, D] in x's dtype."""
        dtype = compute_dtype(x.dtype)
        with full_precision(x):
            return custom_ops.hyper_head(
                x, self.fn.to(dtype), self.base.to(dtype), self.scale.to(dtype), hc_eps=self.hc_eps, norm_eps=self.norm_eps
            )

    def init_weights(self) -> None:
        trunc_normal_(self.fn, mean=0.0, std=0.02)
        with torch.no_grad():
            self.base.fill_(stream_average_logit(self.fn.shape[0]))
            self.scale.fill_(MHC_GATE_INIT)
