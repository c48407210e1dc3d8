"""End to end on the CPU (./run_train.sh, the debug config): a sequence-length stage switch is a resume
with a new training.seq_len, together with the indexer's phase switch (docs/long_context.md)."""

import math

import pytest

from tests.helpers.train_runner import read_metrics, run_train

COMMON = ("--training.local_batch_size", "2", "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "0",
          "--lr_scheduler.warmup_steps", "1", "--debug.seed", "0")  # fmt: skip


@pytest.mark.slow
def test_a_stage_switch_resumes_at_a_longer_sequence_and_the_next_phase(tmp_path):
    folder = ("--job.dump_folder", str(tmp_path))
    first = run_train(*COMMON, *folder, "--training.seq_len", "64", "--training.steps", "2", "--v4.indexer_phase", "dense")
    assert sorted(first.loss) == [1, 2]
    second = run_train(*COMMON, *folder, "--training.seq_len", "256", "--training.steps", "4", "--v4.indexer_phase", "sparse")
    assert "titan_v4: resuming from the checkpoint of step 2; next step is 3" in second.log
    assert sorted(second.loss) == [3, 4] and all(math.isfinite(v) for v in second.loss.values()), second.log[-3000:]
    assert {r["step"] for r in read_metrics(tmp_path)} == {1, 2, 3, 4}  # one metrics file across the stages
    assert "indexer_recall" in second.log  # the sparse phase's KL terms are logged
