"""A tiny DeepSeek-V4 configuration and random weights for module tests."""

import torch

from titan_v4.model.args import DeepSeekV4ModelArgs
from titan_v4.model.attn_kinds import CSA, HCA, SWA

from .tolerances import TOLERANCES, errors


def tiny_args(**changes) -> DeepSeekV4ModelArgs:
    """Every attention kind, a hash and learned MoE layers, MTP; small enough for fp64 loops."""
    base = dict(
        vocab_size=64, dim=32, n_layers=4, n_heads=4, head_dim=16, rope_head_dim=8, q_lora_rank=24,
        o_groups=2, o_lora_rank=8, window_size=6, attn_types=(SWA, CSA, HCA, CSA), csa_ratio=4,
        hca_ratio=8, index_n_heads=2, index_head_dim=12, index_topk=3, original_seq_len=16,
        n_routed_experts=6, n_activated_experts=2, moe_inter_dim=16, n_hash_layers=1, mtp_depth=1,
        max_seq_len=64, route_scale=1.5, swiglu_limit=0.5,
    )  # fmt: skip
    base.update(changes)
    return DeepSeekV4ModelArgs(**base)


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Random non-trivial values for every parameter (biases, sinks, scales included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) / max(p.shape[-1], 1) ** 0.25)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float64, kind: str = "out") -> None:
    """Asserts `actual` is within the tolerance of (dtype, kind) of `expected`."""
    tol = TOLERANCES[(dtype, kind)]
    err = errors(actual, expected)
    assert err.rel_rms <= tol.rel_rms and err.max_rel <= tol.max_rel, f"{err} > {tol}"
