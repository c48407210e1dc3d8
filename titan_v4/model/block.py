"""One DeepSeek-V4 layer: mHC(attention) then mHC(MoE) on the hc_mult residual streams."""

from __future__ import annotations

import torch
from torch import nn

from .args import DeepSeekV4ModelArgs
from .attention import Attention
from .mhc import HyperConnection
from .moe import V4MoE


class TransformerBlock(nn.Module):
    """One V4 layer on hc residual streams: mHC(attention) then mHC(MoE)."""

    def __init__(self, layer_id: int, args: DeepSeekV4ModelArgs, attn_type: str, hash_routed: bool):
        super().__init__()
        self.layer_id = layer_id
        self.attn_type = attn_type
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args, attn_type)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.moe = V4MoE(args, layer_id, hash_routed)
        self.moe_enabled = True  # torchtitan's parallelize / bias hook read this
        self.hc_attn = HyperConnection(args)
        self.hc_ffn = HyperConnection(args)
        # Depth-scaled init of the output projections (torchtitan's DeepSeek-V3 rule).
        self.weight_init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        token_ids: torch.Tensor | None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, S, hc, D], cos/sin [S, R/2], token_ids [B, S] (hash layers), doc_ids [B, S] (packed
        documents, see Attention) -> [B, S, hc, D]."""
        h, post, comb = self.hc_attn.collapse(x)
        x = self.hc_attn.expand(x, self.attention(self.attention_norm(h), cos, sin, doc_ids), post, comb)
        h, post, comb = self.hc_ffn.collapse(x)
        return self.hc_ffn.expand(x, self.moe(self.ffn_norm(h), token_ids), post, comb)

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.attention.init_weights(self.weight_init_std)
        self.moe.init_weights(self.weight_init_std, buffer_device)
        self.hc_attn.init_weights()
        self.hc_ffn.init_weights()
