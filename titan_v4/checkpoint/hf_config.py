"""DeepSeek-V4 model args from a released `config.json` (HF transformers' names) or the official
inference code's `inference/config.json` (docs/deepseek_v4.md lists both)."""

from __future__ import annotations

import math

from titan_v4.model.args import DeepSeekV4ModelArgs, ModelArgsError
from titan_v4.model.attn_kinds import CSA, HCA, SWA


def args_from_hf_config(d: dict, **overrides) -> DeepSeekV4ModelArgs:
    """Build args from an HF (`config.json`) or official (`inference/config.json`) dict.

    `overrides` replace fields after the mapping (e.g. `max_seq_len`, `mtp_depth`); see
    `config_fields` for the mapping.
    """
    return DeepSeekV4ModelArgs(**{**config_fields(d), **overrides})


def config_fields(d: dict) -> dict:
    """The DeepSeekV4ModelArgs fields an HF or official config dict sets (the architecture).

    Every field of the released configs is mapped; MTP depth comes from
    `num_nextn_predict_layers`; the legacy `compress_ratios` (0/4/128 per layer, plus one entry for
    the MTP block) and `num_hash_layers` / `n_hash_layers` are accepted; RoPE as `rope_fields`
    reads it. A config that describes an architecture V4 cannot build (unknown layer kinds or
    ratios, more than one KV head or shared expert, a compressed MTP block, a RoPE setting the
    model lacks, missing fields) raises ModelArgsError; keys that do not shape
    the model (torch_dtype, quantization_config, token ids, ...) are not read.
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
        **rope_fields(d, head_dim, rope_dim),
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
    return args


_OFFICIAL_YARN_NAMES = {"factor": "rope_factor", "original_max_position_embeddings": "original_seq_len"}


def rope_fields(d: dict, head_dim: int, rope_dim: int) -> dict:
    """The RoPE fields of DeepSeekV4ModelArgs that a config dict sets, read as HF transformers'
    DeepseekV4Config reads them (the HF test oracle), plus the official names:

    - nested `rope_parameters: {"main": {...}, "compress": {...}}` (what hf_config_from_args
      writes): each table's own `rope_theta`; YaRN's `attention_factor` when absent is YaRN's
      default from `factor` (and `mscale` / `mscale_all_dim`), as in transformers;
    - a flat `rope_parameters` or the legacy `rope_scaling` (the released config.json): the
      compressed layers' RoPE, thetas from `rope_theta` / `compress_rope_theta`, YaRN's
      `attention_factor` 1 when absent;
    - the official `rope_factor` / `original_seq_len` / `beta_fast` / `beta_slow`: YaRN at unit
      magnitude;
    - none of these: both tables plain.

    The YaRN fields are set only for a YaRN table (a plain one states none, and a comparison with a
    model must not invent them). What the model does not implement is a ModelArgsError naming the
    field: a main table other than plain, a compress table other than plain or YaRN, a
    `partial_rotary_factor` other than qk_rope_head_dim / head_dim, YaRN without `factor` or
    `original_max_position_embeddings`, or `truncate: false` (transformers truncates the YaRN
    correction range whatever a nested table says, so titan-v4 always does).
    """
    rope_theta = float(d["rope_theta"] if d.get("rope_theta") is not None else 10000.0)
    compress_theta = float(d["compress_rope_theta"] if d.get("compress_rope_theta") is not None else 160000.0)
    rp = d.get("rope_parameters")
    nested = isinstance(rp, dict) and isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict)
    if nested:
        _check_rope(rp["main"], "rope_parameters.main", ("default",), head_dim, rope_dim)
        rope_theta = float(rp["main"].get("rope_theta", rope_theta))
        compress, where, attention_factor = rp["compress"], "rope_parameters.compress", None
        compress_theta = float(compress.get("rope_theta", compress_theta))
    elif isinstance(rp, dict) and rp:
        compress, where, attention_factor = {k: v for k, v in rp.items() if k not in ("main", "compress")}, "rope_parameters", 1.0
    elif isinstance(d.get("rope_scaling"), dict):
        compress, where, attention_factor = d["rope_scaling"], "rope_scaling", 1.0
    elif d.get("rope_factor") is not None or d.get("original_seq_len") is not None:
        compress = {"rope_type": "yarn", "beta_fast": d.get("beta_fast"), "beta_slow": d.get("beta_slow")}
        compress.update({hf: d.get(official) for hf, official in _OFFICIAL_YARN_NAMES.items()})
        where, attention_factor = None, 1.0  # where None: the official names, at the top level
    else:
        compress, where, attention_factor = {}, "rope_parameters", None
    rope_type = _check_rope(compress, where, ("default", "yarn"), head_dim, rope_dim)
    fields = dict(rope_theta=rope_theta, compress_rope_theta=compress_theta, compress_rope_type=rope_type)
    if rope_type == "default":
        return fields

    def name(key: str) -> str:
        return f"{where}.{key}" if where else _OFFICIAL_YARN_NAMES.get(key, key)

    for key in ("factor", "original_max_position_embeddings"):
        if compress.get(key) is None:
            raise ModelArgsError(f"config {name(key)} is missing; YaRN needs it")
    if compress.get("truncate", True) is not True:
        raise ModelArgsError(f"config {name('truncate')} = {compress['truncate']!r} is not supported; allowed: true (or absent)")
    factor = float(compress["factor"])
    attention_factor = compress.get("attention_factor", attention_factor)
    if attention_factor is None:  # YaRN's default magnitude (transformers' _compute_yarn_parameters)
        mscale, mscale_all_dim = compress.get("mscale"), compress.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor, 1.0)
    return {
        **fields,
        "rope_factor": factor,
        "original_seq_len": int(compress["original_max_position_embeddings"]),
        # 0 / null mean YaRN's defaults in transformers (`or`), too
        "beta_fast": float(compress.get("beta_fast") or 32.0),
        "beta_slow": float(compress.get("beta_slow") or 1.0),
        "yarn_attention_factor": float(attention_factor),
    }


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _check_rope(params: dict, where: str | None, allowed: tuple[str, ...], head_dim: int, rope_dim: int) -> str:
    """The RoPE type of one table's parameters ("rope_type", or the legacy "type"; absent: plain),
    refused unless in `allowed`; a `partial_rotary_factor` must give the model's rope channels."""
    key = "type" if "rope_type" not in params and "type" in params else "rope_type"
    rope_type = params.get(key) or "default"
    label = f"{where}.{key}" if where else key
    if rope_type not in allowed:
        raise ModelArgsError(f"config {label} = {rope_type!r} is not supported; allowed: {', '.join(map(repr, allowed))}")
    fraction = params.get("partial_rotary_factor")
    if fraction is not None and int(head_dim * fraction) != rope_dim:
        raise ModelArgsError(
            f"config {where}.partial_rotary_factor = {fraction!r} is not supported; allowed: {rope_dim / head_dim!r} "
            f"(qk_rope_head_dim {rope_dim} / head_dim {head_dim}: both tables rotate the same channels)"
        )
    return rope_type


_HF_LAYER_TYPE = {SWA: "sliding_attention", CSA: "compressed_sparse_attention", HCA: "heavily_compressed_attention"}


def hf_config_from_args(args: DeepSeekV4ModelArgs) -> dict:
    """An HF `config.json` dict (`DeepseekV4ForCausalLM`) for these args; `config_fields` of it gives
    back every architecture field. Uses HF's own field names (`layer_types`, `compress_rates`,
    `mlp_layer_types`, nested `rope_parameters`), so ratios and schedules other than the released
    ones come through. Run settings (sequence length, loss weights) are not part of it."""
    layer_types = [_HF_LAYER_TYPE[kind] for kind in args.attn_types]
    rope_fraction = args.rope_head_dim / args.head_dim
    compress_rope = {"rope_type": args.compress_rope_type, "rope_theta": args.compress_rope_theta, "partial_rotary_factor": rope_fraction}
    # transformers checks max_position_embeddings against YaRN's factor x original length; a plain
    # table has no such length (HF's default applies)
    context = {}
    if args.compress_rope_type == "yarn":
        compress_rope.update(
            factor=args.rope_factor,
            original_max_position_embeddings=args.original_seq_len,
            beta_fast=args.beta_fast,
            beta_slow=args.beta_slow,
            # always written: absent, transformers would derive one from the factor
            attention_factor=args.yarn_attention_factor,
        )
        context = {"max_position_embeddings": int(args.original_seq_len * args.rope_factor)}
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "rms_norm_eps": args.norm_eps,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": 1,
        "head_dim": args.head_dim,
        "qk_rope_head_dim": args.rope_head_dim,
        "partial_rotary_factor": rope_fraction,
        "q_lora_rank": args.q_lora_rank,
        "o_groups": args.o_groups,
        "o_lora_rank": args.o_lora_rank,
        "sliding_window": args.window_size,
        "layer_types": layer_types,
        "compress_rates": {"compressed_sparse_attention": args.csa_ratio, "heavily_compressed_attention": args.hca_ratio},
        "index_n_heads": args.index_n_heads,
        "index_head_dim": args.index_head_dim,
        "index_topk": args.index_topk,
        "rope_theta": args.rope_theta,
        "compress_rope_theta": args.compress_rope_theta,
        "rope_parameters": {
            "main": {"rope_type": "default", "rope_theta": args.rope_theta, "partial_rotary_factor": rope_fraction},
            "compress": compress_rope,
        },
        **context,
        "n_routed_experts": args.n_routed_experts,
        "num_experts_per_tok": args.n_activated_experts,
        "n_shared_experts": args.n_shared_experts,
        "moe_intermediate_size": args.moe_inter_dim,
        "mlp_layer_types": ["hash_moe" if args.is_hash_layer(i) else "moe" for i in range(args.n_layers)],
        "scoring_func": args.score_func,
        "norm_topk_prob": True,
        "routed_scaling_factor": args.route_scale,
        "swiglu_limit": args.swiglu_limit,
        "hc_mult": args.hc_mult,
        "hc_sinkhorn_iters": args.hc_sinkhorn_iters,
        "hc_eps": args.hc_eps,
        "num_nextn_predict_layers": args.mtp_depth,
        "tie_word_embeddings": False,
    }
