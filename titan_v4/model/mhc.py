"""Manifold-constrained hyper-connections (mHC): the hc_mult residual streams of DeepSeek-V4.

Every sub-layer (attention, MoE) sits between a HyperConnection's `collapse` (streams -> the
sub-layer input) and `expand` (sub-layer output + Sinkhorn-mixed streams -> new streams); the
HyperHead collapses the final streams once more before the norm and the output head. The mixing
statistics, logits and the Sinkhorn projection run in fp32 (compute_dtype) whatever the streams'
dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

import custom_ops
from torchtitan.models.utils import trunc_normal_

from .args import DeepSeekV4ModelArgs
from .precision import full_precision, rms_normalize


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
        """x [B, S, hc, D] -> (sub-layer input [B, S, D] in x's dtype, post [B, S, hc] fp32, comb [B, S, hc, hc] fp32)."""
        hc = self.hc_mult
        with full_precision(x):
            flat = rms_normalize(x.flatten(2).float(), self.norm_eps)
            pre, post, comb = F.linear(flat, self.fn.float()).split((hc, hc, hc * hc), dim=-1)
            pre_base, post_base, comb_base = self.base.float().split((hc, hc, hc * hc))
            scale = self.scale.float()
            pre = torch.sigmoid(pre * scale[0] + pre_base) + self.hc_eps
            post = 2 * torch.sigmoid(post * scale[1] + post_base)
            comb_logits = comb.unflatten(-1, (hc, hc)) * scale[2] + comb_base.view(hc, hc)
            comb = custom_ops.sinkhorn(comb_logits, self.sinkhorn_iters, self.hc_eps)
            collapsed = (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)
        return collapsed, post, comb

    @staticmethod
    def expand(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """New streams [B,S,hc,D]: stream k = post[k] * out + sum_j comb[j, k] * x[j]."""
        dtype = x.dtype
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), x)

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
        with full_precision(x):
            flat = rms_normalize(x.flatten(2).float(), self.norm_eps)
            pre = torch.sigmoid(F.linear(flat, self.fn.float()) * self.scale.float() + self.base.float()) + self.hc_eps
            return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)

    def init_weights(self) -> None:
        trunc_normal_(self.fn, mean=0.0, std=0.02)
        with torch.no_grad():
            self.base.fill_(stream_average_logit(self.fn.shape[0]))
            self.scale.fill_(MHC_GATE_INIT)
