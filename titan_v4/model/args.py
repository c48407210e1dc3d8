"""DeepSeek-V4 model hyperparameters and their validation.

Field names follow the official inference code (`inference/config.json`) where one exists; the HF
`config.json` names are mapped in hf_config.py. The flavors live in `titan_v4/flavors.py`; run
settings (sequence length, loss weights) come from the TOML config via `update_from_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import nn

from torchtitan.config import JobConfig
from torchtitan.protocols.model import BaseModelArgs

from titan_v4.config import INDEXER_PHASES, v4_settings

from .attn_kinds import ATTN_TYPES, CSA, HCA, SWA
from .flops import count_params_and_flops

SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
ROPE_TYPES = ("default", "yarn")  # plain RoPE, YaRN


class ModelArgsError(ValueError):
    """A bad model hyperparameter; the message names the field, the value and what is allowed."""


def _fail(field_name: str, value, allowed: str) -> None:
    raise ModelArgsError(f"DeepSeekV4ModelArgs.{field_name}={value!r} is invalid: {allowed}")


@dataclass
class DeepSeekV4ModelArgs(BaseModelArgs):
    """Hyperparameters of one DeepSeek-V4 model.

    Defaults are DeepSeek-V4-Flash's released config (docs/deepseek_v4.md).
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

    # RoPE (rope.py). "main" (sliding-window-only layers, MTP): plain, theta rope_theta. "compress"
    # (CSA/HCA layers, their compressors and the indexer): theta compress_rope_theta, plain
    # ("default") or YaRN ("yarn"). The released models: 10000; 160000 with YaRN factor 16,
    # original length 65536, betas 32 / 1, unit magnitude.
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    compress_rope_type: str = "yarn"
    # YaRN of the compress table (unused when it is plain): the frequencies slower than beta_slow
    # rotations in original_seq_len positions are divided by rope_factor, those faster than
    # beta_fast kept, a linear ramp between; cos and sin are multiplied by yarn_attention_factor
    # (HF's `attention_factor`; the official code applies none: 1).
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    yarn_attention_factor: float = 1.0
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
    # Lightning-indexer training (run settings from `[v4]`; titan_v4/config.py explains the phases).
    # "frozen" is the released model's inference behaviour: top-k attention, no indexer loss.
    indexer_phase: str = "frozen"
    indexer_loss_weight: float = 1.0

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
        if self.compress_rope_type not in ROPE_TYPES:
            _fail("compress_rope_type", self.compress_rope_type, f"allowed: {ROPE_TYPES}")
        for name in ("rope_theta", "compress_rope_theta", "rope_factor", "beta_fast", "beta_slow", "yarn_attention_factor", "route_scale"):
            if not getattr(self, name) > 0:
                _fail(name, getattr(self, name), "must be > 0")
        if not self.swiglu_limit >= 0:
            _fail("swiglu_limit", self.swiglu_limit, "must be >= 0 (0 = no clamp)")
        if not self.load_balance_coeff > 0:
            _fail("load_balance_coeff", self.load_balance_coeff, "must be > 0 (torchtitan's bias update needs it)")
        if not self.seq_balance_loss_weight >= 0:
            _fail("seq_balance_loss_weight", self.seq_balance_loss_weight, "must be >= 0")
        if self.indexer_phase not in INDEXER_PHASES:
            _fail("indexer_phase", self.indexer_phase, f"allowed: {INDEXER_PHASES}")
        if not self.indexer_loss_weight >= 0:
            _fail("indexer_loss_weight", self.indexer_loss_weight, "must be >= 0")

    # ------------------------------------------------------------------ torchtitan protocol
    def update_from_config(self, job_config: JobConfig, **kwargs) -> None:
        """Copy run settings from the job config (called by the trainer before the model is built)."""
        seq_len = job_config.training.seq_len
        if seq_len < 1:
            raise ModelArgsError(f"training.seq_len={seq_len} is invalid: must be >= 1")
        self.max_seq_len = seq_len
        v4 = v4_settings(job_config)
        self.seq_balance_loss_weight = float(v4.seq_balance_loss_weight)
        self.indexer_phase = v4.indexer_phase
        self.indexer_loss_weight = float(v4.indexer_loss_weight)
        self.validate()

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """(total parameters, training FLOPs per token) by the rule of flops.py. Works on the meta model."""
        return count_params_and_flops(self, model, seq_len)

    # ------------------------------------------------------------------ derived facts
    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.n_hash_layers

    def compress_ratio(self, attn_type: str) -> int:
        return {SWA: 0, CSA: self.csa_ratio, HCA: self.hca_ratio}[attn_type]

    def replace(self, **changes) -> "DeepSeekV4ModelArgs":
        """A validated copy with some fields changed (flavors are shared objects: never mutate them)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        values.update(changes)
        return type(self)(**values)


__all__ = ["DeepSeekV4ModelArgs", "ModelArgsError", "ROPE_TYPES"]
