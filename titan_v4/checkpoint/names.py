"""Every DeepSeek-V4 tensor name in the three spellings titan-v4 reads and writes.

- **titan**: this repository's module names (torchtitan style: `layers.L.attention.wq_a.weight`,
  routed experts stacked as `moe.experts.w1 [E, I, D]`, `w3 [E, I, D]`, `w2 [E, D, I]`).
- **HF**: HF transformers' `DeepseekV4ForCausalLM` (`model.layers.L.self_attn.q_a_proj.weight`,
  routed experts stacked as `mlp.experts.gate_up_proj [E, 2I, D]` = cat(w1, w3) and
  `mlp.experts.down_proj [E, D, I]`).
- **official**: DeepSeek's released safetensors (`layers.L.attn.wq_a.weight`, one tensor per routed
  expert `layers.L.ffn.experts.E.w1.weight`, the MTP block under `mtp.K.`).

HF has no MTP block, so the HF layout keeps it under its official names (per-expert weights
included) next to HF's tensors. docs/deepseek_v4.md ("Checkpoint format") describes the layouts.
"""

from __future__ import annotations

import re

# Inside one block (a layer or an MTP depth): (titan suffix, HF suffix, official suffix).
BLOCK_NAMES = (
    ("attention_norm.weight", "input_layernorm.weight", "attn_norm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight", "ffn_norm.weight"),
    ("hc_attn.fn", "attn_hc.fn", "hc_attn_fn"),
    ("hc_attn.base", "attn_hc.base", "hc_attn_base"),
    ("hc_attn.scale", "attn_hc.scale", "hc_attn_scale"),
    ("hc_ffn.fn", "ffn_hc.fn", "hc_ffn_fn"),
    ("hc_ffn.base", "ffn_hc.base", "hc_ffn_base"),
    ("hc_ffn.scale", "ffn_hc.scale", "hc_ffn_scale"),
    ("attention.wq_a.weight", "self_attn.q_a_proj.weight", "attn.wq_a.weight"),
    ("attention.q_norm.weight", "self_attn.q_a_norm.weight", "attn.q_norm.weight"),
    ("attention.wq_b.weight", "self_attn.q_b_proj.weight", "attn.wq_b.weight"),
    ("attention.wkv.weight", "self_attn.kv_proj.weight", "attn.wkv.weight"),
    ("attention.kv_norm.weight", "self_attn.kv_norm.weight", "attn.kv_norm.weight"),
    ("attention.wo_a.weight", "self_attn.o_a_proj.weight", "attn.wo_a.weight"),
    ("attention.wo_b.weight", "self_attn.o_b_proj.weight", "attn.wo_b.weight"),
    ("attention.attn_sink", "self_attn.sinks", "attn.attn_sink"),
    ("attention.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight", "attn.compressor.wkv.weight"),
    ("attention.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight", "attn.compressor.wgate.weight"),
    ("attention.compressor.ape", "self_attn.compressor.position_bias", "attn.compressor.ape"),
    ("attention.compressor.norm.weight", "self_attn.compressor.kv_norm.weight", "attn.compressor.norm.weight"),
    ("attention.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight", "attn.indexer.wq_b.weight"),
    (
        "attention.indexer.weights_proj.weight",
        "self_attn.compressor.indexer.scorer.weights_proj.weight",
        "attn.indexer.weights_proj.weight",
    ),
    (
        "attention.indexer.compressor.wkv.weight",
        "self_attn.compressor.indexer.kv_proj.weight",
        "attn.indexer.compressor.wkv.weight",
    ),
    (
        "attention.indexer.compressor.wgate.weight",
        "self_attn.compressor.indexer.gate_proj.weight",
        "attn.indexer.compressor.wgate.weight",
    ),
    ("attention.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias", "attn.indexer.compressor.ape"),
    (
        "attention.indexer.compressor.norm.weight",
        "self_attn.compressor.indexer.kv_norm.weight",
        "attn.indexer.compressor.norm.weight",
    ),
    ("moe.router.gate.weight", "mlp.gate.weight", "ffn.gate.weight"),
    ("moe.router.tid2eid", "mlp.gate.tid2eid", "ffn.gate.tid2eid"),
    ("moe.expert_bias", "mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("moe.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight", "ffn.shared_experts.w1.weight"),
    ("moe.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight", "ffn.shared_experts.w2.weight"),
    ("moe.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight", "ffn.shared_experts.w3.weight"),
)
# Only in MTP blocks: (titan suffix, official suffix). The embedding and head are shared with the
# main model and not repeated under `mtp.`.
MTP_NAMES = (
    ("e_proj.weight", "e_proj.weight"),
    ("h_proj.weight", "h_proj.weight"),
    ("enorm.weight", "enorm.weight"),
    ("hnorm.weight", "hnorm.weight"),
    ("norm.weight", "norm.weight"),
    ("hc_head.fn", "hc_head_fn"),
    ("hc_head.base", "hc_head_base"),
    ("hc_head.scale", "hc_head_scale"),
)
# Outside the blocks: (titan, HF, official).
TOP_NAMES = (
    ("tok_embeddings.weight", "model.embed_tokens.weight", "embed.weight"),
    ("norm.weight", "model.norm.weight", "norm.weight"),
    ("output.weight", "lm_head.weight", "head.weight"),
    ("hc_head.fn", "model.hc_head.hc_fn", "hc_head_fn"),
    ("hc_head.base", "model.hc_head.hc_base", "hc_head_base"),
    ("hc_head.scale", "model.hc_head.hc_scale", "hc_head_scale"),
)
# Routed experts. titan: `moe.experts.wN` [E, out, in]; official: `ffn.experts.E.wN.weight`
# [out, in] (w1 gate, w3 up, w2 down); HF: w1 and w3 stacked on dim 1 as GATE_UP, w2 as DOWN.
EXPERT_WEIGHTS = ("w1", "w2", "w3")
HF_GATE_UP = "mlp.experts.gate_up_proj"
HF_DOWN = "mlp.experts.down_proj"

TITAN_BLOCK = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")
HF_BLOCK = re.compile(r"^(model\.layers|mtp)\.(\d+)\.(.+)$")
OFFICIAL_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$")


def titan_expert_suffix(weight: str) -> str:
    """`w1` -> `moe.experts.w1` (the stacked titan parameter)."""
    return f"moe.experts.{weight}"


def official_expert_suffix(expert: int, weight: str) -> str:
    """(3, `w1`) -> `ffn.experts.3.w1.weight` (one official per-expert tensor)."""
    return f"ffn.experts.{expert}.{weight}.weight"


# Lookup tables derived from the rows above.
BLOCK_TITAN_TO_HF = {t: h for t, h, _ in BLOCK_NAMES}
BLOCK_HF_TO_TITAN = {h: t for t, h, _ in BLOCK_NAMES}
BLOCK_TITAN_TO_OFFICIAL = {t: o for t, _, o in BLOCK_NAMES} | dict(MTP_NAMES)
BLOCK_OFFICIAL_TO_TITAN = {o: t for t, o in BLOCK_TITAN_TO_OFFICIAL.items()}
BLOCK_HF_TO_OFFICIAL = {h: o for _, h, o in BLOCK_NAMES}
TOP_TITAN_TO_HF = {t: h for t, h, _ in TOP_NAMES}
TOP_HF_TO_TITAN = {h: t for t, h, _ in TOP_NAMES}
TOP_HF_TO_OFFICIAL = {h: o for _, h, o in TOP_NAMES}


def official_name_of_hf(hf_key: str) -> str:
    """The official name of one HF-layout tensor that is stored as one tensor in both layouts
    (everything but HF's stacked routed experts of the main layers; MTP keys are already official).

    Raises KeyError for a name of neither layout.
    """
    if hf_key in TOP_HF_TO_OFFICIAL:
        return TOP_HF_TO_OFFICIAL[hf_key]
    m = HF_BLOCK.match(hf_key)
    if m is not None:
        group, idx, suffix = m.groups()
        if group == "mtp":
            return hf_key
        if suffix in BLOCK_HF_TO_OFFICIAL:
            return f"layers.{idx}.{BLOCK_HF_TO_OFFICIAL[suffix]}"
    raise KeyError(f"{hf_key!r} is not an HF-layout DeepSeek-V4 tensor stored as one official tensor")


def official_experts_of_hf(hf_key: str, n_experts: int) -> list[list[str]] | None:
    """For HF's stacked experts of a main layer, the official per-expert tensors, expert by expert,
    in the order they are stacked along dim 1 (gate_up_proj: [w1, w3]; down_proj: [w2]). None for
    any other key."""
    m = HF_BLOCK.match(hf_key)
    if m is None or m.group(1) != "model.layers":
        return None
    idx, suffix = m.group(2), m.group(3)
    weights = {HF_GATE_UP: ("w1", "w3"), HF_DOWN: ("w2",)}.get(suffix)
    if weights is None:
        return None
    return [[f"layers.{idx}.{official_expert_suffix(e, w)}" for w in weights] for e in range(n_experts)]
