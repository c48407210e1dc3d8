"""The benchmarks still start, and their timer measures what it says.

Every script in benchmarks/ runs its ``--help`` as ``python -m benchmarks.<name>`` from the repository
root, which imports everything the script imports: a module moved under titan_v4/ or custom_ops/
fails here, not on a GPU machine. The timer's test runs in a subprocess too, because nothing outside
benchmarks/ imports benchmarks/ (tests/test_layout.py).
"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_SCRIPTS = {"__init__", "timing"}
SCRIPTS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in NOT_SCRIPTS)


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_scripts_are_found():
    assert SCRIPTS, "no benchmarks/*.py scripts found"


@pytest.fixture(scope="module")
def help_runs() -> dict[str, subprocess.CompletedProcess]:
    """Every script's --help, two at a time: most spend ~10 s of CPU importing torch and torchtitan."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(SCRIPTS, pool.map(lambda name: run_python("-m", f"benchmarks.{name}", "--help"), SCRIPTS)))


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_runs(name, help_runs):
    proc = help_runs[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


# Calls 1-2 are the warm-up and sleep 100 ms, calls 3-5 are timed and sleep 20 ms; before() sleeps
# 50 ms ahead of every call and must not be timed.
TIMER_PROBE = """
import json, time
from benchmarks.timing import measure

calls, befores = [], []

def fn():
    calls.append(None)
    time.sleep(0.1 if len(calls) <= 2 else 0.02)

def before():
    befores.append(None)
    time.sleep(0.05)

t = measure(fn, "cpu", warmup=2, reps=3, before=before)
print(json.dumps(dict(calls=len(calls), befores=len(befores), first=t.first_ms, median=t.median_ms,
                      times=t.times_ms, peak=t.peak_mib)))
"""


def test_timer_on_the_cpu():
    proc = run_python("-c", TIMER_PROBE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    assert found["calls"] == 5 and found["befores"] == 5
    assert len(found["times"]) == 3
    assert 100 <= found["first"] < 150
    # sleep() never returns early; the upper bound leaves room for a loaded 2-core machine.
    assert all(20 <= ms < 45 for ms in found["times"]), found["times"]
    assert 20 <= found["median"] < 45
    assert found["peak"] != found["peak"]  # NaN: no peak memory on the CPU
