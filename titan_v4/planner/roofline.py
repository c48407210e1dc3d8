"""The hardware the planner projects onto, and the rates it was calibrated with.

A step's time is projected from three kinds of work, each at a rate measured on an H100 (the
files named below) or stated by the hardware's vendor:

* the model's training FLOPs (titan_v4/model/flops.py, the one counting rule) in two parts: the
  output head's GEMMs (LM and MTP heads, [tokens, dim] x [dim, vocab]) at the rate of a large bf16
  GEMM, and everything else at the achieved rate of flash_proxy's step on one H100 (eager or
  compiled blocks) once its head, AdamW and casts are taken out; activation checkpointing adds the
  recomputed forward of the blocks (a third of their FLOPs for ``full``);
* bytes through HBM for the work that is bandwidth-bound: the AdamW step (28 bytes per parameter)
  and autocast's weight casts on a single device (fp32 read + bf16 write per use);
* bytes over NVLink inside a node and over the network between nodes, per GPU and direction.

Newton-Schulz (Muon) runs at its measured rate.
"""

from __future__ import annotations

import dataclasses

#: flash_proxy on one H100 with the Triton kernels, AC none, seq 4096, AdamW: eager 12,133 and
#: compiled 17,205 tokens/s (docs/perf/2026-12-07-planner-h100.md), x 15.91 GFLOP per token;
#: :func:`calibrated_rate` takes the step's AdamW, casts and head GEMMs out.
MEASURED_TOKENS_PER_S = {"eager": 12_133.0, "compiled": 17_205.0}
FLASH_PROXY_FLOPS_PER_TOKEN = 15.91e9
FLASH_PROXY_PARAMS = 3_813_486_424
FLASH_PROXY_CAST_PARAMS = 3_284_000_000  # the matmul weights autocast casts (all but the embedding)
FLASH_PROXY_HEAD_FLOPS_PER_TOKEN = 6 * 2 * 529_530_880  # LM + MTP head: 6 x vocab x dim each
#: A large bf16 GEMM on the H100 (docs/perf/2026-11-27-step-h100.md): the head's GEMMs.
GEMM_FLOPS = 790e12
#: Newton-Schulz at flash_proxy's shapes: 279 TFLOP in 529 ms (docs/perf/2026-12-07-muon-h100.md).
NEWTON_SCHULZ_FLOPS = 527e12
ADAMW_BYTES_PER_PARAM = 28  # read p, g, m, v; write p, m, v (fp32)


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One GPU model and its interconnect (bytes/s per GPU and direction)."""

    name: str
    memory_bytes: int
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float
    network_bytes_per_s: float


def h100(memory_gib: float = 80.0) -> Hardware:
    """H100 SXM: 989 TFLOP/s bf16 dense; HBM3 at 2.6 TB/s as the AdamW step achieves (28 bytes a
    parameter in 41.2 ms for 3.81 B parameters, docs/perf/2026-12-07-muon-h100.md); NVLink 4 at 450
    GB/s per direction, of which NCCL's large collectives reach about 80 % (360 GB/s); one 400 Gb/s
    NDR port per GPU between nodes (50 GB/s, 45 GB/s achieved). The card's usable memory: the
    `--gpu-memory-gib` (80 GiB H100 less what the CUDA context and allocator keep: 79 GiB are
    allocatable on the cards the device tool lends)."""
    return Hardware(
        name="H100 SXM", memory_bytes=int(memory_gib * 2**30), peak_bf16_flops=989e12, hbm_bytes_per_s=2.6e12,
        nvlink_bytes_per_s=360e9, network_bytes_per_s=45e9,
    )  # fmt: skip


def cast_seconds(cast_params: int, uses: int, hw: Hardware) -> float:
    """autocast's weight casts: each use reads the fp32 weight and writes a bf16 copy."""
    return cast_params * 6 * uses / hw.hbm_bytes_per_s


def calibrated_rate(mode: str, hw: Hardware) -> float:
    """Achieved FLOP/s of the model's compute other than the head GEMMs in `mode` ("eager" or
    "compiled"): the measured flash_proxy step less its AdamW step, its casts (one per weight
    without checkpointing; the backward uses the forward's copy) and its head GEMMs."""
    step = 4096 / MEASURED_TOKENS_PER_S[mode]
    other = FLASH_PROXY_PARAMS * ADAMW_BYTES_PER_PARAM / hw.hbm_bytes_per_s + cast_seconds(FLASH_PROXY_CAST_PARAMS, 1, hw)
    head = FLASH_PROXY_HEAD_FLOPS_PER_TOKEN * 4096 / GEMM_FLOPS
    return (FLASH_PROXY_FLOPS_PER_TOKEN - FLASH_PROXY_HEAD_FLOPS_PER_TOKEN) * 4096 / (step - other - head)


def compute_seconds(flops: float, head_flops: float, mode: str, recompute: float, hw: Hardware) -> float:
    """Time of `flops` training FLOPs of which `head_flops` are the output head's GEMMs (never
    recomputed: the head is not checkpointed)."""
    return (flops - head_flops) / calibrated_rate(mode, hw) * recompute + head_flops / GEMM_FLOPS


def recompute_factor(mode: str, selective_option: str) -> float:
    """Time factor of activation checkpointing on the compute: the forward (a third of the FLOPs) once
    more for every checkpointed block."""
    if mode == "full":
        return 4 / 3
    if mode == "selective" and selective_option.isdigit():
        return 1 + 1 / (3 * int(selective_option))
    if mode == "selective":  # per-op: the matmuls and attention are kept, the rest recomputed
        return 1.05
    return 1.0
