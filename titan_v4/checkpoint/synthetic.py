"""Random checkpoints in the official layout, for load benchmarks and memory tests.

Every tensor of a model with the given args, under its official name and in the released dtypes
(docs/deepseek_v4.md, "Checkpoint format"): FP8 E4M3 with E8M0 128 x 128 scales for the attention,
shared-expert and MTP projections, packed FP4 with E8M0 1 x 32 scales for the routed experts
(or FP8 with fp32 scales, as the -Base checkpoints), bf16 and fp32 elsewhere, int64 hash tables.
The values are random (weights of RMS about `std`), not a model; one file per block, with the
index and a config.json. Correctness tests encode their checkpoints independently
(tests/helpers/official_checkpoint.py); this writer is for scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from titan_v4.checkpoint.hf_config import hf_config_from_args
from titan_v4.checkpoint.state_dict_adapter import expected_hf_tensors
from titan_v4.model.args import DeepSeekV4ModelArgs

from . import names
from .directory import CONFIG_FILE, INDEX_FILE
from .quantization import FP4_GROUP, FP8_BLOCK
from .safetensors_file import write_file

# Official suffixes stored in FP8 (+ E8M0 block scales); routed experts are FP4 (or FP8 on -Base).
FP8_SUFFIXES = (
    "attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight",
    "attn.indexer.wq_b.weight", "ffn.shared_experts.w1.weight", "ffn.shared_experts.w2.weight",
    "ffn.shared_experts.w3.weight", "e_proj.weight", "h_proj.weight",
)  # fmt: skip
FP32_SUFFIXES = ("attn.attn_sink", "ffn.gate.bias", "attn.compressor.ape", "attn.indexer.compressor.ape")
E8M0_ONE = 127  # the E8M0 byte of 2^0


def _power_of_two_byte(value: float) -> int:
    return E8M0_ONE + round(math.log2(value))


def _fp8(shape: tuple[int, int], std: float, scale_dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 weight of RMS ~std and its per-block scales (all 2^round(log2(std)))."""
    exponent = round(math.log2(std))
    codes = (torch.randn(shape, generator=g) * (std / 2.0**exponent)).to(torch.float8_e4m3fn)
    blocks = (math.ceil(shape[0] / FP8_BLOCK), math.ceil(shape[1] / FP8_BLOCK))
    if scale_dtype == torch.float32:
        return codes, torch.full(blocks, 2.0**exponent)
    return codes, torch.full(blocks, E8M0_ONE + exponent, dtype=torch.uint8).view(torch.float8_e8m0fnu)


def _fp4_experts(n: int, shape: tuple[int, int], std: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n experts of packed E2M1 codes [n, out, in/2] (uniform codes, RMS ~3.2 before scaling) and
    their E8M0 scales [n, out, in/32]."""
    # Eight random bytes per draw (the top bit of each int64 is 0: every eighth code is >= 0).
    words = torch.empty(n * shape[0] * shape[1] // 16, dtype=torch.int64).random_(generator=g)
    packed = words.view(torch.int8).view(n, shape[0], shape[1] // 2)
    scales = torch.full((n, shape[0], shape[1] // FP4_GROUP), _power_of_two_byte(std / 3.2), dtype=torch.uint8)
    return packed, scales.view(torch.float8_e8m0fnu)


def _is_routed_expert(hf_key: str) -> bool:
    """HF's stacked experts of a main layer, or one per-expert MTP weight."""
    m = names.HF_BLOCK.match(hf_key)
    return m is not None and (m.group(3) in (names.HF_GATE_UP, names.HF_DOWN) or names.OFFICIAL_EXPERT.match(m.group(3)) is not None)


def _block_tensors(
    keys: dict[str, torch.Tensor], block: str | None, args: DeepSeekV4ModelArgs, experts: str, std: float, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """Official tensors for one block (`layers.L.` / `mtp.K.` / None for the top level) from its
    HF-layout keys (meta tensors give the shapes)."""
    out: dict[str, torch.Tensor] = {}
    for key, meta in keys.items():
        if _is_routed_expert(key):
            continue  # below, all experts of a weight at once
        name = names.official_name_of_hf(key)
        suffix = name.removeprefix(block) if block else name
        if not meta.dtype.is_floating_point:  # tid2eid: distinct experts per token
            out[name] = torch.rand(meta.shape[0], args.n_routed_experts, generator=g).argsort(dim=-1)[:, : meta.shape[1]]
        elif suffix in FP8_SUFFIXES:
            out[name], out[name.removesuffix(".weight") + ".scale"] = _fp8(tuple(meta.shape), std, torch.float8_e8m0fnu, g)
        elif suffix in FP32_SUFFIXES or suffix.startswith("hc_"):
            out[name] = torch.randn(meta.shape, generator=g) * std
        elif suffix.endswith("norm.weight"):
            out[name] = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            out[name] = (torch.randn(meta.shape, generator=g) * std).bfloat16()
    if block is not None:
        shapes = {"w1": (args.moe_inter_dim, args.dim), "w3": (args.moe_inter_dim, args.dim), "w2": (args.dim, args.moe_inter_dim)}
        for weight, shape in shapes.items():
            if experts == "fp4":
                weights, scales = _fp4_experts(args.n_routed_experts, shape, std, g)
            else:
                pairs = [_fp8(shape, std, torch.float32, g) for _ in range(args.n_routed_experts)]
                weights, scales = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            for e in range(args.n_routed_experts):
                base = block + names.official_expert_suffix(e, weight).removesuffix(".weight")
                out[base + ".weight"], out[base + ".scale"] = weights[e], scales[e]
    return out


def _block_prefix(key: str) -> str | None:
    """`layers.L.` / `mtp.K.` (official prefix) of an HF-layout key, None for top-level keys."""
    m = names.HF_BLOCK.match(key)
    if m is None:
        return None
    return f"{'mtp' if m.group(1) == 'mtp' else 'layers'}.{m.group(2)}."


def write_synthetic_official(
    path: str | Path, args: DeepSeekV4ModelArgs, experts: str = "fp4", std: float = 0.02, seed: int = 0
) -> int:
    """Write a random official-layout checkpoint of a model with `args` to `path` (one file per
    layer / MTP depth / top-level group); returns the bytes written."""
    if experts not in ("fp4", "fp8"):
        raise ValueError(f"experts={experts!r}: 'fp4' (the released V4) or 'fp8' (-Base)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    expected = expected_hf_tensors(args)
    blocks: dict[str | None, dict[str, torch.Tensor]] = {}
    for key, meta in expected.items():
        blocks.setdefault(_block_prefix(key), {})[key] = meta
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, (block, keys) in enumerate(blocks.items()):
        file = f"model-{i + 1:05d}-of-{len(blocks):05d}.safetensors"
        tensors = _block_tensors(keys, block, args, experts, std, g)
        total += write_file(path / file, tensors)
        weight_map.update({name: file for name in tensors})
        del tensors
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / CONFIG_FILE).write_text(json.dumps(hf_config_from_args(args)))
    return total
