"""Shared pytest setup: make the repo packages and the tests' helper modules importable.

The repo is not necessarily pip-installed when the tests run, so the repo root (for ``custom_ops`` and
``titan_v4``) and this directory (for ``tolerances``) are put on ``sys.path`` explicitly.
"""

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent
for _path in (str(_TESTS.parent), str(_TESTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.utils._device  # noqa: E402

# torch caches the set of tensor-constructing functions the first time `with torch.device(...)` is
# used. Build that cache now, from the real functions: the op tests' NaN-filling fixture swaps
# torch.empty for a wrapper, and a cache built while it is active would stop
# `with torch.device("meta")` from redirecting torch.empty (a 284B-parameter flavor built for real).
torch.utils._device._device_constructors()
