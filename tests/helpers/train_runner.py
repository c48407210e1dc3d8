"""Run ``./run_train.sh`` in a subprocess and read the per-step metrics from its log."""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_STEP = re.compile(r"step:\s*(\d+)(?:/\d+)?\s+loss:\s*(-?[\d.]+)\s+grad_norm:\s*([\d.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class TrainRun:
    log: str
    loss: dict[int, float]  # step -> loss, as logged
    grad_norm: dict[int, float]
    returncode: int = 0

    @property
    def last_line(self) -> str:
        return self.log.rstrip().splitlines()[-1]


def read_metrics(dump_folder) -> list[dict]:
    """The records of ``<dump_folder>/logs/metrics.jsonl`` (full-precision loss, grad_norm, ...)."""
    with open(os.path.join(dump_folder, "logs", "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_train(
    *args: str,
    nproc: int = 1,
    log_rank: int = 0,
    timeout: int = 600,
    check: bool = True,
    env: dict | None = None,
    module: str = "titan_v4.train",
) -> TrainRun:
    """``NGPU=nproc LOG_RANK=log_rank TRAIN_MODULE=module ./run_train.sh *args`` on the CPU (GPUs
    hidden, so the runs are the same and deterministic everywhere); with ``check``, fails the test
    with the log on error."""
    extra_env = env or {}
    env = dict(os.environ)
    env.update(NGPU=str(nproc), LOG_RANK=str(log_rank), CUDA_VISIBLE_DEVICES="", TRAIN_MODULE=module, **extra_env)
    # torchrun from this interpreter's environment; the repo (and so the test plug-in
    # tests.helpers.llama3_ids_plugin) importable in the trainer processes.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [str(REPO / "run_train.sh"), "--metrics.disable_color_printing", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    log = _ANSI.sub("", proc.stdout)
    if check and proc.returncode != 0:
        pytest.fail(f"run_train.sh {' '.join(args)} exited with {proc.returncode}:\n{log[-8000:]}")
    loss, grad_norm = {}, {}
    for step, value, norm in _STEP.findall(log):
        loss[int(step)], grad_norm[int(step)] = float(value), float(norm)
    return TrainRun(log, loss, grad_norm, proc.returncode)
