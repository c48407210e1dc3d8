"""Loading a checkpoint directory into a titan-v4 model in one process, the way torchtitan's
CheckpointManager does with `[checkpoint] initial_load_in_hf = true`."""

import torch.distributed.checkpoint as dcp

from titan_v4.checkpoint.state_dict_adapter import DeepSeekV4StateDictAdapter
from titan_v4.model.model import DeepSeekV4Model


def load_like_torchtitan(model: DeepSeekV4Model, path) -> None:
    """to_hf(model state) -> dcp.load through the adapter's reader -> load_state_dict(from_hf(...)).

    Every model tensor must be loaded except the (unused) expert bias of hash-routed layers."""
    adapter = DeepSeekV4StateDictAdapter(model.model_args, None)
    hf_state = adapter.to_hf(model.state_dict())
    dcp.load(hf_state, storage_reader=adapter.get_hf_storage_reader(str(path)), no_dist=True)
    missing, unexpected = model.load_state_dict(adapter.from_hf(hf_state), strict=False)
    hash_bias = {f"layers.{i}.moe.expert_bias" for i in range(model.model_args.n_hash_layers)}
    assert unexpected == [] and set(missing) == hash_bias, (missing, unexpected)
