"""Two CPU processes (gloo) through ./run_train.sh: a kill -9 in the middle of a checkpoint save
resumes with bit-identical losses, DDP gradients equal FSDP ones, a change of data-parallel degree
on resume is refused with the ways forward, and a failure on a rank whose output is hidden
(LOG_RANK=0) still ends the output with its message. Few runs, tiny settings: these are slow."""

import json
import os
import shutil

import pytest

from tests.helpers.train_runner import read_metrics, run_train

TINY = ("--training.seq_len", "64", "--training.local_batch_size", "2", "--debug.seed", "0",
        "--lr_scheduler.warmup_steps", "2")  # fmt: skip
FSDP2 = ("--parallelism.data_parallel_shard_degree", "2")


@pytest.mark.slow
def test_kill_during_a_checkpoint_save_resumes_bit_exactly_and_ddp_matches_fsdp(tmp_path):
    steps = ("--training.steps", "4", "--checkpoint.interval", "2")
    # The reference: four uninterrupted steps (checkpoints at 2 and 4).
    ref = tmp_path / "ref"
    run_train(*TINY, *FSDP2, *steps, "--job.dump_folder", str(ref), nproc=2)
    want = {r["step"]: r for r in read_metrics(ref)}
    assert sorted(want) == [1, 2, 3, 4]

    # The same run, rank 0 killed (SIGKILL) while the step-4 checkpoint is being written.
    dump = tmp_path / "killed"
    plugin = ("--experimental.custom_import", "tests.helpers.fault_plugin")
    killed = run_train(*TINY, *FSDP2, *steps, *plugin, "--job.dump_folder", str(dump), nproc=2, check=False,
                       env={"TITAN_V4_TEST_KILL_AT_SAVE": "4"})  # fmt: skip
    assert killed.returncode != 0 and "ended without a Python error" in killed.last_line, killed.log[-3000:]
    assert (dump / "checkpoint" / "step-4").is_dir() and not (dump / "checkpoint" / "step-4" / ".metadata").exists()

    # The restart skips the interrupted save, resumes at step 2 and repeats steps 3-4 bit for bit.
    resumed = run_train(*TINY, *FSDP2, *steps, "--job.dump_folder", str(dump), nproc=2)
    assert "step-4 is incomplete" in resumed.log and "Training starts at step 3" in resumed.log
    again = read_metrics(dump)[-2:]
    assert [r["step"] for r in again] == [3, 4]
    for r in again:
        assert (r["loss"], r["grad_norm"]) == (want[r["step"]]["loss"], want[r["step"]]["grad_norm"]), (r, want)

    # DDP (2 replicas) on the same weights and data (FSDP's step-2 checkpoint, resharded by DCP):
    # step 3 has the same loss and gradient norm as under FSDP.
    ddp = tmp_path / "ddp"
    shutil.copytree(ref / "checkpoint" / "step-2", ddp / "checkpoint" / "step-2")
    run_train(*TINY, "--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree",
              "1", "--training.steps", "3", "--job.dump_folder", str(ddp), nproc=2)  # fmt: skip
    got = read_metrics(ddp)[-1]
    assert got["step"] == 3
    assert got["grad_norm"] == pytest.approx(want[3]["grad_norm"], rel=1e-5), (got, want[3])
    assert got["loss"] == pytest.approx(want[3]["loss"], rel=1e-6)

    # Resuming the 2-process checkpoint in one process: refused, saying how to go on.
    single = tmp_path / "single"
    shutil.copytree(ref / "checkpoint", single / "checkpoint")
    run = run_train(*TINY, "--training.steps", "6", "--job.dump_folder", str(single), check=False)
    assert run.returncode != 0
    assert "saved with data-parallel degree 2 and this run has 1" in run.last_line, run.log[-3000:]
    assert "--checkpoint.exclude_from_loading dataloader" in run.last_line


@pytest.mark.slow
def test_a_failure_on_a_hidden_rank_is_the_last_line(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"text": "a single document, so rank 1 gets none"}) + "\n")
    run = run_train(*TINY, *FSDP2, "--v4.dataset", "local", "--v4.dataset_path", str(data),
                    "--job.dump_folder", str(tmp_path / "run"), nproc=2, log_rank=0, check=False)  # fmt: skip
    assert run.returncode != 0
    assert "rank 1: DataError: data-parallel rank 1 of 2 gets no documents" in run.last_line, run.log[-3000:]
    assert os.path.isfile(tmp_path / "run" / "logs" / "rank_1.log")
    assert "Data: 1 local json file(s)" in run.log and "synthetic data" not in run.log
