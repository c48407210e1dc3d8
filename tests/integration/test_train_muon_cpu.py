"""End to end with ``--optimizer.name Muon``: the debug model trains on the CPU through
./run_train.sh, checkpoints (Muon's momentum and AdamW's moments included), and a run resumed from
the middle checkpoint continues with the uninterrupted run's losses."""

import shutil

import pytest

from tests.helpers.train_runner import read_metrics, run_train

ARGS = ("--optimizer.name", "Muon", "--training.steps", "6", "--checkpoint.interval", "3",
        "--lr_scheduler.warmup_steps", "2")  # fmt: skip


@pytest.mark.slow
def test_muon_trains_checkpoints_and_resumes(tmp_path):
    first = run_train(*ARGS, "--job.dump_folder", str(tmp_path / "first"))
    assert "titan_v4: optimizer Muon: Muon " in first.log
    assert "by torchtitan (the optimizer is not torch's fused Adam / AdamW)" in first.log
    assert sorted(first.loss) == [1, 2, 3, 4, 5, 6], first.log[-4000:]
    # Measured: 10.50, 10.46, 10.33, 10.27, ..., 10.06 (the debug config's lr 8e-4, warm-up 2).
    assert all(first.loss[s + 1] < first.loss[s] for s in range(1, 6)), first.loss
    assert first.loss[6] < first.loss[1] - 0.3, first.loss
    checkpoints = tmp_path / "first" / "checkpoint"
    for step in (3, 6):
        assert (checkpoints / f"step-{step}" / ".metadata").is_file()

    shutil.copytree(checkpoints / "step-3", tmp_path / "second" / "checkpoint" / "step-3")
    second = run_train(*ARGS, "--job.dump_folder", str(tmp_path / "second"))
    assert "titan_v4: resuming from the checkpoint of step 3; next step is 4" in second.log
    assert sorted(second.loss) == [4, 5, 6]
    first_losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "first")}
    second_losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "second")}
    for step in (4, 5, 6):
        assert second_losses[step] == pytest.approx(first_losses[step], rel=1e-6), (first_losses, second_losses)
