"""End to end through ./run_train.sh on the CPU: what a user sees when things go wrong, and when
they go right (docs/reliability.md lists every case and the test that covers it)."""

import os

import pytest
import torch

from tests.helpers.train_runner import read_metrics, run_train

TINY = ("--training.seq_len", "64", "--training.local_batch_size", "2", "--debug.seed", "0",
        "--lr_scheduler.warmup_steps", "2")  # fmt: skip
NOISE = ("memory:", "mfu", "lspci", "Peak flops", "Peak FLOPS", "set_vital", "CPU autocast", "TORCH_NCCL_ASYNC",
         "model.safetensors.index.json", "-0.00GiB")  # fmt: skip


@pytest.mark.slow
def test_a_run_is_pleasant_to_watch_and_resumes_past_a_damaged_checkpoint(tmp_path):
    dump = tmp_path / "run"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    args = (*TINY, "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "2", "--job.dump_folder", str(dump))
    first = run_train(*args, "--training.steps", "3", env={"TMPDIR": str(scratch)})

    # step N/total with an ETA, no CPU noise, a log file in the dump folder, no torchelastic leftovers.
    assert "step:  1/3" in first.log and "step:  3/3" in first.log and "eta: 0:00:00" in first.log
    assert [n for n in NOISE if n in first.log] == []
    log_file = dump / "logs" / "train.log"
    assert "step:  3/3" in log_file.read_text() and "\x1b[" not in log_file.read_text()
    assert [r["step"] for r in read_metrics(dump)] == [1, 2, 3]
    assert os.listdir(scratch) == []
    # keep_latest_k = 2 holds after the final save too.
    assert sorted(os.listdir(dump / "checkpoint")) == ["step-2", "step-3"]

    # A finished job run again says so.
    again = run_train(*args, "--training.steps", "3")
    assert "is at step 3 and training.steps is 3: this job is finished, nothing to train" in again.log
    assert again.loss == {}

    # A truncated newest checkpoint: a warning naming the file, and the run goes on from the previous one.
    data = next((dump / "checkpoint" / "step-3").glob("*.distcp"))
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    resumed = run_train(*args, "--training.steps", "4")
    assert f"step-3 is damaged: {data} is truncated" in resumed.log
    assert "Training starts at step 3" in resumed.log and sorted(resumed.loss) == [3, 4]
    records = read_metrics(dump)
    step3 = [r["loss"] for r in records if r["step"] == 3]
    assert len(step3) == 2 and step3[0] == step3[1]  # the same step 3, bit for bit

    # A newest checkpoint changed in place (same size, so no size check sees it): named through the
    # checksums recorded at its save, and the run goes on from the previous one.
    data = next((dump / "checkpoint" / "step-4").glob("*.distcp"))
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(255 - b for b in data.read_bytes()[size // 2 : size // 2 + 64]))
    assert data.stat().st_size == size
    resumed = run_train(*args, "--training.steps", "5")
    assert f"step-4 is damaged: {data} was changed after the save" in resumed.log
    assert "Training starts at step 4" in resumed.log and sorted(resumed.loss) == [4, 5]
    step4 = [r["loss"] for r in read_metrics(dump) if r["step"] == 4]
    assert len(step4) == 2 and step4[0] == step4[1]


def _fails(*args, nproc=1, **kwargs):
    run = run_train(*args, nproc=nproc, check=False, **kwargs)
    assert run.returncode != 0, run.log[-3000:]
    return run


@pytest.mark.slow
def test_start_up_errors_end_the_output_with_one_line_naming_the_setting(tmp_path):
    run = _fails("--checkpoint.interval", "0", "--job.dump_folder", str(tmp_path))
    assert "checkpoint.interval=0 is invalid: allowed values are integers >= 1" in run.last_line, run.log[-3000:]
    run = _fails("--training.stepz", "3", "--job.dump_folder", str(tmp_path))
    assert "configuration error: Unrecognized options: --training.stepz" in run.last_line, run.log[-3000:]


@pytest.mark.slow
def test_a_diverging_run_stops_before_writing_a_nan_checkpoint(tmp_path):
    dump = tmp_path / "run"
    run = _fails(*TINY, "--optimizer.lr", "1e4", "--lr_scheduler.warmup_steps", "0", "--training.steps", "6",
                 "--checkpoint.interval", "1", "--job.dump_folder", str(dump))  # fmt: skip
    assert "NonFiniteError: step" in run.last_line and "is not finite" in run.last_line, run.log[-3000:]
    bad_step = int(run.last_line.split("NonFiniteError: step ")[1].split(":")[0])
    saved = sorted(int(p.name.split("-")[1]) for p in (dump / "checkpoint").iterdir())
    assert saved and max(saved) == bad_step - 1, (saved, bad_step)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(dump / "checkpoint" / f"step-{bad_step - 1}", tmp_path / "last.pt")
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    tensors = [v for k, v in state.items() if isinstance(v, torch.Tensor)]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)
