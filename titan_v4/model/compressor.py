"""The KV compressors of CSA / HCA layers and the lightning indexer that picks CSA's entries.

A compressor pools every `ratio` tokens into one KV entry; the attention op then attends to those
entries next to the sliding window (docs/design.md, the sparse-attention contract). CSA's indexer
scores the entries of its own, smaller compressor and keeps the top-k per query.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan.models.utils import trunc_normal_

from .args import DeepSeekV4ModelArgs
from .precision import compute_dtype, full_precision
from .rope import apply_rope

# Indexer scores are computed in query chunks of this many rows to bound the [chunk, heads, entries]
# temporary (64 heads x 1024 entries x 1024 rows x 4 B = 256 MiB at Flash sizes and S = 4096).
INDEXER_QUERY_CHUNK = 1024


class Compressor(nn.Module):
    """Pools every `ratio` tokens into one KV entry (softmax-gated, with a learned position bias).

    HCA (`overlap=False`): entry w pools tokens [w*ratio, (w+1)*ratio).
    CSA (`overlap=True`): two series Ca | Cb of width head_dim each; entry w pools Ca of window w-1
    together with Cb of window w (2*ratio slots, stride ratio; window 0 has no predecessor).
    Entries are RMS-normed and roped at their window's first position. A trailing partial window
    produces no entry.
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, dim], cos/sin [S, R/2] -> entries [B, S // ratio, head_dim] in x's dtype."""
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
        weights = gate.softmax(dim=2, dtype=compute_dtype(kv.dtype)).to(kv.dtype)
        pooled = self.norm((kv * weights).sum(dim=2))
        return apply_rope(pooled, cos[: n * r : r], sin[: n * r : r])

    def init_weights(self, init_std: float) -> None:
        for linear in (self.wkv, self.wgate):
            trunc_normal_(linear.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.ape)
        self.norm.reset_parameters()


class Indexer(nn.Module):
    """Lightning indexer of a CSA layer: picks the top-k compressed entries for each query.

    score[t, s] = sum_h w[t,h] * relu(q[t,h] . k[s]) / sqrt(index_head_dim), w = weights_proj(x) /
    sqrt(index_n_heads), over the causally visible entries s < (t+1) // ratio; top-k per query with
    -1 for picks that are not visible (queries with fewer than k visible entries). Runs without
    gradient: hard top-k gives the indexer no LM-loss gradient (it is trained by its own KL loss).
    """

    def __init__(self, args: DeepSeekV4ModelArgs):
        super().__init__()
        self.n_heads = args.index_n_heads
        self.head_dim = args.index_head_dim
        self.topk = args.index_topk
        self.ratio = args.csa_ratio
        self.wq_b = nn.Linear(args.q_lora_rank, args.index_n_heads * args.index_head_dim, bias=False)
        self.weights_proj = nn.Linear(args.dim, args.index_n_heads, bias=False)
        self.compressor = Compressor(args.dim, args.index_head_dim, args.csa_ratio, overlap=True, eps=args.norm_eps)
        # Frozen until the indexer KL loss exists: parameters that never get a gradient would also
        # get no optimizer state, and a checkpoint without it cannot be resumed.
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, dim], q_latent [B, S, q_lora_rank] -> top-k entry ids [B, S, min(topk, S // ratio)] int32."""
        b, s, _ = x.shape
        keys = self.compressor(x, cos, sin).float()  # [B, T, dI]
        n_entries = keys.shape[1]
        q = apply_rope(self.wq_b(q_latent).view(b, s, self.n_heads, self.head_dim), cos, sin).float()
        head_weights = self.weights_proj(x).float() * self.n_heads**-0.5  # [B, S, H]
        visible = (torch.arange(s, device=x.device) + 1) // self.ratio  # entries < visible[t] are causal
        entry = torch.arange(n_entries, device=x.device)
        k = min(self.topk, n_entries)
        picks = []
        for start in range(0, s, INDEXER_QUERY_CHUNK):
            stop = min(start + INDEXER_QUERY_CHUNK, s)
            with full_precision(x):
                logits = torch.einsum("bshd,btd->bsht", q[:, start:stop], keys).relu_() * self.head_dim**-0.5
                scores = torch.einsum("bsht,bsh->bst", logits, head_weights[:, start:stop])
            future = entry.view(1, 1, -1) >= visible[start:stop].view(1, -1, 1)
            top = scores.masked_fill(future, float("-inf")).topk(k, dim=-1).indices
            picks.append(torch.where(top >= visible[start:stop].view(1, -1, 1), -1, top))
        return torch.cat(picks, dim=1).to(torch.int32)

    def init_weights(self, init_std: float) -> None:
        for linear in (self.wq_b, self.weights_proj):
            trunc_normal_(linear.weight, mean=0.0, std=init_std)
        self.compressor.init_weights(init_std)
