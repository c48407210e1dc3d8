"""titan-v4 vs HF transformers' DeepseekV4ForCausalLM (the numerical oracle) on the CPU.

Same random weights (loaded through the state-dict adapter), same tokens; titan-v4 runs in fp32 and
is compared with HF run in fp64 (the reference values), so the comparison measures titan-v4's own
rounding: logits within relative RMS 1e-5, and every parameter's gradient of the same loss within
1e-4 or within twice HF's own fp32 error on it (the 3-element mHC scale gradients are sums over all
tokens with heavy cancellation, where HF's fp32 run is itself ~1e-4 off). The config has all three attention
kinds, hash and learned MoE, hc_mult 4 and a top-k smaller than the visible CSA entries; every
parameter, including position biases, sinks, mHC parameters and the correction bias, is random and
non-zero.
"""

import copy

import pytest
import torch

from tests.helpers.tolerances import TOLERANCES, errors
from titan_v4.checkpoint.hf_config import args_from_hf_config
from titan_v4.checkpoint.state_dict_adapter import DeepSeekV4StateDictAdapter
from titan_v4.model.model import DeepSeekV4Model

transformers = pytest.importorskip("transformers", minversion="5.9")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

# HF parity bounds (fp32 relative RMS): the acceptance numbers, kept in tolerances.py.
LOGITS_REL_RMS = TOLERANCES[(torch.float32, "model_out")].rel_rms
GRAD_REL_RMS = TOLERANCES[(torch.float32, "model_grad")].rel_rms
SEQ = 40  # not a multiple of the HCA ratio (16); > window (8); CSA visible entries up to 10 > top-k 4
VOCAB = 256


# original length 32 < SEQ so YaRN's ramp covers several of the 8 rope frequencies
RELEASED_LIKE_ROPE = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0}


def hf_config(swiglu_limit: float, rope_parameters: dict = RELEASED_LIKE_ROPE) -> DeepseekV4Config:
    return DeepseekV4Config(
        vocab_size=VOCAB,
        hidden_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        partial_rotary_factor=0.5,  # rope on the last 16 of 32 channels
        q_lora_rank=48,
        o_groups=2,
        o_lora_rank=16,
        sliding_window=8,
        layer_types=[
            "sliding_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
            "compressed_sparse_attention",
            "sliding_attention",
        ],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe"],
        index_n_heads=2,
        index_head_dim=24,
        index_topk=4,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=1,
        routed_scaling_factor=1.5,
        swiglu_limit=swiglu_limit,
        hc_mult=4,
        hc_sinkhorn_iters=20,
        hc_eps=1e-6,
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        rope_parameters=copy.deepcopy(rope_parameters),  # HF edits the dicts it is given
        max_position_embeddings=4096,
        num_nextn_predict_layers=1,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial random weights: every parameter and the routing buffers."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".scale") or name.endswith("hc_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith(("base", "sinks", "position_bias")):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # projections: ~unit-variance outputs so the clamps and softmaxes are exercised
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("tid2eid"):
                n_experts = model.config.n_routed_experts
                b.copy_(torch.rand(b.shape[0], n_experts, generator=gen).argsort(-1)[:, : b.shape[1]])


def build_pair(swiglu_limit: float = 1.0, rope_parameters: dict = RELEASED_LIKE_ROPE):
    torch.manual_seed(0)
    cfg = hf_config(swiglu_limit, rope_parameters)
    cfg._experts_implementation = "eager"  # HF's per-expert loop: the plainest reference (and fp64-capable)
    hf = DeepseekV4ForCausalLM(cfg).float().eval()
    randomize(hf, torch.Generator().manual_seed(1234))
    args = args_from_hf_config(
        cfg.to_dict(), clamp_shared_experts=True, max_seq_len=SEQ, mtp_depth=0,
        seq_balance_loss_weight=0.0,
    )
    titan = DeepSeekV4Model(args).float().eval()
    adapter = DeepSeekV4StateDictAdapter(args, None)
    hf_sd = {k: v for k, v in hf.state_dict().items()}
    missing, unexpected = titan.load_state_dict(adapter.from_hf(hf_sd), strict=False)
    # Hash layers have an (unused) expert_bias buffer without an HF counterpart.
    assert unexpected == []
    assert sorted(missing) == [f"layers.{i}.moe.expert_bias" for i in range(2)]
    for i in range(2):
        titan.layers[str(i)].moe.expert_bias.zero_()
    return hf, titan, adapter


def test_args_from_hf_config_match():
    hf, titan, _ = build_pair()
    a = titan.model_args
    assert a.attn_types == ("swa", "csa", "hca", "csa", "swa")
    assert (a.n_hash_layers, a.rope_head_dim, a.hca_ratio, a.csa_ratio) == (2, 16, 16, 4)
    assert (a.rope_factor, a.original_seq_len, a.beta_fast, a.beta_slow) == (16.0, 32, 32.0, 1.0)


def logits_and_grads(model, forward, tokens, labels, to_hf=None):
    """Logits of `forward(tokens)` and every gradient of `model`'s parameters (HF names) of the
    mean cross-entropy."""
    model.zero_grad(set_to_none=True)
    logits = forward(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), (to_hf(grads) if to_hf else grads)


@pytest.mark.parametrize("swiglu_limit", [pytest.param(1.0, id="clamp-active"), pytest.param(1e6, id="clamp-inactive")])
def test_logits_and_grads_match_hf(swiglu_limit):
    hf, titan, adapter = build_pair(swiglu_limit)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    hf32_logits, hf32_grads = logits_and_grads(hf, lambda t: hf(input_ids=t).logits, tokens, labels)
    titan32_logits, titan32_grads = logits_and_grads(titan, titan, tokens, labels, adapter.to_hf)
    hf = hf.double()  # the reference values (HF keeps a few norms and softmaxes in fp32 even so)
    hf64_logits, hf64_grads = logits_and_grads(hf, lambda t: hf(input_ids=t).logits, tokens, labels)

    assert hf64_logits.dtype == torch.float64
    assert sorted(titan32_grads) == sorted(hf64_grads)
    assert not any("indexer" in n for n in hf64_grads)  # hard top-k: no LM-loss gradient in either
    for n, g in hf64_grads.items():
        assert g.abs().sum() > 0, f"HF gradient of {n} is zero: the test would prove nothing there"

    # titan-v4 in fp32 stays within the parity bounds of the fp64 values, or (for the few gradients
    # that are sums over every token with heavy cancellation, like the 3-element mHC scales) within
    # twice HF's own fp32 error on them.
    assert titan32_logits.dtype == torch.float32 and titan32_logits.shape == (2, SEQ, VOCAB)
    err = errors(titan32_logits, hf64_logits).rel_rms
    print(f"fp32: logits rel RMS {err:.2e} (HF fp32: {errors(hf32_logits, hf64_logits).rel_rms:.2e})")
    assert err <= LOGITS_REL_RMS, f"logits relative RMS error {err:.3e}"
    for n in hf64_grads:
        ours, theirs = (errors(g[n], hf64_grads[n]).rel_rms for g in (titan32_grads, hf32_grads))
        assert ours <= max(GRAD_REL_RMS, 2 * theirs), f"fp32 gradient of {n}: {ours:.3e} (HF fp32: {theirs:.3e})"


def test_clamp_is_exercised():
    """The clamp-active case must actually clamp (else the parity case above proves nothing)."""
    hf_a, _, _ = build_pair(1.0)
    hf_b, _, _ = build_pair(1e6)
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(3))
    assert errors(hf_a(input_ids=tokens).logits, hf_b(input_ids=tokens).logits).rel_rms > 1e-3


# The compressed layers' RoPE written in HF's nested form with settings other than the released ones
# (the main table stays plain: V4's sliding-window layers have no other).
MAIN_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
OTHER_COMPRESS_ROPES = {
    "default": {"rope_type": "default", "rope_theta": 160000.0},
    "yarn-own-values": {"rope_type": "yarn", "rope_theta": 40000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                        "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.25},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 8.0, "original_max_position_embeddings": 24,
                    "mscale": 1.0, "mscale_all_dim": 0.5},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OTHER_COMPRESS_ROPES))
def test_logits_match_hf_for_other_compress_ropes(name):
    """Logits within the parity bound of HF's fp64 ones for a config whose compressed-layer RoPE is
    plain or YaRN with its own factor, original length, betas and attention factor (stated or from
    mscale); the setting changes HF's logits well beyond that bound, so it is exercised."""
    rope = {"main": MAIN_ROPE, "compress": OTHER_COMPRESS_ROPES[name]}
    hf, titan, _ = build_pair(rope_parameters=rope)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        titan_logits = titan(tokens)
        hf64_logits = hf.double()(input_ids=tokens).logits
        released_like, _, _ = build_pair()
        other_rope_logits = released_like.double()(input_ids=tokens).logits
    err = errors(titan_logits, hf64_logits).rel_rms
    assert err <= LOGITS_REL_RMS, f"logits relative RMS error {err:.3e}"
    assert errors(other_rope_logits, hf64_logits).rel_rms > 100 * LOGITS_REL_RMS
