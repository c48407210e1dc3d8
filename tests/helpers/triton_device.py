"""Where the Triton kernel tests run: on CUDA (compiled), or on the CPU under the Triton interpreter.

Triton decides at ``@triton.jit`` decoration time, i.e. when a kernel module is first imported,
whether a kernel is interpreted: ``knobs.runtime.interpret`` (triton 3.6 and 3.9) reads
TRITON_INTERPRET there. Setting it inside this pytest process would turn every Triton kernel
imported afterwards into an interpreted one, Inductor's included, so the kernel tests never set
it: test_triton_interpreter.py runs the kernel test files in a child pytest with TRITON_INTERPRET=1
when there is no GPU, and with a GPU they run here, compiled.
"""

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"

needs_triton_device = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETED,
    reason="needs CUDA; without one, test_triton_interpreter.py runs this file under TRITON_INTERPRET=1",
)


def gpu(test):
    """Marks a real-size test ``gpu`` and skips it (with the reason) without a CUDA device."""
    skip = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device")
    return pytest.mark.gpu(skip(test))
