"""What the command-line tools share: their argument error, and the check of an output folder.

A tool checks its output folder (`--out DIR`) before it builds or trains anything, so a file or an
unwritable path is refused in seconds with one line, instead of failing with a traceback when the
results are written.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

_ALLOWED_OUT = "allowed values are a folder that exists or can be created, and that this user can write to"


class ToolArgumentError(ValueError):
    """A bad command-line argument of a tool; the message names the option, the value and what is allowed."""


def prepare_out_dir(value: str) -> Path:
    """The folder `value` of `--out`, created if missing and checked writable (by writing a
    temporary file into it); ToolArgumentError where it is a file or cannot be created or written."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise ToolArgumentError(f"--out={value!r} is invalid: it is a file; {_ALLOWED_OUT}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        problem = f"the folder cannot be created ({e.strerror})"
        raise ToolArgumentError(f"--out={value!r} is invalid: {problem}; {_ALLOWED_OUT}") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        problem = f"the folder cannot be written to ({e.strerror})"
        raise ToolArgumentError(f"--out={value!r} is invalid: {problem}; {_ALLOWED_OUT}") from None
    return path
