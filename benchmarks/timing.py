"""The benchmarks' timer: how long a call takes, on the CPU or on a CUDA device.

``Stopwatch(device)`` times the block it wraps, in milliseconds:

* on a CUDA device it synchronises the device (work queued before the block is not counted),
  records a CUDA event on the device's current stream, runs the block, records a second event and
  synchronises again; the time is the elapsed time between the two events. The device is idle
  when the first event is recorded, so the time is the block's wall time as the device sees it:
  its kernels, and the gaps in which the device waited for the host (Python, launches,
  compilation). It leaves out what a host clock around the synchronisations would add: the
  latency of the closing synchronise;
* on the CPU it is ``time.perf_counter`` before and after the block.

``measure(fn, device, warmup, reps)`` calls ``fn()`` ``warmup + reps`` times, each call timed
alone by a Stopwatch. The first ``warmup`` calls are not counted; the first of them is reported on
its own (``first_ms``: compilation, autotuning and first allocations included). The timed calls
give the median. An optional ``before()`` runs before every call, outside the timed block.

``kernel_median_ms(fn, warmup_ms, rep_ms)`` is for kernels of microseconds, where the
synchronise before each call would leave the device waiting for the host's launch: it is
``triton.testing.do_bench``, whose calls are queued without synchronising and each preceded by
zeroing a 256 MB buffer (the L2 cache is evicted, so every call reads its inputs from device
memory).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


class Stopwatch:
    """``with Stopwatch(device) as watch: ...`` sets ``watch.ms`` to the block's milliseconds (see the
    module docstring); when the block raises, nothing is measured and ``watch.ms`` stays NaN."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.ms = float("nan")

    def __enter__(self) -> Stopwatch:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._stream = torch.cuda.current_stream(self.device)
            self._begin = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._begin.record(self._stream)
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            return
        if self.device.type == "cuda":
            self._end.record(self._stream)
            torch.cuda.synchronize(self.device)
            self.ms = self._begin.elapsed_time(self._end)
        else:
            self.ms = 1e3 * (time.perf_counter() - self._start)


@dataclass
class Timing:
    """What `measure` found, in milliseconds (and MiB)."""

    first_ms: float  # the first warm-up call alone: compilation, autotuning, first allocations
    median_ms: float  # the median of the timed calls
    times_ms: list[float]  # every timed call, in order
    peak_mib: float  # with peak_memory on CUDA: the peak allocated during the timed calls above
    # what was allocated before them (what the calls' temporaries add); otherwise NaN


def measure(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 1,
    reps: int = 10,
    before: Callable[[], object] | None = None,
    peak_memory: bool = False,
) -> Timing:
    """Time `reps` calls of fn() on `device` after `warmup` untimed ones (at least one: its time is
    ``first_ms``); ``before()``, if given, runs before every call and is not timed. With
    `peak_memory` on a CUDA device, the device's peak-memory statistics are reset before the timed
    calls (a caller's own peak reading then starts there)."""
    if warmup < 1 or reps < 1:
        raise ValueError(f"measure needs warmup >= 1 and reps >= 1, got {warmup} and {reps}")
    device = torch.device(device)
    track_memory = peak_memory and device.type == "cuda"
    times: list[float] = []
    base = 0
    for call in range(warmup + reps):
        if call == warmup and track_memory:
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        if before is not None:
            before()
        with Stopwatch(device) as watch:
            fn()
        if call == 0:
            first_ms = watch.ms
        if call >= warmup:
            times.append(watch.ms)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if track_memory else float("nan")
    return Timing(first_ms, statistics.median(times), times, peak)


def kernel_median_ms(fn: Callable[[], object], *, warmup_ms: float, rep_ms: float) -> float:
    """The median milliseconds of fn() on the current CUDA device by triton.testing.do_bench: one
    untimed call and five to estimate the time, then untimed calls for about `warmup_ms` and timed
    ones for about `rep_ms`, each timed between two CUDA events after zeroing a 256 MB buffer."""
    from triton.testing import do_bench  # only here: the CPU benchmarks run without triton

    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
