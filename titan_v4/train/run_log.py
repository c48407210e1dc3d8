"""What a run leaves to read: a log file in the dump folder, one error line per failure, no CPU noise.

* :func:`attach_log_file`: global rank 0 writes everything it logs to
  ``<dump_folder>/logs/train.log`` (appended across restarts); every other rank writes its warnings
  and errors to ``<dump_folder>/logs/rank_<R>.log``, created only when there is one.
* :func:`record_failure`: the exception that ends a rank, as one ``ExceptionType: message`` line,
  into ``$TITAN_V4_ERROR_DIR`` (set by ``run_train.sh``) and the traceback into the log file.
  ``run_train.sh`` prints the earliest such line as the last line of the output, whichever rank hit
  it. A rank that dies first makes the others fail with consequential errors such as
  "Connection closed by peer": those rank after every real error, and when there is no real error
  (the first rank was killed) the line says so.
* :func:`quiet_cpu_noise`: drops the start-up lines that mean nothing on a CPU (no lspci, no peak
  FLOPS, no device memory, no NCCL, fp32 autocast) and two library deprecation warnings.
"""

from __future__ import annotations

import logging
import os
import re
import time
import traceback
import warnings

from torchtitan.tools.logging import logger

LOG_DIR = "logs"
ERROR_DIR_ENV = "TITAN_V4_ERROR_DIR"

_FORMAT = "[titan] %(asctime)s - %(name)s - %(levelname)s - %(message)s"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_file_handler: logging.Handler | None = None

# Log lines that carry no information on a CPU-only machine.
_CPU_NOISE = (
    "Error running lspci",
    "Peak flops undefined for",
    "Peak FLOPS used for computing MFU",
    "CPU memory usage for model",
    "ENV[TORCH_NCCL_ASYNC_ERROR_HANDLING]",
    "model.safetensors.index.json not found at hf_assets_path",
    "Mixed precision training is handled by AMP",
)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _StripColors(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", super().format(record))


def attach_log_file(dump_folder: str) -> str:
    """Send this rank's log to ``<dump_folder>/logs/`` (see the module docstring); returns the path."""
    global _file_handler
    rank = _rank()
    directory = os.path.join(dump_folder, LOG_DIR)
    os.makedirs(directory, exist_ok=True)
    if rank == 0:
        path, level, delay = os.path.join(directory, "train.log"), logging.INFO, False
    else:
        path, level, delay = os.path.join(directory, f"rank_{rank}.log"), logging.WARNING, True
    if _file_handler is not None:
        logger.removeHandler(_file_handler)
        _file_handler.close()
    _file_handler = logging.FileHandler(path, encoding="utf-8", delay=delay)
    _file_handler.setLevel(level)
    _file_handler.setFormatter(_StripColors(_FORMAT))
    logger.addHandler(_file_handler)
    if rank == 0:
        logger.info(f"titan_v4: logging to {path}")
    return path


def record_failure(exc: BaseException) -> str:
    """Write the one-line summary of ``exc`` for run_train.sh and its traceback to the log file."""
    summary = f"{type(exc).__name__}: {exc}".strip()
    if _file_handler is not None and isinstance(_file_handler, logging.FileHandler):
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        _file_handler.handle(
            logging.LogRecord(
                "root", logging.ERROR, __file__, 0, f"titan_v4: the run failed on rank {_rank()}:\n{text}", None, None
            )
        )
        _file_handler.flush()
    _write_error_file(summary)
    return summary


def summarize_parser_error(text: str) -> str | None:
    """The first box of a tyro argument error (e.g. "Unrecognized options: --training.stepz"), as one line."""
    lines, inside = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("╭"):
            inside, lines = True, [stripped.strip("╭─╮ ")]
            continue
        if inside:
            body = stripped.strip("│").strip()
            if not body or body.startswith("─") or stripped.startswith("╰"):
                break
            lines.append(body)
    if len(lines) < 2:
        return None
    title, body = lines[0], " ".join(lines[1:])
    return body if body.startswith(title) else f"{title}: {body}"


class StderrRecorder:
    """Pass-through wrapper of sys.stderr that keeps the last ``limit`` characters written."""

    def __init__(self, stream, limit: int = 20000) -> None:
        self._stream, self._limit, self.text = stream, limit, ""

    def write(self, s: str) -> int:
        self.text = (self.text + s)[-self._limit :]
        return self._stream.write(s)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def record_parser_exit(stderr_text: str) -> None:
    """For a SystemExit with a non-zero code: summarise the parser's message (if any) for run_train.sh."""
    summary = summarize_parser_error(stderr_text)
    if summary is not None:
        _write_error_file(f"configuration error: {summary}")


# Errors a rank gets because another one died first: not the cause, so listed after any real error.
_CONSEQUENTIAL = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "DistNetworkError",
    "Broken pipe",
)


def _write_error_file(line: str) -> None:
    """One file per failing rank, named so that ``sort`` puts the cause first: real errors (0_)
    before consequential communication errors (1_), each kind by time."""
    directory = os.environ.get(ERROR_DIR_ENV)
    if not directory:
        return
    kind = "1" if any(p in line for p in _CONSEQUENTIAL) else "0"
    try:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{kind}_{time.time_ns():020d}_rank{_rank()}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"rank {_rank()}: {line}\n")
    except OSError:
        pass  # the summary is a convenience; the traceback is on the console anyway


class _DropLines(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self._patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p in message for p in self._patterns)


def quiet_cpu_noise() -> None:
    """Drop the CPU-meaningless log lines and warnings (idempotent; call once on a CPU)."""
    if not any(isinstance(f, _DropLines) for f in logger.filters):
        logger.addFilter(_DropLines(_CPU_NOISE))
    # torchtitan's fp32 "autocast" on a CPU; torchdata's own deprecated call.
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
