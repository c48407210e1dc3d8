"""A titan_v4 plug-in that records, after the first training step, the bytes each rank holds.

Loaded with ``--experimental.custom_import tests.helpers.state_bytes_plugin`` (the repository root on
PYTHONPATH) instead of ``titan_v4``, which it imports. After step 1 every rank writes
``<TITAN_V4_TEST_STATE_BYTES>/rank<R>.json``: the bytes of its local parameter shards, of their
gradients and of every tensor in its optimizers' state, counted from the live tensors (not by the
planner's rules, which the test compares against).
"""

import json
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import titan_v4  # noqa: F401
from titan_v4.train.trainer import V4Trainer


def _bytes(t: torch.Tensor) -> int:
    shard = t.to_local() if isinstance(t, DTensor) else t
    return shard.numel() * shard.element_size()


def _record(trainer) -> None:
    params = [p for part in trainer.model_parts for p in part.parameters()]
    state = [v for o in trainer.optimizers.optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
    record = {
        "parameters": sum(_bytes(p) for p in params),
        "gradients": sum(_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_bytes(v) for v in state),
    }
    folder = os.environ["TITAN_V4_TEST_STATE_BYTES"]
    with open(os.path.join(folder, f"rank{dist.get_rank() if dist.is_initialized() else 0}.json"), "w") as f:
        json.dump(record, f)


_train_step = V4Trainer.train_step


def train_step(self, data_iterator):
    result = _train_step(self, data_iterator)
    if self.step == 1 and os.environ.get("TITAN_V4_TEST_STATE_BYTES"):
        _record(self)
    return result


V4Trainer.train_step = train_step
