"""The KV compressors of CSA / HCA layers and the lightning indexer that picks CSA's entries.

A compressor pools every `ratio` tokens into one KV entry; the attention op then attends to those
entries next to the sliding window (docs/design.md, the sparse-attention contract). CSA's indexer
scores the entries of its own, smaller compressor and keeps the top-k per query (custom_ops.indexer).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import custom_ops
from torchtitan.models.utils import trunc_normal_

from titan_v4.config import FROZEN

from .args import DeepSeekV4ModelArgs
from .precision import compute_dtype, full_precision
from .rope import apply_rope


class Compressor(nn.Module):
    """Pools every `ratio` tokens into one KV entry (softmax-gated, with a learned position bias).

    HCA (`overlap=False`): entry w pools tokens [w*ratio, (w+1)*ratio).
    CSA (`overlap=True`): two series Ca | Cb of width head_dim each; entry w pools Ca of window w-1
    together with Cb of window w (2*ratio slots, stride ratio; window 0 has no predecessor).
    Entries are RMS-normed and roped at their window's first position. A trailing partial window
    produces no entry.

    Packed documents (``doc_ids``): an entry belongs to the document of its window's last token and
    pools only the slots of that document (the others get softmax weight 0), so nothing of another
    document enters it. An entry whose window straddles a boundary (or whose CSA predecessor window
    does) is still computed, but only from its own document's tokens; the attention never shows an
    entry whose window starts before the query's document (custom_ops/documents.py), so a document
    that starts at a multiple of ``ratio`` gets exactly the entries it would get alone.
    """

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.ratio = ratio
        self.overlap = overlap
        width = 2 * head_dim if overlap else head_dim
        self.wkv = nn.Linear(dim, width, bias=False)
        self.wgate = nn.Linear(dim, width, bias=False)
        self.ape = nn.Parameter(torch.empty(ratio, width, dtype=torch.float32))
        self.norm = nn.RMSNorm(head_dim, eps=eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, S, dim], cos/sin [S, R/2], doc_ids [B, S] or None -> entries [B, S // ratio, head_dim]
        in x's dtype."""
        b, s, _ = x.shape
        r, d = self.ratio, self.head_dim
        n = s // r
        if n == 0:
            return x.new_zeros(b, 0, d)
        x = x[:, : n * r]
        kv = self.wkv(x).view(b, n, r, -1)
        gate = self.wgate(x).view(b, n, r, -1) + self.ape  # fp32: the position bias is fp32
        if self.overlap:
            prev_kv = F.pad(kv[:, :-1, :, :d], (0, 0, 0, 0, 1, 0))
            no_prev = gate.new_full((b, 1, r, d), float("-inf"))  # softmax weight 0 for window 0
            prev_gate = torch.cat((no_prev, gate[:, :-1, :, :d]), dim=1)
            kv = torch.cat((prev_kv, kv[..., d:]), dim=2)  # [B, n, 2r, d]
            gate = torch.cat((prev_gate, gate[..., d:]), dim=2)
        if doc_ids is not None:
            gate = gate.masked_fill(~self._same_document(doc_ids[:, : n * r].view(b, n, r)), float("-inf"))
        weights = gate.softmax(dim=2, dtype=compute_dtype(kv.dtype)).to(kv.dtype)
        pooled = self.norm((kv * weights).sum(dim=2))
        return apply_rope(pooled, cos[: n * r : r], sin[: n * r : r])

    def _same_document(self, docs: torch.Tensor) -> torch.Tensor:
        """docs [B, n, r] (each window's document ids) -> [B, n, slots, 1] bool: the slot's token is in
        the document of its entry's last token (slots: r, or 2r with the predecessor window first)."""
        owner = docs[:, :, -1:]  # [B, n, 1]
        same = docs == owner
        if self.overlap:
            # Window 0 has no predecessor (its slots are -inf already): any value will do.
            prev = torch.cat((docs[:, :1], docs[:, :-1]), dim=1)
            same = torch.cat((prev == owner, same), dim=2)
        return same.unsqueeze(-1)

    def init_weights(self, init_std: float) -> None:
        for linear in (self.wkv, self.wgate):
            trunc_normal_(linear.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.ape)
        self.norm.reset_parameters()


class IndexerQueries(NamedTuple):
    """What the indexer scores with (the arguments of the custom_ops indexer ops)."""

    q: torch.Tensor  # [B, S, index_n_heads, index_head_dim], roped
    weights: torch.Tensor  # [B, S, index_n_heads] in compute_dtype(q.dtype), both scales folded in
    keys: torch.Tensor  # [B, S // ratio, index_head_dim], q's dtype


class Indexer(nn.Module):
    """Lightning indexer of a CSA layer: scores the compressed entries for each query and keeps the top-k.

    score[t, s] = sum_h w[t,h] * relu(q[t,h] . k[s]) / sqrt(index_head_dim), w = weights_proj(x) /
    sqrt(index_n_heads), over the causally visible entries s < (t+1) // ratio. Its inputs (the block
    input x and the shared query latent) are detached: hard top-k gives the indexer no gradient from
    the LM loss, and its own KL loss (indexer_loss.py) must not train anything but the indexer.
    Whether it builds a graph at all depends on the phase (frozen: no gradient).
    """

    def __init__(self, args: DeepSeekV4ModelArgs):
        super().__init__()
        self.n_heads = args.index_n_heads
        self.head_dim = args.index_head_dim
        self.topk = args.index_topk
        self.ratio = args.csa_ratio
        self.trained = args.indexer_phase != FROZEN
        self.wq_b = nn.Linear(args.q_lora_rank, args.index_n_heads * args.index_head_dim, bias=False)
        self.weights_proj = nn.Linear(args.dim, args.index_n_heads, bias=False)
        self.compressor = Compressor(args.dim, args.index_head_dim, args.csa_ratio, overlap=True, eps=args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
    ) -> IndexerQueries:
        """x [B, S, dim] (the normed block input), q_latent [B, S, q_lora_rank], doc_ids [B, S] or None
        -> the queries, weights and keys to score with, computed from detached inputs (with a graph
        only when trained)."""
        b, s, _ = x.shape
        x, q_latent = x.detach(), q_latent.detach()
        with torch.set_grad_enabled(self.trained and torch.is_grad_enabled()):
            q = apply_rope(self.wq_b(q_latent).view(b, s, self.n_heads, self.head_dim), cos, sin)
            keys = self.compressor(x, cos, sin, doc_ids).to(q.dtype)
            with full_precision(x):  # the head weights in compute_dtype, whatever x's dtype
                dtype = compute_dtype(q.dtype)
                scale = (self.n_heads * self.head_dim) ** -0.5
                weights = F.linear(x.to(dtype), self.weights_proj.weight.to(dtype)) * scale
        return IndexerQueries(q, weights, keys)

    def select(self, queries: IndexerQueries, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Top-k entry ids [B, S, min(topk, S // ratio)] int32 among the entries visible in the query's
        document, -1 where fewer are visible."""
        k = min(self.topk, queries.keys.shape[1])
        return custom_ops.indexer_topk(*queries, k=k, ratio=self.ratio, doc_ids=doc_ids)

    def init_weights(self, init_std: float) -> None:
        for linear in (self.wq_b, self.weights_proj):
            trunc_normal_(linear.weight, mean=0.0, std=init_std)
        self.compressor.init_weights(init_std)
