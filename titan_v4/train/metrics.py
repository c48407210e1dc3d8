"""The per-step metrics line: ``step: N/total`` with an ETA, and no meaningless numbers on a CPU.

torchtitan 0.2.2's line prints ``memory: -0.00GiB`` and ``mfu: 0.00%`` on a CPU (there is no
device memory or peak-FLOPS figure there) and has neither the total step count nor an ETA.
:class:`V4MetricsProcessor` (the TrainSpec's ``build_metrics_processor_fn``) sends the same
metrics to TensorBoard / W&B and prints::

    step: 12/100  loss:  5.12345  grad_norm:  1.2345  tps: 1,234  eta: 0:01:46

plus ``memory``, ``tflops`` and ``mfu`` on GPUs. The ETA is the remaining steps times the mean
step time since the first logged step (which includes start-up and compilation, so it is left
out). Global rank 0 also appends every logged step to ``<dump_folder>/logs/metrics.jsonl`` at full
float precision (``{"step", "loss", "max_loss", "grad_norm", "lr", "tps", "time"}``, and on GPUs
``max_active_gib`` / ``max_reserved_gib``: the peak allocated and reserved memory so far), for
scripts and for exact comparisons of runs.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import Any

import torch
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools import utils
from torchtitan.tools.logging import logger

METRICS_FILE = os.path.join("logs", "metrics.jsonl")


class V4MetricsProcessor(MetricsProcessor):
    """torchtitan's MetricsProcessor with a total-step counter, an ETA and a JSONL record."""

    def __init__(self, job_config, parallel_dims, tag: str | None = None) -> None:
        super().__init__(job_config, parallel_dims, tag)
        self._device_metrics = utils.device_type != "cpu"
        self._first_log: tuple[float, int] | None = None  # (time, step) of the first logged step
        self._jsonl_path = None
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            self._jsonl_path = os.path.join(job_config.job.dump_folder, METRICS_FILE)

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ) -> None:
        now = time.perf_counter()
        time_delta = now - self.time_last_log
        tps = self.ntokens_since_last_log / (time_delta * self.parallel_dims.non_data_parallel_size)
        mfu = 100 * self.num_flops_per_token * tps / self.gpu_peak_flops
        tflops = self.num_flops_per_token * tps / 1e12
        loading = self.data_loading_times
        mem = self.device_memory_monitor.get_peak_stats()
        metrics = {
            "loss_metrics/global_avg_loss": global_avg_loss,
            "loss_metrics/global_max_loss": global_max_loss,
            "grad_norm": grad_norm,
            "throughput(tps)": tps,
            "time_metrics/end_to_end(s)": time_delta / self.job_config.metrics.log_freq,
            "time_metrics/data_loading(s)": sum(loading) / len(loading) if loading else 0.0,
            "time_metrics/data_loading(%)": 100 * sum(loading) / time_delta,
        }
        if self._device_metrics:
            metrics.update(
                {
                    "tflops": tflops,
                    "mfu(%)": mfu,
                    "memory/max_active(GiB)": mem.max_active_gib,
                    "memory/max_active(%)": mem.max_active_pct,
                    "memory/max_reserved(GiB)": mem.max_reserved_gib,
                    "memory/max_reserved(%)": mem.max_reserved_pct,
                    "memory/num_alloc_retries": mem.num_alloc_retries,
                    "memory/num_ooms": mem.num_ooms,
                }
            )
        metrics.update(extra_metrics or {})
        self.logger.log(metrics, step)

        total = self.job_config.training.steps
        c = self.color
        line = (
            f"{c.red}step: {step:2}/{total}  {c.green}loss: {global_avg_loss:8.5f}  "
            f"{c.orange}grad_norm: {grad_norm:7.4f}  "
        )
        if self._device_metrics:
            line += f"{c.turquoise}memory: {mem.max_reserved_gib:5.2f}GiB({mem.max_reserved_pct:.2f}%)  "
        line += f"{c.blue}tps: {round(tps):,}  "
        if self._device_metrics:
            line += f"{c.cyan}tflops: {tflops:,.2f}  {c.magenta}mfu: {mfu:.2f}%  "
        line += f"{c.yellow}eta: {self._eta(now, step, total)}{c.reset}"
        logger.info(line)
        memory = {"max_active_gib": mem.max_active_gib, "max_reserved_gib": mem.max_reserved_gib} if self._device_metrics else {}
        self._append_jsonl(step, global_avg_loss, global_max_loss, grad_norm, tps, extra_metrics, memory)

        self.ntokens_since_last_log = 0
        self.data_loading_times.clear()
        self.time_last_log = time.perf_counter()
        self.device_memory_monitor.reset_peak_stats()

    def _eta(self, now: float, step: int, total: int) -> str:
        if self._first_log is None:
            self._first_log = (now, step)
            return "--" if step < total else "0:00:00"
        t0, s0 = self._first_log
        seconds = (now - t0) / max(step - s0, 1) * max(total - step, 0)
        return str(datetime.timedelta(seconds=round(seconds)))

    def _append_jsonl(self, step, loss, max_loss, grad_norm, tps, extra_metrics, memory=None) -> None:
        if self._jsonl_path is None:
            return
        record = {
            "step": step,
            "loss": float(loss),
            "max_loss": float(max_loss),
            "grad_norm": float(grad_norm),
            "lr": float((extra_metrics or {}).get("lr", float("nan"))),
            "tps": float(tps),
            "time": time.time(),
            **(memory or {}),
        }
        os.makedirs(os.path.dirname(self._jsonl_path), exist_ok=True)
        with open(self._jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def build_v4_metrics_processor(
    job_config, parallel_dims, model_args=None, tag: str | None = None
) -> V4MetricsProcessor:
    """TrainSpec ``build_metrics_processor_fn``."""
    return V4MetricsProcessor(job_config, parallel_dims, tag)
