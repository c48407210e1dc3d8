"""titan_v4.tools.pipeline_experiments: combinations are checked like the trainer checks them,
results are summarised from the ranks' timings, and (slow) a CPU sweep writes its table, CSV and
plot."""

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.train_runner import REPO
from tests.helpers.unwritable import unwritable_folder
from titan_v4.tools.pipeline_experiments import (
    Combination,
    error_from_log,
    format_table,
    layers_per_stage,
    main,
    parse_args,
    run_arguments,
    summarize,
)

CONFIG = str(REPO / "train_configs" / "debug.toml")


def args_for(out, *extra):
    return parse_args(["--job.config_file", CONFIG, "--nproc", "2", "--out", str(out), *extra])


def test_trainer_overrides_pass_through_and_each_combination_sets_its_own(tmp_path):
    args, overrides = args_for(tmp_path, "--training.local_batch_size", "8")
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
def test_refused_combinations_carry_the_reason(tmp_path, combo, message):
    args, overrides = args_for(tmp_path)
    with pytest.raises(ValueError, match=message):
        run_arguments(args, overrides, combo)


def test_bad_tool_arguments_name_the_flag(tmp_path, capsys):
    for bad, message in ((["--schedules", "Zero"], "--schedules: 'Zero'"), (["--splits", "3-1"], "--splits: '3-1'"),
                         (["--microbatches", "0"], "--microbatches: '0'"), (["--steps", "1"], "--steps=1")):  # fmt: skip
        with pytest.raises(SystemExit):
            args_for(tmp_path, *bad)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("case", ["a-file", "unwritable"])
def test_an_out_that_is_a_file_or_cannot_be_written_is_refused_before_any_run(tmp_path, capsys, case):
    if case == "a-file":
        out = tmp_path / "results.csv"
        out.write_text("")
        what = "it is a file"
    else:
        out, reason = unwritable_folder(tmp_path)
        what = f"the folder {'cannot be written to' if out.exists() else 'cannot be created'} ({reason})"
    with pytest.raises(SystemExit) as exit:
        main(["--job.config_file", CONFIG, "--nproc", "2", "--schedules", "GPipe", "--out", str(out)])
    assert exit.value.code == 2
    assert capsys.readouterr().err.rstrip().splitlines()[-1] == (
        f"python -m titan_v4.tools.pipeline_experiments: error: --out={str(out)!r} is invalid: {what}; "
        "allowed values are a folder that exists or can be created, and that this user can write to"
    )


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
    """Two CPU processes: GPipe trains; 3 microbatches of a batch of 4 and DualPipeV with its
    (default) overlap are refused without a run. (Every schedule is checked against the run
    without pipelining in tests/integration/test_pipeline_cpu.py.)"""
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "titan_v4.tools.pipeline_experiments", "--job.config_file", CONFIG,
         "--schedules", "GPipe,DualPipeV", "--microbatches", "4,3", "--steps", "3", "--nproc", "2", "--out", str(out),
         "--training.local_batch_size", "4", "--training.seq_len", "64", "--metrics.disable_color_printing"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["schedule"], r["microbatches"]) for r in rows] == [("GPipe", "4"), ("GPipe", "3"), ("DualPipeV", "4"), ("DualPipeV", "3")]
    trained, *refused = rows
    assert trained["error"] == "" and trained["layers_per_stage"] == "2:2", trained
    assert float(trained["step_s"]) > 0
    assert float(trained["tokens_per_s"]) == pytest.approx(4 * 64 / float(trained["step_s"]), rel=0.01)
    assert float(trained["tokens_per_s_per_device"]) == pytest.approx(float(trained["tokens_per_s"]) / 2, rel=0.01)
    bubbles = [float(b) for b in trained["bubble"].split()]
    assert len(bubbles) == 2 and all(0.0 <= b < 1.0 for b in bubbles), trained
    assert all(float(m) > 0.1 for m in trained["peak_memory_gib"].split()), trained  # GiB resident per process
    assert trained["memory_measure"] == "cpu_max_rss"
    microbatches = "refused: training.local_batch_size=4 cannot be cut into 3 microbatches"
    assert refused[0]["error"] == refused[2]["error"] == microbatches
    assert refused[1]["error"].startswith("refused: parallelism.pipeline_parallel_schedule='DualPipeV' with"), refused[1]
    assert "cannot be cut into 3 microbatches" in proc.stdout and "bubble" in proc.stdout  # the console table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "runs" / "GPipe_mb-4_split-auto" / "train.log").is_file()
    assert not (out / "runs" / "DualPipeV_mb-4_split-auto").exists()  # refused: never launched
