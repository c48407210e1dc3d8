"""The planner (titan_v4/planner, python -m titan_v4.tools.plan): what it builds, counts and refuses.

The memory model itself is checked against H100 runs by benchmarks/planner_calibration.py
(docs/perf/2026-12-07-planner-h100.md); here: its per-rank state equals a real 2-process run's,
its activation tracker counts bytes exactly, it plans every flavor at scale in seconds, and it
refuses a layout with the trainer's own errors.
"""

import json
import subprocess
import sys
import time

import pytest
import torch

import titan_v4  # noqa: F401
from titan_v4.flavors import deepseek_v4_args
from titan_v4.infra.parallelize import check_model_parallelism
from titan_v4.planner.activations import LiveBytes, partitioned
from titan_v4.planner.plan import plan_job, plan_rank
from titan_v4.planner.roofline import h100
from titan_v4.tools.plan import job_config_for

from tests.helpers.train_runner import REPO, run_train

GIB = 2**30


def run_plan(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "titan_v4.tools.plan", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})  # fmt: skip


# --- the byte counter -------------------------------------------------------------------------------


def test_live_bytes_counts_created_and_freed_storages_and_ignores_existing_ones():
    existing = torch.zeros(1000)  # 4000 bytes, not counted
    with LiveBytes([existing]) as tracker:
        a = torch.empty(256, dtype=torch.float32)  # 1024
        b = torch.empty(100, dtype=torch.bfloat16)  # 200
        view = existing[:10].view(2, 5)  # an alias of an existing storage: 0
        assert tracker.live == 1224
        del a
        assert tracker.live == 200
        c = b.to(torch.float64)  # 800
        assert tracker.live == 1000
        del b, c, view
    assert tracker.live == 0
    assert tracker.peak == 1224


def test_partitioned_graph_computes_the_same_and_keeps_what_the_partitioner_saves():
    """The partitioned function computes the same values; for this chain of pointwise ops eager
    autograd keeps three [4096] intermediates (sin, cos, the tanh output) and the min-cut partitioner
    fewer (it recomputes the cheap ones in the backward)."""
    x = torch.randn(4096, dtype=torch.float64, requires_grad=True)

    def f(x):
        return (x.sin() * x.cos()).tanh().square().sum()

    with LiveBytes([x]) as eager:
        eager_out = f(x)
        eager_saved = eager.live
    with LiveBytes([x]) as compiled:
        compiled_out = partitioned(f)(x)
        compiled_saved = compiled.live
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-12, atol=0)
    assert compiled_saved < eager_saved, (compiled_saved, eager_saved)


# --- exact state against a real run -------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer, layout",
    [
        ("AdamW", []),  # FSDP2
        ("Muon", []),
        ("AdamW", ["--parallelism.expert_parallel_degree", "2"]),  # EP2 x FSDP2
    ],
)
def test_state_bytes_equal_a_real_two_process_run(tmp_path, optimizer, layout):
    """Parameters, gradients and optimizer state of each rank of a real 2-process CPU run (counted
    from the live tensors after step 1) equal the planner's, byte for byte."""
    args = ["--job.config_file", "train_configs/debug.toml", "--optimizer.name", optimizer, *layout]
    run_train(*args, "--training.steps", "1", "--checkpoint.no-enable", "--job.dump_folder", str(tmp_path / "run"),
              "--experimental.custom_import", "tests.helpers.state_bytes_plugin", nproc=2,
              env={"TITAN_V4_TEST_STATE_BYTES": str(tmp_path)})  # fmt: skip
    for r in range(2):  # FSDP's shards differ by a row between the ranks: each is planned on its own
        measured = json.loads((tmp_path / f"rank{r}.json").read_text())
        rank = plan_rank(job_config_for(args[1], [*args[2:], "--training.steps", "1"]), 2, r, h100(), 8, {})
        assert {"parameters": rank.parameters, "gradients": rank.gradients, "optimizer": rank.optimizer} == measured


# --- every flavor at scale -------------------------------------------------------------------------


def _total_parameter_bytes(flavor: str) -> int:
    from titan_v4.model.model import DeepSeekV4Model

    with torch.device("meta"):
        model = DeepSeekV4Model(deepseek_v4_args[flavor])
    return sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.parametrize(
    "config, gpus, overrides, even",
    [
        ("debug", 8, ["--parallelism.expert_parallel_degree", "8"], True),
        ("flash_proxy", 8, ["--parallelism.expert_parallel_degree", "8"], True),
        ("flash", 64, [], True),
        ("flash", 2048, [], True),
        # 12 experts per EP shard over 8 FSDP ranks: torch.chunk gives ranks 0-5 two each, 6-7 none.
        ("pro", 256, [], False),
        ("pro", 1024, [], True),
        ("pro", 2048, [], True),
    ],
)
def test_plans_each_flavor_at_scale_in_seconds(config, gpus, overrides, even):
    """FSDP x EP: rank 0 holds 1/N of the fp32 parameters where the shards are even (up to FSDP's
    padding; more where they are not: the first chunks are the full ones), AdamW's state is twice
    that (plus a 4-byte step per tensor) and Muon's about once; the peak is the largest moment."""
    job_config = job_config_for(f"train_configs/{config}.toml", overrides)
    start = time.perf_counter()
    plan = plan_job(job_config, gpus, h100())
    elapsed = time.perf_counter() - start
    assert elapsed < 45, f"planning took {elapsed:.1f} s"
    rank = plan.ranks[0]
    flavor = job_config.model.flavor
    total = _total_parameter_bytes(flavor)
    if even:
        assert rank.parameters * gpus == pytest.approx(total, rel=0.02)
    else:
        assert rank.parameters * gpus > 1.02 * total
    assert rank.gradients == rank.parameters
    if job_config.optimizer.name == "AdamW":
        assert 2 * rank.parameters < rank.optimizer < 2 * rank.parameters + 4 * 4096
    else:  # Muon: one fp32 buffer per matrix, AdamW's two for the embedding, head, norms, ...
        assert rank.parameters < rank.optimizer < 2 * rank.parameters
    assert rank.activations > 0 and rank.peak_bytes > rank.parameters + rank.optimizer
    assert plan.step_s > 0 and 0 < plan.mfu < 1


def test_pipeline_plan_builds_every_stage_and_balances_the_parameters():
    job_config = job_config_for("train_configs/flash_proxy.toml", [
        "--compile.no-enable", "--activation_checkpoint.mode", "full", "--parallelism.pipeline_parallel_degree", "2",
        "--training.local_batch_size", "8", "--parallelism.data_parallel_shard_degree", "1",
    ])  # fmt: skip
    plan = plan_job(job_config, 2, h100())
    assert [r.pipeline_stage for r in plan.ranks] == [0, 1]
    assert sorted(plan.ranks[0].layers + plan.ranks[1].layers) == [0, 1, 2, 3]
    assert sum(r.parameters for r in plan.ranks) == _total_parameter_bytes("flash_proxy")
    # 1F1B: stage 0 holds two micro-batches in flight, and only the last stage has the heads.
    assert plan.ranks[1].peak_moment.startswith(("forward of the head", "backward of the head"))


# --- the command line ---------------------------------------------------------------------------


def test_cli_writes_json_with_each_ranks_peak_and_exits_0_when_it_fits(tmp_path):
    out = tmp_path / "plan.json"
    proc = run_plan("--job.config_file", "train_configs/debug.toml", "--gpus", "8", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = json.loads(out.read_text())
    assert plan["world_size"] == 8 and plan["fits"] is True
    assert plan["peak_bytes"] == max(r["peak_bytes"] for r in plan["ranks"]) > 0
    assert f"{plan['ranks'][0]['peak_bytes'] / GIB:.2f}" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("fits:")


def test_cli_exits_1_naming_the_rank_and_the_smallest_change_that_fits():
    proc = run_plan("--job.config_file", "train_configs/flash_proxy.toml", "--gpus", "1", "--gpu-memory-gib", "45",
                    "--compile.no-enable")  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stdout.rstrip().splitlines()[-1]
    assert "does not fit: rank 0" in last and "--gpu-memory-gib 45" in last
    # Full AC alone (59 GiB) is not enough, nor 2 GPUs without it (FSDP2 with AC none).
    assert "smallest change that fits: --gpus 4" in last


@pytest.mark.parametrize(
    "gpus, overrides, expected",
    [
        ("6", ["--parallelism.expert_parallel_degree", "3"], None),  # 3 does not divide 8 experts
        ("8", ["--parallelism.pipeline_parallel_degree", "8", "--training.local_batch_size", "8"],
         "Number of stages (8) cannot be greater than effective layers"),  # torchtitan's pipeline_llm
        ("4", ["--parallelism.data_parallel_shard_degree", "3"], "data_parallel_shard_degree"),
    ],
)
def test_cli_refuses_a_layout_with_the_trainers_error(gpus, overrides, expected):
    proc = run_plan("--job.config_file", "train_configs/debug.toml", "--gpus", gpus, *overrides)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"titan_v4.tools.plan: the job cannot start on {gpus} GPUs: ")
    if expected is None:
        with pytest.raises(ValueError) as trainer_error:
            check_model_parallelism(8, 3)
        assert str(trainer_error.value) in last
    else:
        assert expected in last


def test_cli_refuses_bad_arguments_naming_them():
    proc = run_plan("--job.config_file", "train_configs/debug.toml", "--gpus", "0")
    assert proc.returncode == 2 and "--gpus=0 is invalid" in proc.stderr.rstrip().splitlines()[-1]
