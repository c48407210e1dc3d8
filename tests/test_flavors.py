"""titan_v4.flavors: the released models' schedules and sizes, and a clear error for a bad name."""

import pytest
import torch

from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.attn_kinds import CSA, HCA, SWA
from titan_v4.model.model import DeepSeekV4Model


def test_unknown_flavor_lists_allowed():
    with pytest.raises(KeyError, match=r"model.flavor='flashh'.*allowed: \['debugmodel', 'flash', 'flash_4layers', 'flash_proxy', 'long_proxy', 'pro'\]"):
        deepseek_v4_args["flashh"]


def test_flavors_are_the_released_models():
    flash, pro = deepseek_v4_args["flash"], deepseek_v4_args["pro"]
    assert flash.attn_types[:4] == (SWA, SWA, CSA, HCA) and len(flash.attn_types) == 43
    assert pro.attn_types[:4] == (HCA, HCA, CSA, HCA) and len(pro.attn_types) == 61  # HCA-first
    assert flash.attn_types.count(CSA) == 21 and pro.attn_types.count(HCA) == 31
    assert (flash.route_scale, pro.route_scale, flash.index_topk, pro.index_topk) == (1.5, 2.5, 512, 1024)
    # Published sizes: Flash 284B without its MTP block, Pro 1.6T.
    with torch.device("meta"):
        n_flash = sum(p.numel() for n, p in DeepSeekV4Model(flash).named_parameters() if not n.startswith("mtp."))
        n_pro = sum(p.numel() for p in DeepSeekV4Model(pro).parameters())
    assert abs(n_flash / 284e9 - 1) < 0.005 and abs(n_pro / 1.6e12 - 1) < 0.01, (n_flash, n_pro)
    debug = deepseek_v4_args["debugmodel"]
    assert set(debug.attn_types) == {SWA, CSA, HCA} and 0 < debug.n_hash_layers < debug.n_layers
    assert debug.hc_mult == 4 and debug.mtp_depth >= 1
    proxy = deepseek_v4_args["flash_proxy"]
    assert proxy.attn_types == (SWA, CSA, HCA, CSA) and (proxy.n_routed_experts, proxy.n_activated_experts) == (16, 6)
    assert (proxy.dim, proxy.n_heads, proxy.moe_inter_dim) == (flash.dim, flash.n_heads, flash.moe_inter_dim)
    long = deepseek_v4_args["long_proxy"]
    attention = ("n_heads", "head_dim", "rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "window_size",
                 "csa_ratio", "hca_ratio", "index_n_heads", "index_head_dim", "index_topk", "dim", "moe_inter_dim",
                 "n_activated_experts", "original_seq_len")  # fmt: skip
    assert all(getattr(long, name) == getattr(flash, name) for name in attention)
    assert long.attn_types == (SWA, CSA, HCA, CSA) and long.vocab_size == 2048
    four = deepseek_v4_args["flash_4layers"]
    assert four.replace(n_layers=43, attn_types=flash.attn_types) == flash  # Flash, truncated
