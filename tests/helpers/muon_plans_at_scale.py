"""Prints, as JSON, how Muon assembles the matrices of rank 0 of ``flash.toml`` at N ranks: the
flash model on the meta device, parallelized by titan_v4's own code on a fake process group of N
ranks (no data moves; placements and local shapes are real).

    python -m tests.helpers.muon_plans_at_scale N EP
"""

import json
import sys
from collections import Counter

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

import titan_v4  # noqa: F401  (first: installs the CPU shim before torchtitan is imported)
from torchtitan.config import ConfigManager
from torchtitan.distributed import ParallelDims

from titan_v4.flavors import deepseek_v4_args
from titan_v4.infra.parallelize import parallelize_deepseek_v4
from titan_v4.model.model import DeepSeekV4Model
from titan_v4.train.muon import whole_matrix_plan
from titan_v4.train.optimizer import muon_or_adamw


def main(world: int, ep: int) -> None:
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    config = ConfigManager().parse_args(
        ["--job.config_file", "train_configs/flash.toml", "--parallelism.expert_parallel_degree", str(ep)]
    )
    dims = ParallelDims(dp_shard=-1, dp_replicate=1, cp=1, tp=1, pp=1, ep=ep, etp=1, world_size=world)
    with torch.device("meta"):
        model = DeepSeekV4Model(deepseek_v4_args["flash"])
    parallelize_deepseek_v4(model, dims, config)
    plans: Counter = Counter()
    experts = None
    for name, p in model.named_parameters():
        if muon_or_adamw(name, p) != "muon":
            continue
        plan = whole_matrix_plan(p)
        plans[f"gathered over {plan.size}" if plan.gathered else "whole"] += 1
        if name.endswith("moe.experts.w1") and experts is None:
            experts = {"placements": [f"{type(pl).__name__}({pl.dim})" for pl in p.placements], "local": list(p.to_local().shape),
                       "gathered": plan.gathered, "group": plan.size, "assembled": list(plan.shape)}  # fmt: skip
    print(json.dumps({"plans": plans, "experts_w1": experts}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
