"""DeepSeek-V4 transformer in torchtitan's model layout.

Data flow (shapes with B batch, S sequence, hc = hc_mult residual streams, D = dim):

    tokens [B,S] -> tok_embeddings -> copy into hc streams [B,S,hc,D]
    -> layers (each: mHC collapse -> RMSNorm -> Attention -> mHC expand, then the same around the MoE)
    -> hc_head (HyperHead: streams -> [B,S,D]) -> norm -> output [B,S,vocab]
    (+ MTP blocks on the final streams, see mtp.py)

The math follows HF transformers' modeling_deepseek_v4.py (the numerical oracle) and the official
inference code; parameter names follow the official checkpoint inside torchtitan's module names
(`attention`, `moe`, `attention_norm`, ...). Attention and the Sinkhorn projection run through
`custom_ops` (torch.library ops with CPU and CUDA implementations).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

import custom_ops
from torchtitan.models.utils import trunc_normal_
from torchtitan.protocols.model import ModelProtocol

from .args import CSA, SWA, DeepSeekV4ModelArgs
from .moe import V4MoE
from .precision import compute_dtype, full_precision

# Indexer scores are computed in query chunks of this many rows to bound the [chunk, heads, entries]
# temporary (64 heads x 1024 entries x 1024 rows x 4 B = 256 MiB at Flash sizes and S = 4096).
INDEXER_QUERY_CHUNK = 1024


# ---------------------------------------------------------------------- norms and RoPE
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """param.copy_(full) for a plain or an FSDP-sharded (DTensor) parameter; full is unsharded."""
    if isinstance(param, DTensor):
        full = distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    param.copy_(full.to(param.device))


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMSNorm over the last dim, statistics in fp32 (fp64 for fp64), result in x's dtype."""
    return x * torch.rsqrt(x.to(compute_dtype(x.dtype)).square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_inv_freq(args: DeepSeekV4ModelArgs, theta: float, yarn: bool) -> torch.Tensor:
    """[rope_head_dim // 2] fp32 inverse frequencies; YaRN (HF / official, no mscale) when `yarn`."""
    dim = args.rope_head_dim
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    if not yarn:
        return inv_freq

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(args.original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(args.beta_fast)), 0)
    high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # 1 = keep the original frequency (high-frequency dims)
    interpolated = 1.0 / (args.rope_factor * pos_freqs)
    return interpolated * (1 - extrapolation_weight) + inv_freq * extrapolation_weight


def rope_table(args: DeepSeekV4ModelArgs, theta: float, yarn: bool, device=None) -> torch.Tensor:
    """[2, max_seq_len, rope_head_dim // 2] fp32: cos and sin of position x inverse frequency."""
    inv_freq = rope_inv_freq(args, theta, yarn).to(device)
    positions = torch.arange(args.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    return torch.stack((angles.cos(), angles.sin()))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the trailing `2 * cos.shape[-1]` channels of x, in fp32.

    x [B, S, D] or [B, S, H, D]; cos / sin [S, R/2] for x's positions. Channel pair (2i, 2i+1) of
    the rope slice is rotated by angle i. `apply_rope(x, cos, -sin)` undoes it.
    """
    r = 2 * cos.shape[-1]
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    nope, rope = x[..., :-r], x[..., -r:]
    pairs = rope.to(compute_dtype(x.dtype)).unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((nope, rotated.to(x.dtype)), dim=-1)


# ---------------------------------------------------------------------- compressors and indexer
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


# ---------------------------------------------------------------------- attention
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, dim] (normed), cos/sin [S, R/2] of this layer's RoPE -> [B, S, dim]."""
        b, s, _ = x.shape
        q_latent = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_latent).view(b, s, self.n_heads, self.head_dim)
        q = apply_rope(rms_normalize(q, self.norm_eps), cos, sin)
        # Under autocast the norms may return fp32 while q is bf16: the op takes one dtype.
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin).to(q.dtype)

        pool = topk = None
        if self.compressor is not None and s >= self.ratio:
            pool = self.compressor(x, cos, sin).to(q.dtype)
            if self.indexer is not None:
                topk = self.indexer(x, q_latent, cos, sin)
        out, _ = custom_ops.sparse_attention(
            q, kv, self.attn_sink.to(compute_dtype(q.dtype)), pool, topk,
            window=self.window_size, scale=self.head_dim**-0.5, ratio=max(self.ratio, 1),
        )  # fmt: skip
        # K = V carries RoPE into the output: rotate it back to the query's frame.
        out = apply_rope(out, cos, -sin).view(b, s, self.o_groups, -1)
        wo_a = self.wo_a.weight.view(self.o_groups, self.o_lora_rank, -1)
        out = torch.einsum("bsgi,goi->bsgo", out, wo_a)
        return self.wo_b(out.flatten(2))

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


# ---------------------------------------------------------------------- hyper-connections
# INFERRED init (V4_REFERENCE §5): small gating factors (the mHC paper's alpha = 0.01) and collapse
# logits whose sigmoid averages the streams at the start (sigmoid(-log(hc - 1)) = 1 / hc).
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


# ---------------------------------------------------------------------- block and model
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
        """x [B, S, hc, D], cos/sin [S, R/2], token_ids [B, S] (hash layers) -> [B, S, hc, D]."""
        h, post, comb = self.hc_attn.collapse(x)
        x = self.hc_attn.expand(x, self.attention(self.attention_norm(h), cos, sin), post, comb)
        h, post, comb = self.hc_ffn.collapse(x)
        return self.hc_ffn.expand(x, self.moe(self.ffn_norm(h), token_ids), post, comb)

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.attention.init_weights(self.weight_init_std)
        self.moe.init_weights(self.weight_init_std, buffer_device)
        self.hc_attn.init_weights()
        self.hc_ffn.init_weights()


class DeepSeekV4Model(ModelProtocol):
    """DeepSeek-V4 (Flash / Pro) for torchtitan.

    `forward(tokens)` returns logits [B, S, vocab] when `mtp_depth == 0`, else
    `(logits, mtp_logits)` with one [B, S, vocab] tensor per MTP depth (position i of depth k
    predicts token i + 1 + k; see mtp.py and the loss in loss.py).
    """

    def __init__(self, model_args: DeepSeekV4ModelArgs):
        from .mtp import MTPBlock  # mtp.py subclasses TransformerBlock

        super().__init__(model_args)
        self.model_args = model_args
        self.hc_mult = model_args.hc_mult
        self.tok_embeddings = nn.Embedding(model_args.vocab_size, model_args.dim)
        # cos/sin tables: "main" for sliding-window-only layers and MTP, "compress" (YaRN) otherwise.
        self.register_buffer("rope_main", self._rope(main=True), persistent=False)
        self.register_buffer("rope_compress", self._rope(main=False), persistent=False)
        self.layers = nn.ModuleDict(
            {
                str(i): TransformerBlock(i, model_args, kind, model_args.is_hash_layer(i))
                for i, kind in enumerate(model_args.attn_types)
            }
        )
        self.hc_head = HyperHead(model_args)
        self.norm = nn.RMSNorm(model_args.dim, eps=model_args.norm_eps)
        self.output = nn.Linear(model_args.dim, model_args.vocab_size, bias=False)
        self.mtp = nn.ModuleDict(
            {str(k): MTPBlock(model_args.n_layers + k, model_args) for k in range(model_args.mtp_depth)}
        )

    def _rope(self, main: bool, device=None) -> torch.Tensor:
        a = self.model_args
        if main:
            return rope_table(a, a.rope_theta, yarn=False, device=device)
        return rope_table(a, a.compress_rope_theta, yarn=True, device=device)

    def rope_for(self, attn_type: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.rope_main if attn_type == SWA else self.rope_compress
        if seq_len > table.shape[1]:
            raise ValueError(f"sequence length {seq_len} exceeds the RoPE table ({table.shape[1]} = training.seq_len)")
        return table[0, :seq_len], table[1, :seq_len]

    def forward(
        self,
        tokens: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        attention_masks=None,
        positions: torch.Tensor | None = None,
    ):
        """tokens [B, S] int ids on the first pipeline stage (hc streams [B, S, hc, D] after it);
        token_ids [B, S]: the ids, needed by hash-routed layers on later stages (default: tokens)."""
        if attention_masks is not None or positions is not None:
            raise NotImplementedError("DeepSeek-V4: attention_masks / positions (packed documents, CP) are not supported yet")
        if self.tok_embeddings is not None:
            token_ids = tokens if token_ids is None else token_ids
            h = self.tok_embeddings(tokens).unsqueeze(2).expand(-1, -1, self.hc_mult, -1)
        else:
            h = tokens
        seq_len = h.shape[1]
        for layer in self.layers.values():
            h = layer(h, *self.rope_for(layer.attn_type, seq_len), token_ids)
        if self.output is None:  # not the last pipeline stage
            return h
        logits = self.output(self.norm(self.hc_head(h)))
        if len(self.mtp) == 0:
            return logits
        cos, sin = self.rope_for(SWA, seq_len)
        mtp_logits = []
        for k, block in enumerate(self.mtp.values()):
            # Depth k+1 at position i embeds token i+k+1; the wrapped-around last positions have no
            # target and are ignored by the loss.
            next_embed = self.tok_embeddings(torch.roll(token_ids, shifts=-(k + 1), dims=1))
            h = block(h, next_embed, cos, sin)
            mtp_logits.append(self.output(block.norm(block.hc_head(h))))
        return logits, tuple(mtp_logits)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """(Re)initialise every parameter and rebuild every buffer (they are garbage after to_empty)."""
        device = buffer_device or self.rope_main.device
        self.rope_main = self._rope(main=True, device=device)
        self.rope_compress = self._rope(main=False, device=device)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            layer.init_weights(buffer_device)
        if self.hc_head is not None:
            self.hc_head.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            final_out_std = self.model_args.dim**-0.5
            trunc_normal_(self.output.weight, mean=0.0, std=final_out_std, a=-3 * final_out_std, b=3 * final_out_std)
        if self.mtp is not None:
            for block in self.mtp.values():
                block.init_weights(buffer_device)
