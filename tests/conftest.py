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
