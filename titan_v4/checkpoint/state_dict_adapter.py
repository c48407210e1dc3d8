"""titan-v4 <-> HF-layout state dicts, and the reader torchtitan loads HF-layout or official
checkpoints through.

torchtitan's adapter protocol: `to_hf(titan_sd) -> hf_sd`, `from_hf(hf_sd) -> titan_sd`,
`get_hf_storage_reader(path)`. With `[checkpoint] initial_load_in_hf = true`, torchtitan calls
`to_hf` on the model's (possibly sharded) state dict, loads the result with DCP through
`get_hf_storage_reader`, and loads `from_hf` of it back into the model.

Names (one table for all three spellings: titan_v4/checkpoint/names.py):
- main layers and top-level tensors get HF transformers' names; routed experts are stacked as HF
  does: `gate_up_proj [E, 2I, D]` = cat(w1, w3) on dim 1 and `down_proj [E, D, I]` (titan keeps
  torchtitan's `w1`/`w3 [E, I, D]`, `w2 [E, D, I]`);
- HF has no MTP, so MTP blocks keep their official names (`mtp.K.attn.wq_a.weight`, one
  `mtp.K.ffn.experts.E.w1.weight` per expert), which HF transformers ignores on load;
- the expert-bias buffer of hash-routed layers has no counterpart (hash layers carry `tid2eid`
  instead): `to_hf` drops it and the model's init leaves it 0.

Under expert parallelism / FSDP the MTP expert weights are DTensors sharded on the expert dim;
`to_hf` hands out the rank's own experts as views of its local shard (so a load writes straight into
the parameter) and `from_hf` restacks them into a DTensor of the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from torchtitan.protocols.state_dict_adapter import StateDictAdapter
from torchtitan.tools.logging import logger

from titan_v4.checkpoint import names
from titan_v4.checkpoint.reader import CheckpointReader
from titan_v4.model.args import DeepSeekV4ModelArgs
from titan_v4.model.model import DeepSeekV4Model


@dataclass(frozen=True)
class _ShardedExperts:
    """Where a rank's slice of one stacked expert DTensor sits, to restack it in from_hf."""

    mesh: DeviceMesh
    placements: tuple
    shape: torch.Size
    stride: tuple[int, ...]
    first: int  # global index of the rank's first expert
    count: int  # experts held by the rank


class DeepSeekV4StateDictAdapter(StateDictAdapter):
    def __init__(self, model_args: DeepSeekV4ModelArgs, hf_assets_path: str | None):
        super().__init__(model_args, hf_assets_path)
        self.model_args = model_args
        # titan key of a sharded MTP expert weight -> its layout, recorded by to_hf for from_hf.
        self._sharded_experts: dict[str, _ShardedExperts] = {}

    # ------------------------------------------------------------------ names
    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        hf: dict[str, Any] = {}
        pending_w1: dict[str, Any] = {}
        pending_w3: dict[str, Any] = {}
        for key, value in state_dict.items():
            if key in names.TOP_TITAN_TO_HF:
                hf[names.TOP_TITAN_TO_HF[key]] = value
                continue
            m = names.TITAN_BLOCK.match(key)
            if m is None:
                raise KeyError(f"to_hf: unknown titan-v4 key {key!r}")
            group, idx, suffix = m.groups()
            if group == "mtp":
                self._mtp_to_hf(hf, key, idx, suffix, value)
                continue
            prefix = f"model.layers.{idx}."
            if suffix == "moe.expert_bias" and self.model_args.is_hash_layer(int(idx)):
                continue  # unused by hash routing; HF has no such buffer there
            if suffix == names.titan_expert_suffix("w1"):
                pending_w1[prefix] = value
            elif suffix == names.titan_expert_suffix("w3"):
                pending_w3[prefix] = value
            elif suffix == names.titan_expert_suffix("w2"):
                hf[prefix + names.HF_DOWN] = value
            elif suffix in names.BLOCK_TITAN_TO_HF:
                hf[prefix + names.BLOCK_TITAN_TO_HF[suffix]] = value
            else:
                raise KeyError(f"to_hf: unknown titan-v4 key {key!r}")
        if pending_w1.keys() != pending_w3.keys():
            raise KeyError(f"to_hf: experts w1 and w3 must come together; got w1 for {sorted(pending_w1)}, w3 for {sorted(pending_w3)}")
        for prefix, w1 in pending_w1.items():
            hf[prefix + names.HF_GATE_UP] = torch.cat((w1, pending_w3[prefix]), dim=1)
        return hf

    def _mtp_to_hf(self, hf: dict[str, Any], key: str, idx: str, suffix: str, value: Any) -> None:
        prefix = f"mtp.{idx}."
        for weight in names.EXPERT_WEIGHTS:
            if suffix == names.titan_expert_suffix(weight):
                for expert, piece in self._split_experts(key, value).items():
                    hf[prefix + names.official_expert_suffix(expert, weight)] = piece
                return
        if suffix not in names.BLOCK_TITAN_TO_OFFICIAL:
            raise KeyError(f"to_hf: unknown titan-v4 key {key!r}")
        hf[prefix + names.BLOCK_TITAN_TO_OFFICIAL[suffix]] = value

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        sd: dict[str, Any] = {}
        mtp_experts: dict[str, dict[int, Any]] = {}  # titan key -> {expert: [out, in] tensor}
        for key, value in hf_state_dict.items():
            if key in names.TOP_HF_TO_TITAN:
                sd[names.TOP_HF_TO_TITAN[key]] = value
                continue
            m = names.HF_BLOCK.match(key)
            if m is None:
                raise KeyError(f"from_hf: unknown HF DeepseekV4 key {key!r}")
            group, idx, suffix = m.groups()
            if group == "mtp":
                expert = names.OFFICIAL_EXPERT.match(suffix)
                if expert is not None:
                    titan_key = f"mtp.{idx}." + names.titan_expert_suffix(expert.group(2))
                    mtp_experts.setdefault(titan_key, {})[int(expert.group(1))] = value
                elif suffix in names.BLOCK_OFFICIAL_TO_TITAN:
                    sd[f"mtp.{idx}.{names.BLOCK_OFFICIAL_TO_TITAN[suffix]}"] = value
                else:
                    raise KeyError(f"from_hf: unknown HF DeepseekV4 key {key!r}")
                continue
            prefix = f"layers.{idx}."
            if suffix == names.HF_GATE_UP:
                w1, w3 = value.chunk(2, dim=1)
                sd[prefix + names.titan_expert_suffix("w1")] = w1
                sd[prefix + names.titan_expert_suffix("w3")] = w3
            elif suffix == names.HF_DOWN:
                sd[prefix + names.titan_expert_suffix("w2")] = value
            elif suffix in names.BLOCK_HF_TO_TITAN:
                sd[prefix + names.BLOCK_HF_TO_TITAN[suffix]] = value
            else:
                raise KeyError(f"from_hf: unknown HF DeepseekV4 key {key!r}")
        for titan_key, pieces in mtp_experts.items():
            sd[titan_key] = self._stack_experts(titan_key, pieces)
        return sd

    def _split_experts(self, titan_key: str, value: Any) -> dict[int, Any]:
        """Stacked [E, out, in] -> {global expert index: [out, in] view} for the experts this rank holds."""
        if not isinstance(value, DTensor):
            return {e: value[e] for e in range(value.shape[0])}
        local_shape, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        if any(offset[1:]) or tuple(local_shape[1:]) != tuple(value.shape[1:]):
            raise NotImplementedError(
                f"to_hf: {titan_key} is sharded inside an expert (placements {value.placements}); the HF "
                "layout's per-expert MTP weights need the experts sharded on dim 0 only (use fewer "
                "expert-sharding ranks than experts)"
            )
        local = value.to_local()
        self._sharded_experts[titan_key] = _ShardedExperts(
            value.device_mesh, tuple(value.placements), value.shape, value.stride(), offset[0], local.shape[0]
        )
        return {offset[0] + i: local[i] for i in range(local.shape[0])}

    def _stack_experts(self, titan_key: str, pieces: dict[int, Any]) -> Any:
        """{expert: [out, in]} -> [E, out, in]; a DTensor again where to_hf split one."""
        layout = self._sharded_experts.get(titan_key)
        first, count = (layout.first, layout.count) if layout else (0, self.model_args.n_routed_experts)
        if sorted(pieces) != list(range(first, first + count)):
            raise KeyError(
                f"from_hf: {titan_key} needs the per-expert weights of experts {first}..{first + count - 1}, "
                f"got experts {sorted(pieces)}"
            )
        stacked = torch.stack([pieces[e] for e in range(first, first + count)])
        if layout is None:
            return stacked
        return DTensor.from_local(
            stacked, layout.mesh, layout.placements, run_check=False, shape=layout.shape, stride=layout.stride
        )

    # ------------------------------------------------------------------ reading checkpoints
    def get_hf_storage_reader(self, path: str, from_quantized: bool = False) -> CheckpointReader:
        """A DCP reader for an HF-layout or official-layout directory (detected from its tensor
        names; `from_quantized` is not needed: the quantisation is read from the files).

        The directory is checked against this model before anything is read: its config.json
        (when present) field by field, then every tensor's name and shape; the first mismatch
        raises CheckpointMismatchError.
        """
        if from_quantized:
            logger.info("checkpoint.initial_load_in_hf_quantized is not needed: quantised weights are recognised in the files")
        return CheckpointReader(path, expected_hf_tensors(self.model_args), self.model_args)


def expected_hf_tensors(model_args: DeepSeekV4ModelArgs) -> dict[str, torch.Tensor]:
    """The HF-layout state dict of a model with these args, as meta tensors (names, shapes, dtypes)."""
    with torch.device("meta"):
        model = DeepSeekV4Model(model_args)
    return DeepSeekV4StateDictAdapter(model_args, None).to_hf(model.state_dict())
