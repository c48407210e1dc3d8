"""titan_v4.model.attention: one whole attention layer of each kind against a dense fp64
re-derivation from its weights (no custom op), and the frozen indexer."""

import math

import pytest
import torch

from tests.helpers.tiny_model import close, randomize_, tiny_args
from titan_v4.model.attention import Attention
from titan_v4.model.attn_kinds import CSA, HCA, SWA
from titan_v4.model.rope import apply_rope, rope_table


def test_indexer_gets_no_gradient():
    a = tiny_args()
    attn = Attention(a, CSA)
    randomize_(attn, seed=6)
    x = torch.randn(1, 24, a.dim, requires_grad=True)
    cos, sin = rope_table(a, a.compress_rope_theta, yarn=True)[:, :24]
    attn(x, cos, sin).sum().backward()
    assert all(p.grad is None for p in attn.indexer.parameters())
    assert all(p.grad is not None for n, p in attn.named_parameters() if "indexer" not in n)


def reference_attention(attn: Attention, x, cos, sin):
    """Dense fp64 re-derivation of one V4 attention layer from its weights (no custom op)."""
    b, s, _ = x.shape
    h, d = attn.n_heads, attn.head_dim
    eps = attn.norm_eps

    def rms(v, weight=None):
        v = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps)
        return v if weight is None else v * weight

    q_latent = rms(x @ attn.wq_a.weight.T, attn.q_norm.weight)
    q = apply_rope(rms((q_latent @ attn.wq_b.weight.T).view(b, s, h, d)), cos, sin)
    kv = apply_rope(rms(x @ attn.wkv.weight.T, attn.kv_norm.weight), cos, sin)
    keys, allowed = [kv], [torch.ones(s, s, dtype=torch.bool).tril() & ~torch.ones(s, s, dtype=torch.bool).tril(-attn.window_size)]
    allowed = allowed[0].expand(b, s, s)
    if attn.compressor is not None and s >= attn.ratio:
        pool = attn.compressor(x, cos, sin)
        t = torch.arange(s)
        causal = torch.arange(pool.shape[1]).view(1, -1) < ((t + 1) // attn.ratio).view(-1, 1)
        pool_ok = causal.expand(b, s, -1).clone()
        if attn.indexer is not None and not attn.dense_csa:
            picks = attn.indexer.select(attn.indexer(x, q_latent, cos, sin)).long()
            chosen = torch.zeros_like(pool_ok)
            for bi in range(b):
                for ti in range(s):
                    for e in picks[bi, ti].tolist():
                        if e >= 0:
                            chosen[bi, ti, e] = True
            pool_ok &= chosen
        keys.append(pool)
        allowed = torch.cat((allowed, pool_ok), dim=-1)
    keys = torch.cat(keys, dim=1)  # [B, S+P, D]
    logits = torch.einsum("bshd,bkd->bhsk", q, keys) / math.sqrt(d)
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    sink = attn.attn_sink.view(1, h, 1, 1).expand(b, h, s, 1).to(logits.dtype)
    probs = torch.softmax(torch.cat((logits, sink), -1), -1)[..., :-1]
    out = torch.einsum("bhsk,bkd->bshd", probs, keys)
    out = apply_rope(out, cos, -sin).view(b, s, attn.o_groups, -1)
    out = torch.einsum("bsgi,goi->bsgo", out, attn.wo_a.weight.view(attn.o_groups, attn.o_lora_rank, -1)).flatten(2)
    return out @ attn.wo_b.weight.T


@pytest.mark.parametrize("kind", [pytest.param(SWA, id="swa"), pytest.param(CSA, id="csa"), pytest.param(HCA, id="hca")])
def test_attention_layer_matches_dense_reference(kind):
    a = tiny_args()
    attn = Attention(a, kind).double()
    randomize_(attn, seed=7)
    s = 21
    table = rope_table(a, a.rope_theta if kind == SWA else a.compress_rope_theta, yarn=kind != SWA).double()
    cos, sin = table[:, :s]
    x = torch.randn(2, s, a.dim, dtype=torch.float64)
    close(attn(x, cos, sin), reference_attention(attn, x, cos, sin))
