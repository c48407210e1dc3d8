"""Runs the Triton kernel tests on the CPU under the Triton interpreter, in a child process.

TRITON_INTERPRET is read when a kernel is decorated (see tests/helpers/triton_device.py), so setting it in this
process would change every Triton kernel imported later; the child process keeps it contained.
With a GPU the kernel test files run compiled in this process instead.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KERNEL_TESTS = ["test_sinkhorn_kernels.py", "test_mhc_kernels.py", "test_sparse_attention_triton.py"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests run compiled in this process")
def test_kernels_under_triton_interpreter():
    pytest.importorskip("triton")
    here = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", *(str(here / f) for f in KERNEL_TESTS)],
        cwd=here.parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    tail = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, f"interpreted kernel tests failed:\n{tail}"
    assert " passed" in result.stdout and " skipped" not in result.stdout.splitlines()[-1], tail
