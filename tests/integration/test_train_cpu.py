"""End to end: the default config (train_configs/debug.toml, deepseek_v4 debugmodel) trains on the
CPU through ./run_train.sh, writes checkpoints, and a restart resumes exactly where it stopped."""

import re
import shutil

import pytest

from tests.helpers.train_runner import read_metrics, run_train

# A short version of the default run: checkpoints at steps 3 and 6, a short warm-up so the loss
# visibly falls within 6 steps. The config's own seed (debug.seed) lets runs be compared number for number.
ARGS = ("--training.steps", "6", "--checkpoint.interval", "3", "--lr_scheduler.warmup_steps", "2")


@pytest.mark.slow
def test_default_config_trains_checkpoints_and_resumes(tmp_path):
    first = run_train(*ARGS, "--job.dump_folder", str(tmp_path / "first"))
    assert sorted(first.loss) == [1, 2, 3, 4, 5, 6], first.log[-4000:]
    assert first.loss[6] < first.loss[1] - 0.5, first.loss
    checkpoints = tmp_path / "first" / "checkpoint"
    for step in (3, 6):
        assert (checkpoints / f"step-{step}" / ".metadata").is_file(), sorted(p.name for p in checkpoints.iterdir())

    # A new run whose checkpoint folder holds only step 3 must pick it up and continue at step 4
    # with the same model, optimizer, LR schedule and data position.
    shutil.copytree(checkpoints / "step-3", tmp_path / "second" / "checkpoint" / "step-3")
    second = run_train(*ARGS, "--job.dump_folder", str(tmp_path / "second"))
    assert "Loading the checkpoint from" in second.log and "step-3" in second.log
    assert "titan_v4: resuming from the checkpoint of step 3; next step is 4" in second.log
    assert "Training starts at step 4" in second.log
    assert sorted(second.loss) == [4, 5, 6]
    for step in (4, 5, 6):
        assert second.loss[step] == pytest.approx(first.loss[step], abs=1e-4), (first.loss, second.loss)

    # The shipped config sets a seed: another run of it starts from the same weights, step for step.
    again = run_train(*ARGS[2:], "--training.steps", "2", "--job.dump_folder", str(tmp_path / "again"))
    assert sorted(again.loss) == [1, 2]
    first_losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "first")}
    assert [r["loss"] for r in read_metrics(tmp_path / "again")] == [first_losses[1], first_losses[2]]


_TERMS = re.compile(r"step:\s*(\d+)\s+lm_loss: ([\d.]+)\s+mtp_loss: ([\d.]+)")


@pytest.mark.slow
def test_mtp_weight_drops_when_the_lr_decay_starts(tmp_path):
    # 6 steps, warm-up 2, decay over round(6 * 0.5) = 3 steps: torchtitan's schedule decays the lr
    # from step 5 on (its stable phase counts a virtual last step).
    run = run_train("--training.steps", "6", "--lr_scheduler.warmup_steps", "2", "--lr_scheduler.decay_ratio", "0.5",
                    "--v4.mtp_loss_weight", "0.3", "--v4.mtp_loss_weight_in_lr_decay", "0.1", "--checkpoint.no-enable",
                    # One text per sequence: every position has its LM target and all but the last its MTP one.
                    "--v4.no-document_masking", "--job.dump_folder", str(tmp_path))  # fmt: skip
    assert "titan_v4: MTP loss weight 0.3, then 0.1 from step 5 on" in run.log
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path)}
    assert lrs[5] < lrs[4] == lrs[3], lrs  # the lr decays from step 5
    terms = {int(s): (float(lm), float(mtp)) for s, lm, mtp in _TERMS.findall(run.log)}
    assert sorted(terms) == [1, 2, 3, 4, 5, 6]
    seq_len = 256  # debug.toml: the MTP head predicts one token fewer per sequence
    for step, (lm, mtp) in terms.items():
        weight = 0.3 if step < 5 else 0.1
        assert run.loss[step] - lm == pytest.approx(weight * mtp * (seq_len - 1) / seq_len, abs=5e-4), (step, run.loss, terms)
