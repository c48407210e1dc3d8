"""Shared pytest setup: make the repo packages and the tests' helper modules importable.

The repo is not necessarily pip-installed when the tests run, so the repo root (for ``custom_ops`` and
``titan_v4``) and this directory (for ``tolerances``) are put on ``sys.path`` explicitly.

Without a CUDA device, Triton kernels are tested in Triton's interpreter (``TRITON_INTERPRET=1``),
and it has to be switched on here, for the whole process, before anything imports triton:
``@triton.jit`` reads the variable when it decorates a function (triton 3.6 and 3.9 alike), and that
includes triton's own library (``tl.sum``, ``tl.cdiv``, ... are jit functions decorated when triton
is imported, which ``torch._dynamo`` does), so a kernel module re-imported later with the variable
set still calls compiled-only library functions. This changes nothing else on such a machine: no
compiled Triton kernel can run there, and Inductor's CPU backend generates C++, not Triton (Inductor
reads the variable only for its Triton kernels). With CUDA the variable is left alone and the kernel
tests run compiled.
"""

import os
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent
for _path in (str(_TESTS.parent), str(_TESTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402  (torch alone does not import triton)
import torch.utils._device  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch caches the set of tensor-constructing functions the first time `with torch.device(...)` is
# used. Build that cache now, from the real functions: the op tests' NaN-filling fixture swaps
# torch.empty for a wrapper, and a cache built while it is active would stop
# `with torch.device("meta")` from redirecting torch.empty (a 284B-parameter flavor built for real).
torch.utils._device._device_constructors()
