"""Tiny DeepSeek-V4 checkpoints in DeepSeek's official layout, written independently of titan_v4.

Everything here is a second implementation, from the format's description (docs/deepseek_v4.md,
"Checkpoint format"), so that the loader is checked against something it does not share code with:
- the official tensor names, listed per block from the documented schema;
- FP8 E4M3, E2M1 and E8M0 encodings from their bit layouts (numpy), quantising known weights
  by rounding to the nearest code;
- the safetensors framing (JSON header + raw little-endian bytes).

`official_weights(args, seed)` makes known float64 weights for every official tensor;
`write_official(dir, args, weights, ...)` quantises and writes them and returns the exact values a
correct loader must produce (the dequantised codes).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch

from titan_v4.model.args import DeepSeekV4ModelArgs

SWA = "swa"


# ---------------------------------------------------------------------------------- number formats
def e4m3_values() -> np.ndarray:
    """The 256 E4M3 (fn) codes as float64: sign bit 7, exponent bits 6-3 (bias 7), mantissa bits
    2-0; exponent 0 is subnormal (m / 8 * 2^-6); S.1111.111 is NaN (no infinities)."""
    values = np.empty(256)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exp, man = (code >> 3) & 0xF, code & 0x7
        if exp == 0xF and man == 0x7:
            values[code] = np.nan
        elif exp == 0:
            values[code] = sign * man / 8 * 2.0**-6
        else:
            values[code] = sign * (1 + man / 8) * 2.0 ** (exp - 7)
    return values


def e2m1_values() -> np.ndarray:
    """The 16 E2M1 codes as float64: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0;
    exponent 0 is subnormal (m * 0.5)."""
    values = np.empty(16)
    for code in range(16):
        sign = -1.0 if code & 0x8 else 1.0
        exp, man = (code >> 1) & 0x3, code & 0x1
        values[code] = sign * (man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1))
    return values


def e8m0_value(byte: np.ndarray) -> np.ndarray:
    """E8M0: 2^(byte - 127) (255 would be NaN; never written here)."""
    return np.exp2(byte.astype(np.float64) - 127)


def nearest_code(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest finite table value to each x (ties to the lower index)."""
    finite = np.where(np.isnan(table), np.inf, table)
    return np.abs(x[..., None] - finite).argmin(axis=-1).astype(np.uint8)


def power_of_two_scale(amax: np.ndarray, max_code: float) -> np.ndarray:
    """E8M0 byte of the smallest power of two s with amax / s <= max_code."""
    exponent = np.ceil(np.log2(np.maximum(amax, 2.0**-100) / max_code))
    return (exponent + 127).astype(np.uint8)


def quantize_fp8(w: np.ndarray, block: int = 128, scale_dtype: str = "F8_E8M0"):
    """[R, C] -> (E4M3 codes uint8 [R, C], scales [ceil(R/128), ceil(C/128)] as E8M0 bytes or fp32,
    the dequantised values float64)."""
    rows, cols = w.shape
    rb, cb = math.ceil(rows / block), math.ceil(cols / block)
    scale_bytes = np.empty((rb, cb), dtype=np.uint8)
    for i in range(rb):
        for j in range(cb):
            amax = np.abs(w[i * block : (i + 1) * block, j * block : (j + 1) * block]).max()
            scale_bytes[i, j] = power_of_two_scale(amax, 448.0)
    scale = e8m0_value(scale_bytes)
    full = np.repeat(np.repeat(scale, block, 0), block, 1)[:rows, :cols]
    table = e4m3_values()
    codes = nearest_code(w / full, table)
    stored_scale = scale_bytes if scale_dtype == "F8_E8M0" else scale.astype(np.float32)
    return codes, stored_scale, table[codes] * full


def quantize_fp4(w: np.ndarray, group: int = 32):
    """[R, C] -> (packed int8 [R, C/2]: element 2j in the low nibble of byte j, E8M0 bytes
    [R, C/32], the dequantised values float64)."""
    rows, cols = w.shape
    grouped = w.reshape(rows, cols // group, group)
    scale_bytes = power_of_two_scale(np.abs(grouped).max(-1), 6.0)
    scale = e8m0_value(scale_bytes)[..., None]
    table = e2m1_values()
    codes = nearest_code(grouped / scale, table).reshape(rows, cols)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
    return packed, scale_bytes, (table[codes.reshape(rows, cols // group, group)] * scale).reshape(rows, cols)


# ---------------------------------------------------------------------------------- safetensors
def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    """name -> (safetensors dtype, shape, raw little-endian bytes)."""
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for _, _, data in tensors.values():
            f.write(data)


def bf16_bytes(x: np.ndarray) -> bytes:
    """Round-to-nearest-even float64 -> bfloat16 (the upper half of the fp32 bits)."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def bf16_value(x: np.ndarray) -> np.ndarray:
    bits = np.frombuffer(bf16_bytes(x), dtype=np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).astype(np.float64).reshape(x.shape)


# ---------------------------------------------------------------------------------- the schema
def official_schema(args: DeepSeekV4ModelArgs) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of the official checkpoint: name -> (logical shape, kind), kind one of
    bf16, f32, i64, fp8 (E4M3 + 128x128 scales), expert (the routed experts' FP4 or FP8)."""
    d, hc = args.dim, args.hc_mult
    schema: dict[str, tuple[tuple[int, ...], str]] = {
        "embed.weight": ((args.vocab_size, d), "bf16"),
        "head.weight": ((args.vocab_size, d), "bf16"),
        "norm.weight": ((d,), "bf16"),
        "hc_head_fn": ((hc, hc * d), "f32"),
        "hc_head_base": ((hc,), "f32"),
        "hc_head_scale": ((1,), "f32"),
    }
    mix = (2 + hc) * hc
    blocks = [(f"layers.{i}.", kind, i < args.n_hash_layers) for i, kind in enumerate(args.attn_types)]
    blocks += [(f"mtp.{k}.", SWA, False) for k in range(args.mtp_depth)]
    for prefix, kind, hashed in blocks:
        b = {
            "attn_norm.weight": ((d,), "bf16"),
            "ffn_norm.weight": ((d,), "bf16"),
            "attn.attn_sink": ((args.n_heads,), "f32"),
            "attn.q_norm.weight": ((args.q_lora_rank,), "bf16"),
            "attn.kv_norm.weight": ((args.head_dim,), "bf16"),
            "attn.wq_a.weight": ((args.q_lora_rank, d), "fp8"),
            "attn.wq_b.weight": ((args.n_heads * args.head_dim, args.q_lora_rank), "fp8"),
            "attn.wkv.weight": ((args.head_dim, d), "fp8"),
            "attn.wo_a.weight": ((args.o_groups * args.o_lora_rank, args.n_heads * args.head_dim // args.o_groups), "fp8"),
            "attn.wo_b.weight": ((d, args.o_groups * args.o_lora_rank), "fp8"),
            "ffn.gate.weight": ((args.n_routed_experts, d), "bf16"),
            "ffn.shared_experts.w1.weight": ((args.moe_inter_dim, d), "fp8"),
            "ffn.shared_experts.w3.weight": ((args.moe_inter_dim, d), "fp8"),
            "ffn.shared_experts.w2.weight": ((d, args.moe_inter_dim), "fp8"),
        }
        for part in ("attn", "ffn"):
            b[f"hc_{part}_fn"] = ((mix, hc * d), "f32")
            b[f"hc_{part}_base"] = ((mix,), "f32")
            b[f"hc_{part}_scale"] = ((3,), "f32")
        if kind != SWA:
            ratio = args.csa_ratio if kind == "csa" else args.hca_ratio
            width = 2 * args.head_dim if kind == "csa" else args.head_dim  # CSA's compressor overlaps
            b["attn.compressor.wkv.weight"] = ((width, d), "bf16")
            b["attn.compressor.wgate.weight"] = ((width, d), "bf16")
            b["attn.compressor.ape"] = ((ratio, width), "f32")
            b["attn.compressor.norm.weight"] = ((args.head_dim,), "bf16")
        if kind == "csa":
            iw = 2 * args.index_head_dim
            b["attn.indexer.wq_b.weight"] = ((args.index_n_heads * args.index_head_dim, args.q_lora_rank), "fp8")
            b["attn.indexer.weights_proj.weight"] = ((args.index_n_heads, d), "bf16")
            b["attn.indexer.compressor.wkv.weight"] = ((iw, d), "bf16")
            b["attn.indexer.compressor.wgate.weight"] = ((iw, d), "bf16")
            b["attn.indexer.compressor.ape"] = ((args.csa_ratio, iw), "f32")
            b["attn.indexer.compressor.norm.weight"] = ((args.index_head_dim,), "bf16")
        b["ffn.gate.tid2eid" if hashed else "ffn.gate.bias"] = (
            ((args.vocab_size, args.n_activated_experts), "i64") if hashed else ((args.n_routed_experts,), "f32")
        )
        for e in range(args.n_routed_experts):
            b[f"ffn.experts.{e}.w1.weight"] = ((args.moe_inter_dim, d), "expert")
            b[f"ffn.experts.{e}.w3.weight"] = ((args.moe_inter_dim, d), "expert")
            b[f"ffn.experts.{e}.w2.weight"] = ((d, args.moe_inter_dim), "expert")
        if prefix.startswith("mtp."):
            b["e_proj.weight"] = ((d, d), "fp8")
            b["h_proj.weight"] = ((d, d), "fp8")
            for n in ("enorm", "hnorm", "norm"):
                b[f"{n}.weight"] = ((d,), "bf16")
            b["hc_head_fn"] = ((hc, hc * d), "f32")
            b["hc_head_base"] = ((hc,), "f32")
            b["hc_head_scale"] = ((1,), "f32")
        schema.update({prefix + k: v for k, v in b.items()})
    return schema


def official_weights(args: DeepSeekV4ModelArgs, seed: int = 0) -> dict[str, np.ndarray]:
    """Known weights for every official tensor (float64; int64 for tid2eid). Quantised weights vary
    in magnitude from block to block and row to row, so a wrong scale index shows."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, (shape, kind) in official_schema(args).items():
        if kind == "i64":
            weights[name] = np.argsort(rng.random((shape[0], args.n_routed_experts)), axis=1)[:, : shape[1]].astype(np.int64)
            continue
        w = rng.standard_normal(shape) / math.sqrt(shape[-1])
        if name.endswith(("norm.weight",)):
            w = 1 + 0.2 * w
        if kind in ("fp8", "expert"):
            rows = np.exp2(rng.integers(-3, 3, size=(shape[0], 1)))  # per-row magnitudes
            cols = np.exp2(rng.integers(-2, 2, size=(1, shape[1] // 32 + 1))).repeat(32, 1)[:, : shape[1]]
            w = w * rows * cols
        weights[name] = w
    return weights


def write_official(
    path: Path, args: DeepSeekV4ModelArgs, weights: dict[str, np.ndarray], *, experts: str = "fp4",
    files: int = 3, config: dict | None = None, quantize: bool = True, drop: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Write `weights` as an official checkpoint (`files` shards + index, `config` as config.json)
    and return name -> the exact values a loader must produce. `experts` is "fp4" (the released
    V4) or "fp8" (-Base: FP8 experts with fp32 scales). `quantize=False` writes every float tensor
    as fp32 instead (same names, no scales), e.g. for HF transformers to load. Stored tensors named
    in `drop` are left out (to test the loader's errors)."""
    path.mkdir(parents=True, exist_ok=True)
    schema = official_schema(args)
    stored: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    exact: dict[str, np.ndarray] = {}
    for name, (shape, kind) in schema.items():
        w = weights[name]
        if kind == "i64":
            stored[name] = ("I64", shape, w.astype("<i8").tobytes())
            exact[name] = w
            continue
        if kind == "expert":
            kind = "fp4" if experts == "fp4" else "fp8_f32"
        if not quantize:
            kind = "f32"
        base = name.removesuffix(".weight")
        if kind == "bf16":
            stored[name] = ("BF16", shape, bf16_bytes(w))
            exact[name] = bf16_value(w)
        elif kind == "f32":
            stored[name] = ("F32", shape, w.astype("<f4").tobytes())
            exact[name] = w.astype(np.float32).astype(np.float64)
        elif kind == "fp4":
            packed, scale, exact[name] = quantize_fp4(w)
            stored[name] = ("I8", packed.shape, packed.tobytes())
            stored[base + ".scale"] = ("F8_E8M0", scale.shape, scale.tobytes())
        else:
            codes, scale, exact[name] = quantize_fp8(w, scale_dtype="F8_E8M0" if kind == "fp8" else "F32")
            stored[name] = ("F8_E4M3", codes.shape, codes.tobytes())
            scale_dtype = "F8_E8M0" if kind == "fp8" else "F32"
            stored[base + ".scale"] = (scale_dtype, scale.shape, scale.astype("u1" if kind == "fp8" else "<f4").tobytes())
    names = [n for n in stored if n not in drop]
    per_file = math.ceil(len(names) / files)
    weight_map = {}
    for i in range(files):
        file = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        chunk = names[i * per_file : (i + 1) * per_file]
        write_safetensors(path / file, {n: stored[n] for n in chunk})
        weight_map.update({n: file for n in chunk})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return exact


def as_torch(exact: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in exact.items()}
