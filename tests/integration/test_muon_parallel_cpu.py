"""``--optimizer.name Muon`` in parallel layouts takes the single-process optimizer's steps:
./run_train.sh on CPU processes over gloo, the debugmodel flavor in fp32, one seed checkpoint, and
the loss and grad norm of each of 4 steps within MUON_LAYOUT_REL.

The single-process optimizer, for a layout with one data-parallel rank (pipeline stages), is one
process; for two data-parallel ranks (which read other data than one process) it is DDP: every
replica holds whole parameters and the all-reduced gradient, and runs Muon as one process does.
FSDP2 shards each matrix over the ranks (titan_v4/train/muon.py gathers it to one owner rank),
expert parallelism gives each rank whole experts of its own; HSDP (4 processes) is compared with
DDP=4. Also: an FSDP=2 run resumes its own step-2 checkpoint exactly, and DDP=2 resumes it too (the
momentum resharded by the checkpoint).
"""

import shutil

import pytest

from tests.helpers import layout_runs
from tests.helpers.layout_runs import Runs
from tests.helpers.tensorboard_metrics import TENSORBOARD_ARGS, precise_metrics
from tests.helpers.train_runner import run_train

STEPS = 4
TRAIN_ARGS = (
    "--optimizer.name", "Muon", "--training.steps", str(STEPS), "--training.local_batch_size", "4",
    "--training.seq_len", "64", "--lr_scheduler.warmup_steps", "2", "--debug.seed", "0",
    # A checkpoint at step 2 (and at the end) for the resume tests.
    "--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0", *TENSORBOARD_ARGS,
)  # fmt: skip
DDP2 = ("--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1")
FSDP2 = ("--parallelism.data_parallel_shard_degree", "2")
# Muon's Newton-Schulz rounds to bf16: a layout's fp32 rounding differences in the gradients (~1e-7)
# can move a bf16 rounding. Measured (worst of loss and grad norm over the steps): PP=2 against one
# process 1.9e-6; FSDP=2 and EP=2 x FSDP=2 against DDP=2 1.1e-5; HSDP 2 x 2 against DDP=4 1.1e-5; DDP=2 resumed from the FSDP=2
# checkpoint 1.1e-5; FSDP=2 resumed from its own 0. Orthogonalising FSDP shards instead of whole
# matrices is off by 1.4e-3.
MUON_LAYOUT_REL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("muon_layouts"), TRAIN_ARGS)


def assert_same_curves(actual, expected, steps=range(1, STEPS + 1), rel=MUON_LAYOUT_REL):
    layout_runs.assert_same_curves(actual, expected, steps, rel)
    ref_loss = expected[1]
    assert ref_loss[STEPS] < ref_loss[1] - 0.05, ref_loss  # Muon moved the model


def resume(runs, source: str, name: str, *args: str, nproc: int):
    """A run in a new folder that resumes from the step-2 checkpoint of the run ``source``."""
    folder = runs.root / name
    shutil.copytree(runs.root / source / "checkpoint" / "step-2", folder / "checkpoint" / "step-2")
    run = run_train(*runs.train_args, *args, "--job.dump_folder", str(folder), nproc=nproc, log_rank="0")
    assert "titan_v4: resuming from the checkpoint of step 2; next step is 3" in run.log
    return (run, *precise_metrics(folder))


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


@pytest.mark.slow
def test_fsdp_resumes_its_checkpoint_exactly(runs):
    """The momentum buffers are DTensors sharded like their parameters: saved and loaded with them."""
    fsdp = runs.get("fsdp2", *FSDP2, nproc=2)
    resumed = resume(runs, "fsdp2", "fsdp2-resumed", *FSDP2, nproc=2)
    assert_same_curves(resumed, fsdp, steps=(3, 4), rel=1e-6)


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_under_ddp(runs):
    """Resharded by torchtitan's distributed checkpoint: the FSDP=2 run's state continues under DDP=2
    as the FSDP=2 run continued (DDP and FSDP agree within MUON_LAYOUT_REL, test_fsdp_steps_like_ddp)."""
    fsdp = runs.get("fsdp2", *FSDP2, nproc=2)
    resumed = resume(runs, "fsdp2", "ddp2-from-fsdp2", *DDP2, nproc=2)
    assert_same_curves(resumed, fsdp, steps=(3, 4))


@pytest.mark.slow
def test_hsdp_steps_like_ddp(runs):
    """HSDP: FSDP2 on a [replicate 2, shard 2] mesh; each replica gathers over its own shard group."""
    hsdp = runs.get("hsdp", "--parallelism.data_parallel_replicate_degree", "2", *FSDP2, nproc=4)
    assert "Applied HSDP to the model" in hsdp[0].log
    assert "gathered to an owner rank (in turn over the 2 ranks of its shard group" in hsdp[0].log
    ddp4 = ("--parallelism.data_parallel_replicate_degree", "4", "--parallelism.data_parallel_shard_degree", "1")
    assert_same_curves(hsdp, runs.get("ddp4", *ddp4, nproc=4))
