"""Training entry point that also measures the pipeline, for titan_v4.tools.pipeline_experiments.

``torchrun ... -m titan_v4.tools.pipeline_timing --job.config_file X.toml [overrides]`` trains
exactly like ``titan_v4.train`` and, at the end, every rank writes
``<job.dump_folder>/timing/rank_<r>.json`` with, per training step:

* ``step_s``: wall time of the whole step (data, forward, backward, optimizer);
* ``pipeline_s``: wall time inside the pipeline schedule's ``step`` (forward + backward of all
  microbatches, including waiting for other ranks);
* ``busy_s``: time this rank's stages spent in their forward and backward computations (the
  stage methods ``forward_one_chunk``, ``backward_one_chunk`` and ``backward_weight_one_chunk``;
  measured with CUDA events on a GPU, so launches that run ahead are not counted twice);

and once: the stages it holds, the tokens of one optimizer step (all data-parallel ranks) and its
peak memory (CUDA: the allocator's peak of allocated bytes; CPU: the process's peak resident set).
The measured bubble of a rank is ``1 - busy_s / pipeline_s``.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from titan_v4.train.trainer import V4Trainer, main  # noqa: I001  (installs the CPU shim before torchtitan)

from titan_v4.infra.pipeline import pipeline_stages

STAGE_COMPUTE_METHODS = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")


class _Clock:
    """Measures intervals on the host (CPU) or on the current CUDA stream."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list = []  # CUDA event pairs of this step

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn, totals: list[float]):
        """fn, whose durations are added to totals[-1] (collected at the step's end on CUDA)."""

        def run(*args, **kwargs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                try:
                    return fn(*args, **kwargs)
                finally:
                    end.record()
                    self.pending.append((start, end))
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[-1] += time.perf_counter() - start

        return run

    def collect(self, totals: list[float]) -> None:
        """Add the CUDA intervals recorded since the last call to totals[-1] (after a sync)."""
        totals[-1] += sum(start.elapsed_time(end) for start, end in self.pending) / 1000.0
        self.pending.clear()


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss"  # KiB on Linux


class PipelineTimingTrainer(V4Trainer):
    """V4Trainer that records step, pipeline and stage-compute times and the peak memory."""

    def __init__(self, job_config) -> None:
        super().__init__(job_config)
        self.clock = _Clock(self.device)
        self.step_s: list[float] = []
        self.pipeline_s: list[float] = []
        self.busy_s: list[float] = []
        self.peak_gib, self.memory_measure = 0.0, ""
        self.stage_indices: list[int] = []
        if self.parallel_dims.pp_enabled:
            for stage in pipeline_stages(self.pp_schedule):
                self.stage_indices.append(stage.stage_index)
                for name in STAGE_COMPUTE_METHODS:
                    setattr(stage, name, self.clock.timed(getattr(stage, name), self.busy_s))
            self.pp_schedule.step = self._timed_schedule_step(self.pp_schedule.step)
        # torchtitan resets the peak-memory statistics whenever it logs: read them first.
        monitor = self.metrics_processor.device_memory_monitor
        monitor.reset_peak_stats = self._record_peak_then(monitor.reset_peak_stats)

    def _timed_schedule_step(self, step):
        def run(*args, **kwargs):
            self.clock.sync()
            start = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self.clock.sync()
                self.pipeline_s[-1] += time.perf_counter() - start

        return run

    def _record_peak_then(self, reset):
        def run():
            self._record_peak()
            reset()

        return run

    def _record_peak(self) -> None:
        gib, self.memory_measure = peak_memory_gib(self.device)
        self.peak_gib = max(self.peak_gib, gib)

    def train_step(self, data_iterator):
        self.pipeline_s.append(0.0)
        self.busy_s.append(0.0)
        self.clock.sync()
        start = time.perf_counter()
        super().train_step(data_iterator)
        self.clock.sync()
        self.step_s.append(time.perf_counter() - start)
        self.clock.collect(self.busy_s)

    def train(self) -> None:
        super().train()
        self._record_peak()
        pd = self.parallel_dims
        cfg = self.job_config.training
        record = {
            "rank": torch.distributed.get_rank() if torch.distributed.is_initialized() else 0,
            "world_size": pd.world_size,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "stages": self.stage_indices,
            "tokens_per_step": cfg.global_batch_size * cfg.seq_len if cfg.global_batch_size > 0
            else cfg.local_batch_size * cfg.seq_len * pd.dp_replicate * pd.dp_shard,
            "step_s": self.step_s,
            "pipeline_s": self.pipeline_s,
            "busy_s": self.busy_s,
            "peak_memory_gib": self.peak_gib,
            "memory_measure": self.memory_measure,
        }  # fmt: skip
        folder = Path(self.job_config.job.dump_folder) / "timing"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank_{record['rank']}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(PipelineTimingTrainer)
