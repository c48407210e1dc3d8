"""Muon's whole-matrix plans on flash.toml's own layout at sizes no machine here has: the flash model,
parallelized by titan_v4's code on a fake process group (tests/helpers/muon_plans_at_scale.py), so
the placements FSDP2 and EP really produce are planned. 16 ranks with EP 8: the experts get an FSDP
unit sharded on the expert dim too (a strided shard): each rank still holds whole experts. 512 ranks:
more ranks than experts, so FSDP shards the experts' rows: they are gathered over their 64-rank
FSDP group, the dense matrices over all 512."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def plans(world: int, ep: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.muon_plans_at_scale", str(world), str(ep)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_experts_stay_whole_under_ep_with_an_fsdp_unit():
    found = plans(16, 8)
    experts = found["experts_w1"]
    assert experts["placements"] == ["_StridedShard(0)", "Shard(0)"]
    assert experts["local"] == [16, 2048, 4096] and not experts["gathered"]  # 256 experts / 16 ranks, whole
    assert set(found["plans"]) == {"whole", "gathered over 16"}


@pytest.mark.slow
def test_experts_cut_on_their_rows_are_gathered_over_their_fsdp_group():
    found = plans(512, 8)
    experts = found["experts_w1"]
    assert experts["placements"] == ["Shard(1)", "Shard(0)"]
    assert experts["gathered"] and experts["group"] == 64 and experts["assembled"] == [32, 2048, 4096]
    assert experts["local"] == [32, 32, 4096]
    assert {"gathered over 512", "gathered over 64"} <= set(found["plans"])
