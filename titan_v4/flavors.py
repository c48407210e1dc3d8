"""The DeepSeek-V4 flavors: `[model] flavor = ...` in a TOML config picks one.

`debugmodel` is tiny and covers every block kind; `flash` and `pro` are the released models
(docs/deepseek_v4.md); `flash_proxy` is Flash's width on 4 layers, sized for one 80 GB GPU;
`flash_4layers` is Flash's first 4 layers with all its experts (checkpoint-load benchmark);
`long_proxy` is Flash's attention on 4 layers with a small vocabulary, for long sequences on one GPU.
"""

from __future__ import annotations

from titan_v4.model.args import DeepSeekV4ModelArgs
from titan_v4.model.attn_kinds import CSA, HCA, SWA


class FlavorRegistry(dict):
    """The flavors; an unknown name fails with the allowed ones (torchtitan indexes this dict)."""

    def __missing__(self, key):
        raise KeyError(f"model.flavor={key!r} is not a DeepSeek-V4 flavor; allowed: {sorted(self)}")


def _flash_schedule(n_layers: int) -> tuple[str, ...]:
    """Flash: layers 0-1 sliding window only, then CSA on even and HCA on odd layers."""
    return tuple(SWA if i < 2 else (CSA if i % 2 == 0 else HCA) for i in range(n_layers))


def _pro_schedule(n_layers: int) -> tuple[str, ...]:
    """Pro: layers 0-1 HCA ("HCA-first"), then CSA on even and HCA on odd layers."""
    return tuple(HCA if i < 2 else (CSA if i % 2 == 0 else HCA) for i in range(n_layers))


deepseek_v4_args = FlavorRegistry(
    {
        # Tiny: every attention kind, hash + learned MoE, hc_mult 4, MTP; trains on a CPU in seconds.
        "debugmodel": DeepSeekV4ModelArgs(
            vocab_size=2048,
            dim=128,
            n_layers=4,
            n_heads=4,
            head_dim=64,
            rope_head_dim=16,
            q_lora_rank=64,
            o_groups=2,
            o_lora_rank=64,
            window_size=16,
            attn_types=(SWA, CSA, HCA, CSA),
            csa_ratio=4,
            hca_ratio=16,
            index_n_heads=4,
            index_head_dim=32,
            index_topk=8,
            original_seq_len=512,
            n_routed_experts=8,
            n_activated_experts=2,
            moe_inter_dim=128,
            n_hash_layers=1,
            route_scale=1.5,
            mtp_depth=1,
        ),
        # The released DeepSeek-V4-Flash (docs/deepseek_v4.md).
        "flash": DeepSeekV4ModelArgs(attn_types=_flash_schedule(43)),
        # The released DeepSeek-V4-Pro.
        "pro": DeepSeekV4ModelArgs(
            dim=7168,
            n_layers=61,
            n_heads=128,
            q_lora_rank=1536,
            o_groups=16,
            attn_types=_pro_schedule(61),
            index_topk=1024,
            n_routed_experts=384,
            moe_inter_dim=3072,
            route_scale=2.5,
        ),
        # The released Flash truncated to its first 4 layers (SWA, SWA, CSA, HCA; hash routing on
        # 0-2) and its MTP block, all 256 experts: 34B parameters, the model of the checkpoint-load
        # benchmark (benchmarks/checkpoint_load.py).
        "flash_4layers": DeepSeekV4ModelArgs(n_layers=4, attn_types=_flash_schedule(4)),
        # Flash widths on 4 layers and 16 + 1 experts: fits one 80 GB H100 at seq 4096 with fp32
        # master weights and AdamW.
        "flash_proxy": DeepSeekV4ModelArgs(
            n_layers=4,
            attn_types=(SWA, CSA, HCA, CSA),
            n_routed_experts=16,
            n_hash_layers=1,
        ),
        # Long-context proxy for one 80 GB GPU (docs/long_context.md): Flash's attention, compressors,
        # indexer and widths on 4 layers (SWA, CSA, HCA, CSA), 6 + 1 experts all active (Flash's
        # expert work per token, without a routing choice; with 8 routed experts the 64K step needed
        # more than the card's 78 GiB) and the bundled tokenizer's 2048-token vocabulary, so the
        # head stays small at long lengths.
        "long_proxy": DeepSeekV4ModelArgs(
            vocab_size=2048,
            n_layers=4,
            attn_types=(SWA, CSA, HCA, CSA),
            n_routed_experts=6,
            n_hash_layers=1,
        ),
    }
)
