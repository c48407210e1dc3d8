"""DeepSeek-V4 multi-token prediction (MTP) block (docs/deepseek_v4.md, "Multi-token prediction").

A full V4 block (sliding-window attention with the main RoPE, learned routing, its own mHC) fed with
`e_proj(enorm(embed(next tokens))) + h_proj(hnorm(h))` where `h` are the previous depth's hc
streams (the main model's final streams for depth 1, before its HyperHead). Each depth has its own
`norm` and HyperHead; the embedding and the output head are shared with the main model.
"""

from __future__ import annotations

import torch
from torch import nn

from torchtitan.models.utils import trunc_normal_

from .args import DeepSeekV4ModelArgs
from .attn_kinds import SWA
from .block import TransformerBlock
from .mhc import HyperHead


class MTPBlock(TransformerBlock):
    def __init__(self, layer_id: int, args: DeepSeekV4ModelArgs):
        super().__init__(layer_id, args, attn_type=SWA, hash_routed=False)
        self.e_proj = nn.Linear(args.dim, args.dim, bias=False)
        self.h_proj = nn.Linear(args.dim, args.dim, bias=False)
        self.enorm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.hnorm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.hc_head = HyperHead(args)

    def forward(
        self,
        h: torch.Tensor,
        next_embed: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h [B, S, hc, D] previous streams, next_embed [B, S, D] embedded next tokens, doc_ids [B, S] of
        the positions (packed documents) -> [B, S, hc, D].

        The token term is broadcast to every stream; hnorm normalises each stream. Near a document's
        end the next tokens come from the following document: those positions have no target (the
        loss ignores them, loss.py) and, as the attention stays inside the document and is causal,
        nothing there reaches a position that has one.
        """
        x = self.e_proj(self.enorm(next_embed)).unsqueeze(2) + self.h_proj(self.hnorm(h))
        return super().forward(x, cos, sin, token_ids=None, doc_ids=doc_ids)

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        super().init_weights(buffer_device)
        for linear in (self.e_proj, self.h_proj):
            trunc_normal_(linear.weight, mean=0.0, std=0.02)
        for norm in (self.enorm, self.hnorm, self.norm):
            norm.reset_parameters()
        self.hc_head.init_weights()
