"""titan_v4.model.model: causality of the whole model and the dtype contract of every module."""

import pytest
import torch

from tests.helpers.tiny_model import randomize_, tiny_args
from titan_v4.model.attention import Attention
from titan_v4.model.attn_kinds import CSA, HCA, SWA
from titan_v4.model.block import TransformerBlock
from titan_v4.model.compressor import Compressor, Indexer
from titan_v4.model.mhc import HyperConnection
from titan_v4.model.model import DeepSeekV4Model
from titan_v4.model.moe import V4MoE
from titan_v4.model.mtp import MTPBlock
from titan_v4.model.rope import rope_table


def test_model_is_causal_and_dtypes():
    a = tiny_args(mtp_depth=0)
    model = DeepSeekV4Model(a)
    model.init_weights()
    tokens = torch.randint(0, a.vocab_size, (1, 40))
    logits = model(tokens)
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 40, a.vocab_size) and logits.dtype == torch.float32
    for p in (5, 17, 33):
        changed = tokens.clone()
        changed[0, p] = (changed[0, p] + 1) % a.vocab_size
        out = model(changed)
        assert torch.equal(out[:, :p], logits[:, :p]), f"position < {p} saw token {p}"
    assert model.to(torch.bfloat16)(tokens).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")])
def test_module_output_dtypes(dtype):
    """Activations keep the input dtype; routing weights / mHC mixers are fp32; ids are integers."""
    a = tiny_args()
    s = 20
    cos, sin = rope_table(a, a.compress_rope_theta, yarn=True)[:, :s]
    x = torch.randn(2, s, a.dim).to(dtype)
    for kind in (SWA, CSA, HCA):
        attn = Attention(a, kind).to(dtype)
        randomize_(attn)
        assert attn(x, cos, sin).dtype == dtype, kind
    comp = Compressor(a.dim, 8, 4, True, a.norm_eps).to(dtype)
    assert comp(x, cos, sin).dtype == dtype
    idx = Indexer(a).to(dtype)
    assert idx.select(idx(x, torch.randn(2, s, a.q_lora_rank).to(dtype), cos, sin)).dtype == torch.int32
    streams = torch.randn(2, s, a.hc_mult, a.dim).to(dtype)
    hc = HyperConnection(a).to(dtype)
    randomize_(hc)
    collapsed, post, comb = hc.collapse(streams)
    assert (collapsed.dtype, post.dtype, comb.dtype) == (dtype, torch.float32, torch.float32)
    moe = V4MoE(a, 1, hash_routed=False).to(dtype)
    randomize_(moe)
    moe.expert_bias = torch.zeros(a.n_routed_experts)
    assert moe(x).dtype == dtype
    block = TransformerBlock(0, a, SWA, hash_routed=True).to(dtype)
    randomize_(block)
    block.moe.router.init_hash_table(0)
    ids = torch.randint(0, a.vocab_size, (2, s))
    assert block(streams, cos, sin, ids).dtype == dtype
    mtp = MTPBlock(4, a).to(dtype)
    randomize_(mtp)
    mtp.moe.expert_bias = torch.zeros(a.n_routed_experts)
    assert mtp(streams, x, cos, sin).dtype == dtype
