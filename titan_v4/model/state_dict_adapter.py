"""titan-v4 <-> HF transformers (`DeepseekV4ForCausalLM`, transformers 5.17) state-dict names.

torchtitan's adapter protocol: `to_hf(titan_sd) -> hf_sd`, `from_hf(hf_sd) -> titan_sd`.
Routed experts are stacked differently: titan keeps torchtitan's `w1/w3 [E, H, D]`, `w2 [E, D, H]`;
HF keeps `gate_up_proj [E, 2H, D]` (= cat(w1, w3) on dim 1) and `down_proj [E, D, H]`.
The expert-bias buffer of hash-routed layers has no HF counterpart (hash layers carry `tid2eid`
instead) and is dropped by `to_hf` / zero-filled by the model's init. HF has no MTP: MTP weights are
written under `mtp.<k>.` with the per-layer HF names, which HF ignores on load.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from .args import DeepSeekV4ModelArgs

# Names inside one block (layer or MTP depth): titan suffix -> HF suffix.
_BLOCK_RENAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn.fn": "attn_hc.fn",
    "hc_attn.base": "attn_hc.base",
    "hc_attn.scale": "attn_hc.scale",
    "hc_ffn.fn": "ffn_hc.fn",
    "hc_ffn.base": "ffn_hc.base",
    "hc_ffn.scale": "ffn_hc.scale",
    "attention.wq_a.weight": "self_attn.q_a_proj.weight",
    "attention.q_norm.weight": "self_attn.q_a_norm.weight",
    "attention.wq_b.weight": "self_attn.q_b_proj.weight",
    "attention.wkv.weight": "self_attn.kv_proj.weight",
    "attention.kv_norm.weight": "self_attn.kv_norm.weight",
    "attention.wo_a.weight": "self_attn.o_a_proj.weight",
    "attention.wo_b.weight": "self_attn.o_b_proj.weight",
    "attention.attn_sink": "self_attn.sinks",
    "attention.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attention.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attention.compressor.ape": "self_attn.compressor.position_bias",
    "attention.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attention.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attention.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attention.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attention.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attention.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attention.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
    "moe.router.tid2eid": "mlp.gate.tid2eid",
    "moe.expert_bias": "mlp.gate.e_score_correction_bias",
    "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "moe.experts.w2": "mlp.experts.down_proj",
}
# Only in MTP blocks.
_MTP_RENAMES = {
    "e_proj.weight": "e_proj.weight",
    "h_proj.weight": "h_proj.weight",
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "norm.weight": "norm.weight",
    "hc_head.fn": "hc_head.hc_fn",
    "hc_head.base": "hc_head.hc_base",
    "hc_head.scale": "hc_head.hc_scale",
}
_TOP_RENAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "hc_head.fn": "model.hc_head.hc_fn",
    "hc_head.base": "model.hc_head.hc_base",
    "hc_head.scale": "model.hc_head.hc_scale",
}
_GATE_UP = "mlp.experts.gate_up_proj"
_BLOCK_KEY = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")
_HF_BLOCK_KEY = re.compile(r"^(model\.layers|mtp)\.(\d+)\.(.+)$")


class DeepSeekV4StateDictAdapter(StateDictAdapter):
    def __init__(self, model_args: DeepSeekV4ModelArgs, hf_assets_path: str | None):
        super().__init__(model_args, hf_assets_path)
        self.model_args = model_args

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        hf: dict[str, Any] = {}
        pending_w1: dict[str, Any] = {}
        pending_w3: dict[str, Any] = {}
        for key, value in state_dict.items():
            if key in _TOP_RENAMES:
                hf[_TOP_RENAMES[key]] = value
                continue
            m = _BLOCK_KEY.match(key)
            if m is None:
                raise KeyError(f"to_hf: unknown titan-v4 key {key!r}")
            group, idx, suffix = m.groups()
            prefix = f"model.layers.{idx}." if group == "layers" else f"mtp.{idx}."
            if suffix == "moe.expert_bias" and group == "layers" and self.model_args.is_hash_layer(int(idx)):
                continue  # unused by hash routing; HF has no such buffer there
            if suffix == "moe.experts.w1":
                pending_w1[prefix] = value
            elif suffix == "moe.experts.w3":
                pending_w3[prefix] = value
            elif suffix in _BLOCK_RENAMES:
                hf[prefix + _BLOCK_RENAMES[suffix]] = value
            elif group == "mtp" and suffix in _MTP_RENAMES:
                hf[prefix + _MTP_RENAMES[suffix]] = value
            else:
                raise KeyError(f"to_hf: unknown titan-v4 key {key!r}")
        if pending_w1.keys() != pending_w3.keys():
            raise KeyError(f"to_hf: experts w1 and w3 must come together; got w1 for {sorted(pending_w1)}, w3 for {sorted(pending_w3)}")
        for prefix, w1 in pending_w1.items():
            hf[prefix + _GATE_UP] = torch.cat((w1, pending_w3[prefix]), dim=1)
        return hf

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        top = {v: k for k, v in _TOP_RENAMES.items()}
        block = {v: k for k, v in _BLOCK_RENAMES.items()}
        mtp_only = {v: k for k, v in _MTP_RENAMES.items()}
        sd: dict[str, Any] = {}
        for key, value in hf_state_dict.items():
            if key in top:
                sd[top[key]] = value
                continue
            m = _HF_BLOCK_KEY.match(key)
            if m is None:
                raise KeyError(f"from_hf: unknown HF DeepseekV4 key {key!r}")
            group, idx, suffix = m.groups()
            prefix = f"layers.{idx}." if group == "model.layers" else f"mtp.{idx}."
            if suffix == _GATE_UP:
                w1, w3 = value.chunk(2, dim=1)
                sd[prefix + "moe.experts.w1"] = w1
                sd[prefix + "moe.experts.w3"] = w3
            elif suffix in block:
                sd[prefix + block[suffix]] = value
            elif group == "mtp" and suffix in mtp_only:
                sd[prefix + mtp_only[suffix]] = value
            else:
                raise KeyError(f"from_hf: unknown HF DeepseekV4 key {key!r}")
        return sd
