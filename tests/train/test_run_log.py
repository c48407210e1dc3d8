"""titan_v4.train.run_log: the one-line error summaries run_train.sh prints last, the log file, and
the CPU noise filter."""

import logging
import os

import pytest

from titan_v4.train import run_log

TYRO_BOX = """\
╭─ Value error ────────────────────────────────────────────────────────────────╮
│ Error parsing v4: v4.max_nonfinite_steps=-1 is invalid: allowed values are   │
│ integers >= 0                                                                │
│ ──────────────────────────────────────────────────────────────────────────── │
│ For full helptext, see train.py --help                                       │
╰──────────────────────────────────────────────────────────────────────────────╯
"""


def test_a_parser_error_box_becomes_one_line():
    assert run_log.summarize_parser_error("noise\n" + TYRO_BOX) == (
        "Value error: Error parsing v4: v4.max_nonfinite_steps=-1 is invalid: allowed values are integers >= 0"
    )
    assert run_log.summarize_parser_error("no box here") is None


def test_error_files_sort_the_cause_before_consequential_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(run_log.ERROR_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    run_log.record_failure(RuntimeError("gloo: Connection closed by peer [127.0.0.1]:1"))
    monkeypatch.setenv("RANK", "1")
    run_log.record_failure(ValueError("v4.dataset_path='x' does not exist"))
    first = sorted(os.listdir(tmp_path))[0]
    assert (tmp_path / first).read_text() == "rank 1: ValueError: v4.dataset_path='x' does not exist\n"


@pytest.fixture
def root_logger_state():
    logger = logging.getLogger()
    handlers, filters, level = list(logger.handlers), list(logger.filters), logger.level
    yield logger
    for h in logger.handlers[:]:
        if h not in handlers:
            logger.removeHandler(h)
            h.close()
    logger.filters[:] = filters
    logger.setLevel(level)
    run_log._file_handler = None


def test_rank_0_logs_to_a_file_in_the_dump_folder(tmp_path, monkeypatch, root_logger_state):
    monkeypatch.setenv("RANK", "0")
    root_logger_state.setLevel(logging.INFO)
    path = run_log.attach_log_file(str(tmp_path))
    root_logger_state.info("\x1b[31mstep:  1/3\x1b[39m")
    assert path == str(tmp_path / "logs" / "train.log")
    assert "step:  1/3" in open(path).read() and "\x1b[" not in open(path).read()


def test_other_ranks_write_a_file_only_for_warnings(tmp_path, monkeypatch, root_logger_state):
    monkeypatch.setenv("RANK", "3")
    root_logger_state.setLevel(logging.INFO)
    path = run_log.attach_log_file(str(tmp_path))
    root_logger_state.info("chatter")
    assert not os.path.exists(path)
    root_logger_state.warning("something odd")
    assert "something odd" in open(path).read()


def test_cpu_noise_is_dropped(root_logger_state, caplog):
    run_log.quiet_cpu_noise()
    with caplog.at_level(logging.INFO):
        root_logger_state.warning("Peak flops undefined for: cpu, fallback to A100")
        root_logger_state.info("CPU memory usage for model: -0.00GiB(-0.00%)")
        root_logger_state.info("a useful line")
    assert caplog.messages == ["a useful line"]
