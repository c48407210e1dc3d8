"""Pipeline parallelism (every schedule, and with FSDP2 / EP) and HSDP train DeepSeek-V4 exactly
like the run without them: ./run_train.sh on CPU processes over gloo, the debugmodel flavor (a
hash-routed layer 0, MTP depth 1, so the MTP and balance losses are on) in fp32, one seed
checkpoint, and the loss and grad norm of each of 5 steps within LAYOUT_REL. Also: a pipeline
checkpoint resumes without pipelining, and a pipeline without FSDP trains under bf16 autocast.

Every layout that keeps one data-parallel rank is compared with one single-process run; the
layouts with two data-parallel ranks (which read other data) with one FSDP=2 run; HSDP (4
processes) with FSDP=4. Runs are shared between the tests through a module-scoped cache.
"""

import re
import shutil

import pytest

from tests.helpers import layout_runs
from tests.helpers.layout_runs import Runs
from tests.helpers.tensorboard_metrics import TENSORBOARD_ARGS, precise_metrics
from tests.helpers.tolerances import BF16_LAYOUT_REL, LAYOUT_REL
from tests.helpers.train_runner import read_metrics, run_train

STEPS = 5
TRAIN_ARGS = (
    "--training.steps", str(STEPS), "--training.local_batch_size", "4", "--training.seq_len", "64",
    "--lr_scheduler.warmup_steps", "2", "--debug.seed", "0",
    # A checkpoint at step 3 (and at the end) for the resume test.
    "--checkpoint.enable", "--checkpoint.interval", "3", "--checkpoint.keep_latest_k", "0",
    *TENSORBOARD_ARGS,
)  # fmt: skip
PP2 = ("--parallelism.pipeline_parallel_degree", "2")
HEAD = "hc_head,norm,output,mtp.0"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("pipeline"), TRAIN_ARGS)


def assert_same_curves(actual, expected, steps=range(1, STEPS + 1), rel=LAYOUT_REL):
    layout_runs.assert_same_curves(actual, expected, steps, rel)


def reference(runs):
    return runs.get("reference")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, args",
    [
        pytest.param("1F1B", (*PP2, "--parallelism.pipeline_parallel_schedule", "1F1B"), id="1F1B"),
        # Two stages per rank, split by explicit module lists so the hash-routed layer 0 sits on
        # stage 1, i.e. on rank 1: it routes by the token ids passed to every stage.
        pytest.param(
            "Interleaved1F1B-hash-on-stage-1",
            (*PP2, "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
             "--parallelism.module_fqns_per_model_part", "tok_embeddings", "layers.0,layers.1", "layers.2", f"layers.3,{HEAD}"),
            id="Interleaved1F1B-hash-layer-on-stage-1",
        ),  # fmt: skip
        pytest.param("ZBVZeroBubble", (*PP2, "--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble"), id="ZBVZeroBubble"),
        pytest.param("GPipe", (*PP2, "--parallelism.pipeline_parallel_schedule", "GPipe"), id="GPipe"),
        pytest.param("LoopedBFS", (*PP2, "--parallelism.pipeline_parallel_schedule", "LoopedBFS"), id="LoopedBFS"),
        pytest.param(
            "InterleavedZeroBubble", (*PP2, "--parallelism.pipeline_parallel_schedule", "InterleavedZeroBubble"), id="InterleavedZeroBubble"
        ),
        # Without torchtitan's forward/backward overlap (refused for V4, tests/infra/test_pipeline.py).
        pytest.param(
            "DualPipeV",
            (*PP2, "--parallelism.pipeline_parallel_schedule", "DualPipeV", "--parallelism.no-pipeline_parallel_expert_parallel_overlap"),
            id="DualPipeV",
        ),
    ],
)
def test_pipeline_schedules_train_like_one_process(runs, name, args):
    run = runs.get(name, *args, nproc=2)
    assert_same_curves(run, reference(runs))
    assert_rank_0_logs_the_real_loss(run, runs.root / name)
    if name == "Interleaved1F1B-hash-on-stage-1":
        assert "PP rank 1 is building stage_idx 1 with modules ['layers.0', 'layers.1']" in run[0].log


def assert_rank_0_logs_the_real_loss(run, folder):
    """Rank 0's console line and metrics.jsonl carry the last stage's loss, whichever rank holds
    that stage (torchtitan alone logs -1 on the other ranks)."""
    train_run, loss, _ = run
    console_rank_0 = _rank_0_console_losses(train_run.log)
    logged = {record["step"]: record["loss"] for record in read_metrics(folder)}
    assert sorted(logged) == sorted(loss)
    for step, value in loss.items():
        assert logged[step] == pytest.approx(value, rel=1e-6), (step, logged, loss)
        assert console_rank_0[step] == pytest.approx(value, abs=1e-4), (step, console_rank_0, loss)


def _rank_0_console_losses(log: str) -> dict[int, float]:
    """step -> loss of rank 0's step lines in a log with a ``[rank0]:`` prefix per line."""
    found = {}
    for line in log.splitlines():
        if line.startswith("[rank0]:") and (match := _STEP_LINE.search(line)):
            found[int(match.group(1))] = float(match.group(2))
    return found


_STEP_LINE = re.compile(r"step:\s*(\d+)(?:/\d+)?\s+loss:\s*(-?[\d.]+)")


@pytest.mark.slow
def test_a_pipeline_checkpoint_resumes_in_one_process(runs):
    """DCP resharding: the PP=2 run's step-3 checkpoint (two model parts on two ranks) resumes as
    one whole model in one process, which then trains steps 4-5 like the uninterrupted run."""
    pp_run = runs.get("1F1B", *PP2, "--parallelism.pipeline_parallel_schedule", "1F1B", nproc=2)
    resumed = runs.root / "resumed"
    shutil.copytree(runs.root / "1F1B" / "checkpoint" / "step-3", resumed / "checkpoint" / "step-3")
    run = run_train(*TRAIN_ARGS, "--job.dump_folder", str(resumed))
    assert "Training starts at step 4" in run.log
    assert_same_curves((run, *precise_metrics(resumed)), reference(runs), steps=(4, 5))
    assert_same_curves(pp_run, reference(runs))


@pytest.mark.slow
def test_a_checkpoint_without_pipelining_resumes_in_a_pipeline(runs):
    """The reverse: the one-process run's step-3 checkpoint (the whole model) resumes under PP=2,
    each stage taking its part, and trains steps 4-5 like the uninterrupted run. The resume check
    compares the checkpoint with the whole model's tensors, not with one stage's."""
    reference(runs)
    resumed = runs.root / "resumed-in-pp"
    shutil.copytree(runs.root / "reference" / "checkpoint" / "step-3", resumed / "checkpoint" / "step-3")
    run = run_train(*TRAIN_ARGS, *PP2, "--job.dump_folder", str(resumed), nproc=2, log_rank="0,1")
    assert "Training starts at step 4" in run.log
    assert_same_curves((run, *precise_metrics(resumed)), reference(runs), steps=(4, 5))


@pytest.mark.slow
def test_a_pipeline_starts_from_the_seed_checkpoint_in_its_folder(runs):
    """torchtitan's seed checkpoint (step-0: the model only, written by one process) in the run's
    own checkpoint folder: a PP=2 run starts from its weights with no further flag, and trains like
    the one-process run that loaded the same seed through checkpoint.initial_load_path."""
    folder = runs.root / "pp-from-seed"
    shutil.copytree(runs.seed / "checkpoint", folder / "checkpoint")
    run = run_train(*TRAIN_ARGS, *PP2, "--job.dump_folder", str(folder), nproc=2, log_rank="0,1")
    assert_same_curves((run, *precise_metrics(folder)), reference(runs))


FSDP2 = ("--parallelism.data_parallel_shard_degree", "2")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, args",
    [
        pytest.param("pp2-fsdp2", (*PP2, *FSDP2), id="PP2xFSDP2"),
        pytest.param("pp2-ep2", (*PP2, *FSDP2, "--parallelism.expert_parallel_degree", "2"), id="PP2xEP2"),
    ],
)
def test_pipeline_composes_with_fsdp_and_ep(runs, name, args):
    fsdp2 = runs.get("fsdp2", *FSDP2, nproc=2)
    assert_same_curves(runs.get(name, *args, nproc=4), fsdp2)


@pytest.mark.slow
def test_hsdp_trains_like_fsdp(runs):
    """HSDP = FSDP2 on a [replicate 2, shard 2] mesh. (torchtitan 0.2.2 turns replicate 2 x shard 1
    into DDP, not HSDP, and has no mesh for a shard degree of 1.)"""
    fsdp4 = runs.get("fsdp4", "--parallelism.data_parallel_shard_degree", "4", nproc=4)
    hsdp = runs.get("hsdp", "--parallelism.data_parallel_replicate_degree", "2", *FSDP2, nproc=4)
    assert "Applied HSDP to the model" in hsdp[0].log
    assert_same_curves(hsdp, fsdp4)


@pytest.mark.slow
def test_a_pipeline_without_fsdp_computes_under_autocast(runs):
    """Without FSDP torchtitan 0.2.2 gives pipeline stages no mixed precision; V4 autocasts their
    forward like a single-process run autocasts its own (titan_v4/infra/pipeline.py)."""
    bf16 = ("--training.mixed_precision_param", "bfloat16")
    single = runs.get("bf16-reference", *bf16)
    pp = runs.get("bf16-1F1B", *PP2, *bf16, nproc=2)
    assert "the pipeline stages' forward runs under torch.autocast(torch.bfloat16)" in pp[0].log
    # torchtitan's own line says the opposite (no mixed precision under PP without FSDP): dropped.
    assert "Mixed precision training with TP or PP" not in pp[0].log
    assert "Mixed precision training is disabled" not in pp[0].log
    assert_same_curves(pp, single, rel=BF16_LAYOUT_REL)
    # bf16, not fp32: the first step's gradient norm is far from the fp32 pipeline's (1.3e-3
    # measured) and close to the bf16 single process's (1e-5).
    fp32_pp = runs.get("1F1B", *PP2, "--parallelism.pipeline_parallel_schedule", "1F1B", nproc=2)
    assert pp[2][1] != pytest.approx(fp32_pp[2][1], rel=3e-4)
    assert pp[2][1] == pytest.approx(single[2][1], rel=1e-4)
