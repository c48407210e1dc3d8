"""titan_v4.tools.pipeline_experiments: combinations are checked like the trainer checks them,
results are summarised from the ranks' timings, and (slow) a CPU sweep over the schedules the
equality tests do not run writes its table, CSV and plot."""

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.train_runner import REPO
from titan_v4.tools.pipeline_experiments import (
    Combination,
    error_from_log,
    format_table,
    layers_per_stage,
    parse_args,
    run_arguments,
    summarize,
)

CONFIG = str(REPO / "train_configs" / "debug.toml")


def args_for(*extra):
    return parse_args(["--job.config_file", CONFIG, "--nproc", "2", "--out", "unused", *extra])


def test_trainer_overrides_pass_through_and_each_combination_sets_its_own():
    args, overrides = args_for("--training.local_batch_size", "8")
    assert overrides == ["--training.local_batch_size", "8"] and args.pp == 2
    cli = run_arguments(args, overrides, Combination("Interleaved1F1B", "4", "1:1:1:1"))
    assert cli[cli.index("--parallelism.pipeline_parallel_microbatch_size") + 1] == "2"  # 8 / 4 microbatches
    assert cli[cli.index("--parallelism.pipeline_parallel_schedule") + 1] == "Interleaved1F1B"
    names = cli[cli.index("--parallelism.module_fqns_per_model_part") + 1 :]
    assert names == ["tok_embeddings,layers.0", "layers.1", "layers.2", "layers.3,hc_head,norm,output,mtp.0"]


@pytest.mark.parametrize(
    "combo, message",
    [
        pytest.param(Combination("1F1B", "3", "auto"), r"local_batch_size=8 cannot be cut into 3 microbatches", id="microbatches"),
        pytest.param(Combination("1F1B", "config", "2:1"), r"split 2:1 places 3 layers; flavor debugmodel has 4", id="layers"),
        pytest.param(Combination("1F1B", "config", "1:1:1:1"), r"4 stages, .*'1F1B' needs exactly pipeline_parallel_degree=2", id="stages"),
        pytest.param(Combination("DualPipeV", "config", "auto"), r"pipeline_parallel_expert_parallel_overlap", id="dualpipev"),
    ],
)
def test_refused_combinations_carry_the_reason(combo, message):
    args, overrides = args_for()
    with pytest.raises(ValueError, match=message):
        run_arguments(args, overrides, combo)


def test_bad_tool_arguments_name_the_flag(capsys):
    for bad, message in ((["--schedules", "Zero"], "--schedules: 'Zero'"), (["--splits", "3-1"], "--splits: '3-1'"),
                         (["--microbatches", "0"], "--microbatches: '0'"), (["--steps", "1"], "--steps=1")):  # fmt: skip
        with pytest.raises(SystemExit):
            args_for(*bad)
        assert message in capsys.readouterr().err


def test_log_parsing():
    log = (
        "[rank0]:[titan] ... PP rank 0 is building stage_idx 0 with modules ['tok_embeddings', 'layers.0', 'layers.1', 'layers.2']\n"
        "[rank1]:[titan] ... PP rank 1 is building stage_idx 1 with modules ['layers.3', 'hc_head', 'norm', 'output', 'mtp.0']\n"
        "[rank1]:[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
    )
    assert layers_per_stage(log) == "3:1"
    assert error_from_log(log) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_summary_from_rank_timings(tmp_path):
    # Two ranks, three steps (the first is warm-up); rank 1 computes 60 % of its pipeline time.
    ranks = [
        dict(step_s=[9.0, 2.0, 2.2], pipeline_s=[8.0, 1.8, 1.8], busy_s=[1.0, 0.9, 0.9], peak=3.0),
        dict(step_s=[9.0, 2.1, 2.4], pipeline_s=[8.0, 1.8, 1.8], busy_s=[1.0, 1.08, 1.08], peak=5.0),
    ]
    (tmp_path / "timing").mkdir()
    for r, timing in enumerate(ranks):
        record = {"rank": r, "world_size": 2, "tokens_per_step": 4096, "memory_measure": "cpu_max_rss",
                  "peak_memory_gib": timing.pop("peak"), "stages": [r], **timing}  # fmt: skip
        (tmp_path / "timing" / f"rank_{r}.json").write_text(json.dumps(record))
    result = summarize(Combination("1F1B", "4", "auto"), tmp_path, "")
    assert result.step_s == pytest.approx(2.25)  # median over steps 2-3 of the slowest rank: (2.1 + 2.4) / 2
    assert result.tokens_per_s == pytest.approx(4096 / 2.25)
    assert result.tokens_per_s_per_device == pytest.approx(4096 / 2.25 / 2)
    assert result.bubble == pytest.approx([0.5, 0.4])
    assert result.peak_memory_gib == [3.0, 5.0]
    table = format_table([result])
    assert "0.500 0.400" in table and "3.00 5.00" in table and "cpu_max_rss" in table


@pytest.mark.slow
def test_cpu_sweep_writes_table_csv_and_plot(tmp_path):
    """The schedules the equality tests (tests/integration/test_pipeline_cpu.py) do not run, trained
    through the tool on two CPU processes; 3 microbatches of a batch of 4 are refused unlaunched.
    (DualPipeV needs at least as many microbatches as stages: 4.)"""
    schedules = ["GPipe", "LoopedBFS", "InterleavedZeroBubble", "DualPipeV"]
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "titan_v4.tools.pipeline_experiments", "--job.config_file", CONFIG,
         "--schedules", ",".join(schedules), "--microbatches", "4,3", "--steps", "2", "--nproc", "2", "--out", str(out),
         "--training.local_batch_size", "4", "--training.seq_len", "64", "--metrics.disable_color_printing",
         "--parallelism.no-pipeline_parallel_expert_parallel_overlap"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["schedule"], r["microbatches"]) for r in rows] == [(s, m) for s in schedules for m in ("4", "3")]
    for r in rows:
        if r["microbatches"] == "3":
            assert r["error"] == "refused: training.local_batch_size=4 cannot be cut into 3 microbatches", r
            continue
        assert r["error"] == "", r
        assert float(r["step_s"]) > 0 and float(r["tokens_per_s"]) == pytest.approx(4 * 64 / float(r["step_s"]), rel=0.01)
        assert all(0.0 <= float(b) < 1.0 for b in r["bubble"].split()) and len(r["bubble"].split()) == 2, r
        assert all(float(m) > 0.1 for m in r["peak_memory_gib"].split()), r  # GiB of resident memory
        expected_split = "2:2" if r["schedule"] in ("GPipe",) else "1:2:1:0"
        assert r["layers_per_stage"] == expected_split, r
    assert "cannot be cut into 3 microbatches" in proc.stdout and "bubble" in proc.stdout  # the console table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for schedule in schedules:
        assert (out / "runs" / f"{schedule}_mb-4_split-auto" / "train.log").is_file()
