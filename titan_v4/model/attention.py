"""DeepSeek-V4 attention: one layer of any of the three kinds (sliding window, CSA, HCA).

The attention itself runs through the `custom_ops.sparse_attention` op; this module prepares its
inputs (low-rank query, the single latent KV head, RoPE, compressed entries, indexer picks) and
applies the grouped low-rank output projection. In CSA layers it also trains the lightning indexer
according to the phase (titan_v4/config.py, docs/deepseek_v4.md): the KL loss between the attention's
probability mass and the indexer's scores is attached to the layer's output gradient (aux_loss.py).
"""

from __future__ import annotations

import torch
from torch import nn

import custom_ops
from torchtitan.models.utils import trunc_normal_

from titan_v4.config import DENSE, FROZEN, WARMUP

from .args import DeepSeekV4ModelArgs
from .attn_kinds import CSA, SWA
from .aux_loss import AuxLoss
from .compressor import Compressor, Indexer
from .indexer_loss import indexer_kl
from .precision import compute_dtype, rms_normalize
from .rope import apply_rope


class Attention(nn.Module):
    """V4 attention: low-rank q with a per-head unweighted RMSNorm, one latent KV head (K = V),
    interleaved partial RoPE, sliding window + optional compressed entries (CSA / HCA), per-head
    sink, de-rotation of the output's rope slice, grouped low-rank output projection."""

    def __init__(self, args: DeepSeekV4ModelArgs, attn_type: str):
        super().__init__()
        self.attn_type = attn_type
        self.n_heads = args.n_heads
        self.head_dim = args.head_dim
        self.window_size = args.window_size
        self.o_groups = args.o_groups
        self.o_lora_rank = args.o_lora_rank
        self.norm_eps = args.norm_eps
        self.ratio = args.compress_ratio(attn_type)
        self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)
        self.q_norm = nn.RMSNorm(args.q_lora_rank, eps=args.norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, args.n_heads * args.head_dim, bias=False)
        self.wkv = nn.Linear(args.dim, args.head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(args.head_dim, eps=args.norm_eps)
        # Grouped output projection: heads split into o_groups groups, each projected to o_lora_rank
        # (weight [o_groups * o_lora_rank, n_heads * head_dim / o_groups], the checkpoint's layout).
        self.wo_a = nn.Linear(args.n_heads * args.head_dim // args.o_groups, args.o_groups * args.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(args.o_groups * args.o_lora_rank, args.dim, bias=False)
        self.attn_sink = nn.Parameter(torch.empty(args.n_heads, dtype=torch.float32))
        self.compressor = (
            Compressor(args.dim, args.head_dim, self.ratio, overlap=attn_type == CSA, eps=args.norm_eps)
            if attn_type != SWA
            else None
        )
        self.indexer = Indexer(args) if attn_type == CSA else None
        self.indexer_phase = args.indexer_phase
        self.indexer_loss_weight = args.indexer_loss_weight
        # CSA attends every visible entry in the dense phases, the indexer's top-k otherwise.
        self.dense_csa = args.indexer_phase in (DENSE, WARMUP)
        self.indexer_loss = AuxLoss("indexer_loss", "indexer_recall") if self.indexer is not None else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, S, dim] (normed), cos/sin [S, R/2] of this layer's RoPE, doc_ids [B, S] document labels
        of packed sequences (None: one document per row) -> [B, S, dim]. With doc_ids nothing crosses a
        document boundary: window, compressed entries, the indexer's scores, top-k and KL target."""
        b, s, _ = x.shape
        q_latent = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_latent).view(b, s, self.n_heads, self.head_dim)
        q = apply_rope(rms_normalize(q, self.norm_eps), cos, sin)
        # Under autocast the norms may return fp32 while q is bf16: the op takes one dtype.
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin).to(q.dtype)

        pool = topk = indexer_queries = None
        if self.compressor is not None and s >= self.ratio:
            pool = self.compressor(x, cos, sin, doc_ids).to(q.dtype)
            if self.indexer is not None:
                indexer_queries = self.indexer(x, q_latent, cos, sin, doc_ids)
                topk = None if self.dense_csa else self.indexer.select(indexer_queries, doc_ids)
        sink = self.attn_sink.to(compute_dtype(q.dtype))
        scale = self.head_dim**-0.5
        out, lse = custom_ops.sparse_attention(
            q, kv, sink, pool, topk, window=self.window_size, scale=scale, ratio=max(self.ratio, 1), doc_ids=doc_ids
        )
        # K = V carries RoPE into the output: rotate it back to the query's frame.
        out = apply_rope(out, cos, -sin).view(b, s, self.o_groups, -1)
        wo_a = self.wo_a.weight.view(self.o_groups, self.o_lora_rank, -1)
        out = self.wo_b(torch.einsum("bsgi,goi->bsgo", out, wo_a).flatten(2))
        if indexer_queries is not None and self.indexer_phase != FROZEN and torch.is_grad_enabled():
            out = self._attach_indexer_loss(out, indexer_queries, q, pool, lse, sink, topk, scale, doc_ids)
        return out

    def _attach_indexer_loss(self, out, queries, q, pool, lse, sink, topk, scale: float, doc_ids) -> torch.Tensor:
        """The indexer's KL to this layer's attention (over the top-k, or every visible entry in the
        dense phases), attached to ``out``'s gradient; the teacher is a target (no gradient)."""
        student = custom_ops.indexer_scores(*queries, topk, ratio=self.ratio, doc_ids=doc_ids)
        with torch.no_grad():
            log_mass, log_visible = custom_ops.indexer_teacher(
                q, pool, lse, sink, topk, scale=scale, ratio=self.ratio, doc_ids=doc_ids
            )
        loss, recall = indexer_kl(
            student, log_mass, log_visible, topk=self.indexer.topk, listed_are_topk=topk is not None
        )
        return self.indexer_loss(out, loss, self.indexer_loss_weight, recall)

    def init_weights(self, init_std: float) -> None:
        for linear in (self.wq_a, self.wq_b, self.wkv, self.wo_a):
            trunc_normal_(linear.weight, mean=0.0, std=0.02)
        trunc_normal_(self.wo_b.weight, mean=0.0, std=init_std)
        for norm in (self.q_norm, self.kv_norm):
            norm.reset_parameters()
        nn.init.zeros_(self.attn_sink)
        if self.compressor is not None:
            self.compressor.init_weights(0.02)
        if self.indexer is not None:
            self.indexer.init_weights(0.02)
            self.indexer_loss.reset(self.attn_sink.device)
