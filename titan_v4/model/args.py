"""DeepSeek-V4 model hyperparameters, their validation, and the FLOP count (DESIGN.md §5).

Field names follow the official inference code (`inference/config.json`) where one exists; the HF
`config.json` names are mapped in `from_hf_config`. Every flavor lives in `titan_v4/__init__.py`;
run settings (sequence length, loss weights, data) come from the TOML config via
`update_from_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from torch import nn

from torchtitan.config import JobConfig
from torchtitan.protocols.model import BaseModelArgs
from torchtitan.tools.logging import logger

from titan_v4.config import v4_settings

# The three attention kinds of a V4 layer (`compress_ratios` 0 / 4 / 128 in the official config).
SWA, CSA, HCA = "swa", "csa", "hca"
ATTN_TYPES = (SWA, CSA, HCA)
SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")


class ModelArgsError(ValueError):
    """A bad model hyperparameter; the message names the field, the value and what is allowed."""


def _fail(field_name: str, value, allowed: str) -> None:
    raise ModelArgsError(f"DeepSeekV4ModelArgs.{field_name}={value!r} is invalid: {allowed}")


@dataclass
class DeepSeekV4ModelArgs(BaseModelArgs):
    """Hyperparameters of one DeepSeek-V4 model.

    Defaults are DeepSeek-V4-Flash's released config (V4_REFERENCE.md §1.1).
    """

    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    norm_eps: float = 1e-6

    # Attention: q low-rank path, one latent KV head (K = V), grouped low-rank output projection.
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64  # trailing channels of each head that get (interleaved) RoPE
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    # One entry per layer: "swa" (sliding window only), "csa" (+ overlapping compressor and
    # lightning indexer), "hca" (+ non-overlapping heavy compressor). Flash: 2 x swa, then csa/hca.
    attn_types: tuple[str, ...] = (SWA, SWA) + (CSA, HCA) * 20 + (CSA,)
    csa_ratio: int = 4
    hca_ratio: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512

    # RoPE. "main" (sliding-window-only layers, MTP): theta 10000, no YaRN. "compress" (CSA/HCA
    # layers, their compressors and the indexer): theta 160000 with YaRN, unit magnitude (no mscale).
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_seq_len: int = 4096  # rope tables are built for this many positions; set from training.seq_len

    # MoE (every layer). The first n_hash_layers route by a fixed token-id -> experts table.
    n_routed_experts: int = 256
    n_activated_experts: int = 6
    n_shared_experts: int = 1
    moe_inter_dim: int = 2048
    n_hash_layers: int = 3
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    # The official reference clamps only the routed experts; HF transformers' port also clamps the
    # shared expert. Off = official behaviour; the HF parity test turns it on.
    clamp_shared_experts: bool = False
    # Aux-loss-free balancing: expert-bias update speed (torchtitan's optimizer hook).
    load_balance_coeff: float = 1e-3
    # Sequence-wise balance loss weight (a run setting; overwritten from `[v4]` in the TOML).
    seq_balance_loss_weight: float = 1e-4
    use_grouped_mm: bool = True  # CUDA SM90 grouped GEMM for routed experts; else a sync-free loop

    # Manifold-constrained hyper-connections.
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6

    # Multi-token prediction depth (official num_nextn_predict_layers).
    mtp_depth: int = 1

    def __post_init__(self) -> None:
        self.attn_types = tuple(self.attn_types)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ModelArgsError naming the field, the value and what is allowed."""
        positive = (
            "vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups",
            "o_lora_rank", "window_size", "csa_ratio", "hca_ratio", "index_n_heads",
            "index_head_dim", "index_topk", "max_seq_len", "n_routed_experts",
            "n_activated_experts", "moe_inter_dim", "hc_mult", "hc_sinkhorn_iters",
            "original_seq_len",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "must be an integer >= 1")
        for name in ("n_hash_layers", "mtp_depth", "n_shared_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(name, value, "must be an integer >= 0")
        if len(self.attn_types) != self.n_layers:
            _fail("attn_types", self.attn_types, f"needs exactly n_layers={self.n_layers} entries, got {len(self.attn_types)}")
        for i, kind in enumerate(self.attn_types):
            if kind not in ATTN_TYPES:
                _fail("attn_types", self.attn_types, f"entry {i} is {kind!r}; allowed kinds are {ATTN_TYPES}")
        if self.rope_head_dim < 2 or self.rope_head_dim % 2 or self.rope_head_dim > self.head_dim:
            _fail("rope_head_dim", self.rope_head_dim, f"must be even, >= 2 and <= head_dim={self.head_dim}")
        if self.index_head_dim < self.rope_head_dim:
            _fail("index_head_dim", self.index_head_dim, f"must be >= rope_head_dim={self.rope_head_dim}")
        if self.n_heads % self.o_groups:
            _fail("o_groups", self.o_groups, f"must divide n_heads={self.n_heads}")
        if self.n_activated_experts > self.n_routed_experts:
            _fail("n_activated_experts", self.n_activated_experts, f"must be <= n_routed_experts={self.n_routed_experts}")
        if self.n_hash_layers > self.n_layers:
            _fail("n_hash_layers", self.n_hash_layers, f"must be <= n_layers={self.n_layers}")
        if self.score_func not in SCORE_FUNCS:
            _fail("score_func", self.score_func, f"allowed: {SCORE_FUNCS}")
        for name in ("norm_eps", "hc_eps"):
            if not getattr(self, name) > 0:
                _fail(name, getattr(self, name), "must be > 0")
        for name in ("rope_theta", "compress_rope_theta", "rope_factor", "route_scale"):
            if not getattr(self, name) > 0:
                _fail(name, getattr(self, name), "must be > 0")
        if not self.swiglu_limit >= 0:
            _fail("swiglu_limit", self.swiglu_limit, "must be >= 0 (0 = no clamp)")
        if not self.load_balance_coeff > 0:
            _fail("load_balance_coeff", self.load_balance_coeff, "must be > 0 (torchtitan's bias update needs it)")
        if not self.seq_balance_loss_weight >= 0:
            _fail("seq_balance_loss_weight", self.seq_balance_loss_weight, "must be >= 0")

    # ------------------------------------------------------------------ torchtitan protocol
    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        """Copy run settings from the job config (called by the trainer before the model is built)."""
        seq_len = job_config.training.seq_len
        if seq_len < 1:
            raise ModelArgsError(f"training.seq_len={seq_len} is invalid: must be >= 1")
        self.max_seq_len = seq_len
        self.seq_balance_loss_weight = float(v4_settings(job_config).seq_balance_loss_weight)
        if self.use_grouped_mm and not _has_sm90():
            logger.info("routed experts: grouped_mm needs a CUDA SM90+ device; using the sync-free loop")
            self.use_grouped_mm = False
        self.validate()

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """(total parameters, training FLOPs per token) by DESIGN.md §5. Works on the meta model."""
        return count_params_and_flops(self, model, seq_len)

    # ------------------------------------------------------------------ derived facts
    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.n_hash_layers

    def compress_ratio(self, attn_type: str) -> int:
        return {SWA: 0, CSA: self.csa_ratio, HCA: self.hca_ratio}[attn_type]

    # ------------------------------------------------------------------ HF / official config
    @classmethod
    def from_hf_config(cls, d: dict, **overrides) -> "DeepSeekV4ModelArgs":
        """Build args from an HF (`config.json`) or official (`inference/config.json`) dict.

        Every field of the released configs is mapped; MTP depth comes from
        `num_nextn_predict_layers`; the legacy `compress_ratios` (0/4/128 per layer, plus one entry for
        the MTP block) and `num_hash_layers` / `n_hash_layers` are accepted. Unknown keys that would
        change the architecture raise; bookkeeping keys are ignored.
        """
        d = dict(d)
        get = d.get

        def first(*names, default=None):
            for n in names:
                if n in d and d[n] is not None:
                    return d[n]
            return default

        n_layers = first("num_hidden_layers", "n_layers")
        if n_layers is None:
            raise ModelArgsError("config has neither num_hidden_layers nor n_layers")
        csa_ratio, hca_ratio = 4, 128
        rates = get("compress_rates") or {}
        csa_ratio = int(rates.get("compressed_sparse_attention", first("compress_rate_csa", default=csa_ratio)))
        hca_ratio = int(rates.get("heavily_compressed_attention", first("compress_rate_hca", default=hca_ratio)))
        hf_kind = {"sliding_attention": SWA, "compressed_sparse_attention": CSA, "heavily_compressed_attention": HCA}
        if get("layer_types") is not None:
            kinds = []
            for t in d["layer_types"][:n_layers]:
                if t not in hf_kind:
                    raise ModelArgsError(f"config layer_types entry {t!r} is not one of {tuple(hf_kind)}")
                kinds.append(hf_kind[t])
        elif get("compress_ratios") is not None:
            ratio_kind = {0: SWA, csa_ratio: CSA, hca_ratio: HCA}
            kinds = []
            for r in d["compress_ratios"][:n_layers]:
                if r not in ratio_kind:
                    raise ModelArgsError(f"config compress_ratios entry {r!r} is not one of {tuple(ratio_kind)}")
                kinds.append(ratio_kind[r])
            # The entry after the last layer describes the MTP block; V4's is always 0 (sliding window).
            extra = d["compress_ratios"][n_layers:]
            if any(r != 0 for r in extra):
                raise ModelArgsError(f"config compress_ratios MTP entries {extra} must be 0 (V4's MTP block is SWA)")
        else:  # HF's default schedule: 2 x HCA, then CSA / HCA interleaved
            kinds = [HCA] * min(n_layers, 2) + [CSA if i % 2 else HCA for i in range(max(n_layers - 2, 0))]

        n_hash = first("num_hash_layers", "n_hash_layers")
        if get("mlp_layer_types") is not None:
            mlp = list(d["mlp_layer_types"][:n_layers])
            n_hash = sum(1 for t in mlp if t == "hash_moe")
            if mlp != ["hash_moe"] * n_hash + ["moe"] * (len(mlp) - n_hash):
                raise ModelArgsError(f"config mlp_layer_types {mlp} must be hash_moe layers first, then moe")
        if n_hash is None:
            n_hash = 3

        head_dim = first("head_dim", default=512)
        rope_dim = first("qk_rope_head_dim", "rope_head_dim")
        if rope_dim is None:
            rope_dim = int(head_dim * first("partial_rotary_factor", default=64 / 512))
        rope = get("rope_scaling") or {}
        if isinstance(get("rope_parameters"), dict) and isinstance(d["rope_parameters"].get("compress"), dict):
            rope = d["rope_parameters"]["compress"]
        args = dict(
            vocab_size=first("vocab_size"),
            dim=first("hidden_size", "dim"),
            n_layers=n_layers,
            norm_eps=first("rms_norm_eps", "norm_eps", default=1e-6),
            n_heads=first("num_attention_heads", "n_heads"),
            head_dim=head_dim,
            rope_head_dim=rope_dim,
            q_lora_rank=first("q_lora_rank"),
            o_groups=first("o_groups"),
            o_lora_rank=first("o_lora_rank"),
            window_size=first("sliding_window", "window_size"),
            attn_types=tuple(kinds),
            csa_ratio=csa_ratio,
            hca_ratio=hca_ratio,
            index_n_heads=first("index_n_heads"),
            index_head_dim=first("index_head_dim"),
            index_topk=first("index_topk"),
            rope_theta=float(first("rope_theta", default=10000.0)),
            compress_rope_theta=float(first("compress_rope_theta", default=160000.0)),
            rope_factor=float(first("rope_factor", default=rope.get("factor", 16.0))),
            original_seq_len=int(first("original_seq_len", default=rope.get("original_max_position_embeddings", 65536))),
            beta_fast=float(first("beta_fast", default=rope.get("beta_fast", 32.0))),
            beta_slow=float(first("beta_slow", default=rope.get("beta_slow", 1.0))),
            n_routed_experts=first("n_routed_experts"),
            n_activated_experts=first("num_experts_per_tok", "n_activated_experts"),
            n_shared_experts=first("n_shared_experts", default=1),
            moe_inter_dim=first("moe_intermediate_size", "moe_inter_dim"),
            n_hash_layers=int(n_hash),
            score_func=first("scoring_func", "score_func", default="sqrtsoftplus"),
            route_scale=float(first("routed_scaling_factor", "route_scale", default=1.0)),
            swiglu_limit=float(first("swiglu_limit", default=0.0)),
            hc_mult=first("hc_mult", default=4),
            hc_sinkhorn_iters=first("hc_sinkhorn_iters", default=20),
            hc_eps=float(first("hc_eps", default=1e-6)),
            mtp_depth=int(first("num_nextn_predict_layers", default=0)),
        )
        missing = [k for k, v in args.items() if v is None]
        if missing:
            raise ModelArgsError(f"config lacks the fields needed for {missing}")
        if get("n_shared_experts") not in (None, 0, 1):
            raise ModelArgsError(f"config n_shared_experts={get('n_shared_experts')} is unsupported: V4 has 0 or 1")
        if first("num_key_value_heads", default=1) != 1:
            raise ModelArgsError(f"config num_key_value_heads={get('num_key_value_heads')} must be 1 (V4 has one latent KV head)")
        args.update(overrides)
        return cls(**args)

    def replace(self, **changes) -> "DeepSeekV4ModelArgs":
        """A validated copy with some fields changed (flavors are shared objects: never mutate them)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        values.update(changes)
        return type(self)(**values)


def _has_sm90() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


# ---------------------------------------------------------------------- FLOP count (DESIGN.md §5)
def visible_pairs_per_query(args: DeepSeekV4ModelArgs, attn_type: str, seq_len: int) -> tuple[float, float]:
    """(attended key entries, indexer-scored pool entries) per query, averaged over positions 0..S-1.

    Attended = local window keys + the pool entries the op attends (all causally visible for HCA,
    at most index_topk for CSA). The indexer scores every causally visible CSA entry.
    """
    s = seq_len
    w = args.window_size
    # sum_{t<S} min(t + 1, W)
    local = w * (w + 1) // 2 + (s - w) * w if s > w else s * (s + 1) // 2
    pooled = scored = 0
    if attn_type != SWA:
        r = args.compress_ratio(attn_type)
        visible = [(t + 1) // r for t in range(s)]
        scored = sum(visible) if attn_type == CSA else 0
        pooled = sum(min(v, args.index_topk) for v in visible) if attn_type == CSA else sum(visible)
    return (local + pooled) / s, scored / s


def count_params_and_flops(args: DeepSeekV4ModelArgs, model: nn.Module, seq_len: int) -> tuple[int, int]:
    """Parameters and training FLOPs per token.

    Matmuls: 6 x parameters touched per token (routed experts: only the active share; the head once
    more per MTP depth, since MTP reuses it). The indexer (and its compressor) gets no LM gradient:
    2 x its parameters. Attention: 4 * head_dim * heads * attended pairs forward, 2.5x that for
    backward; indexer scoring 2 * index_head_dim * index_heads * scored entries, forward only.
    Embedding lookups, norms and the mHC elementwise work are not counted.
    """
    nparams = 0
    trained_dense = indexer = experts = 0
    head = 0
    for name, p in model.named_parameters():
        n = p.numel()
        nparams += n
        if "tok_embeddings" in name:
            continue
        if ".indexer." in name:
            indexer += n
        elif ".moe.experts." in name:
            experts += n
        else:
            trained_dense += n
            if name.startswith("output."):
                head = n
    active_experts = experts * args.n_activated_experts // args.n_routed_experts
    matmul = 6 * (trained_dense + active_experts + head * args.mtp_depth) + 2 * indexer

    attn_per_pair = 4 * args.head_dim * args.n_heads * 3.5  # forward + 2.5x backward
    score_per_entry = 2 * args.index_head_dim * args.index_n_heads
    attention = 0.0
    for kind in args.attn_types + (SWA,) * args.mtp_depth:
        attended, scored = visible_pairs_per_query(args, kind, seq_len)
        attention += attn_per_pair * attended + score_per_entry * scored
    return nparams, int(matmul + math.ceil(attention))


__all__ = [
    "ATTN_TYPES", "CSA", "HCA", "SWA", "DeepSeekV4ModelArgs", "ModelArgsError",
    "count_params_and_flops", "visible_pairs_per_query",
]  # fmt: skip
