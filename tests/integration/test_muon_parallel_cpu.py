"""``--optimizer.name Muon`` in parallel layouts takes the single-process optimizer's steps:
./run_train.sh on CPU processes over gloo, the debugmodel flavor in fp32, one seed checkpoint, and
the loss and grad norm of each of 4 steps within MUON_LAYOUT_REL.

The single-process optimizer, for a layout with one data-parallel rank (pipeline stages), is one
process; for two data-parallel ranks (which read other data than one process) it is DDP: every
replica holds whole parameters and the all-reduced gradient, and runs Muon as one process does.
FSDP2 shards each matrix over the ranks (titan_v4/train/muon.py gathers it to one owner rank),
expert parallelism gives each rank whole experts of its own.
"""

import pytest

from tests.helpers.layout_runs import Runs
from tests.helpers.tensorboard_metrics import TENSORBOARD_ARGS

STEPS = 4
TRAIN_ARGS = (
    "--optimizer.name", "Muon", "--training.steps", str(STEPS), "--training.local_batch_size", "4",
    "--training.seq_len", "64", "--lr_scheduler.warmup_steps", "2", "--debug.seed", "0",
    "--checkpoint.enable", "--checkpoint.interval", "100", "--checkpoint.keep_latest_k", "0", *TENSORBOARD_ARGS,
)  # fmt: skip
DDP2 = ("--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1")
FSDP2 = ("--parallelism.data_parallel_shard_degree", "2")
# Muon's Newton-Schulz rounds to bf16: a layout's fp32 rounding differences in the gradients (~1e-7)
# can move a bf16 rounding. Measured: see the assertions' messages.
MUON_LAYOUT_REL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("muon_layouts"), TRAIN_ARGS)


def assert_same_curves(actual, expected):
    (_, loss, grad_norm), (_, ref_loss, ref_grad_norm) = actual, expected
    for name, values, ref in (("loss", loss, ref_loss), ("grad_norm", grad_norm, ref_grad_norm)):
        assert sorted(values) == list(range(1, STEPS + 1)), (name, values)
        worst = max(abs(values[s] - ref[s]) / abs(ref[s]) for s in values)
        assert worst < MUON_LAYOUT_REL, (name, worst, values, ref)
    # Muon moved the model: the curves are not the first step's.
    assert loss[STEPS] < loss[1] - 0.05, loss


@pytest.mark.slow
def test_pipeline_stages_step_like_one_process(runs):
    pp = runs.get("pp2", "--parallelism.pipeline_parallel_degree", "2", nproc=2)
    assert_same_curves(pp, runs.get("one-process"))


@pytest.mark.slow
def test_fsdp_steps_like_ddp(runs):
    fsdp = runs.get("fsdp2", *FSDP2, nproc=2)
    assert "gathered to an owner rank" in fsdp[0].log
    assert_same_curves(fsdp, runs.get("ddp2", *DDP2, nproc=2))


@pytest.mark.slow
def test_expert_parallel_with_fsdp_steps_like_ddp(runs):
    ep = runs.get("ep2-fsdp2", *FSDP2, "--parallelism.expert_parallel_degree", "2", nproc=2)
    assert_same_curves(ep, runs.get("ddp2", *DDP2, nproc=2))
