"""Local data files (``v4.dataset = "local"``): found, loaded and checked with errors that name the file.

HF ``datasets`` reports bad local files badly: an empty ``.jsonl`` raises a bare ``StopIteration``,
an empty ``.txt`` a ``SchemaInferenceError``, non-UTF-8 text a decode error without the file name,
and a null or numeric text column loads fine and fails later in the tokenizer
(``TextInputSequence must be str``), and a malformed JSON line names neither the file's line nor the
problem (``Trailing data at position 17``). :func:`load_local_files` skips empty files (with a
warning; all empty is an error), names the file and line of a decode error or of malformed JSON, and
checks the text column's type and nulls on the loaded Arrow table, naming the file and row of the
first bad value, all at start-up.
"""

from __future__ import annotations

import json
import os

from torchtitan.tools.logging import logger

# File extension -> HF `datasets` builder.
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad training data; the message names the file (and row) and what is expected."""


def find_local_files(path: str) -> tuple[str, list[str]]:
    """(HF builder name, sorted files) for v4.dataset_path = one file or a directory of one format."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"v4.dataset_path={path!r} does not exist")
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if os.path.splitext(name)[1] in LOCAL_FORMATS
        )
    else:
        files = [path]
    allowed = ", ".join(LOCAL_FORMATS)
    if not files:
        raise FileNotFoundError(f"v4.dataset_path={path!r}: no data files found (allowed extensions: {allowed})")
    builders = {LOCAL_FORMATS.get(os.path.splitext(f)[1]) for f in files}
    if None in builders:
        raise ValueError(f"v4.dataset_path={path!r} is invalid: allowed extensions are {allowed}")
    if len(builders) > 1:
        raise ValueError(f"v4.dataset_path={path!r} mixes formats {sorted(builders)}: use files of one format")
    return builders.pop(), files


def _is_empty(file: str, builder: str) -> bool:
    if os.path.getsize(file) == 0:
        return True
    if builder == "parquet":
        return False
    with open(file, "rb") as f:  # whitespace only (blank lines): no document at all
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _first_undecodable(file: str) -> str | None:
    """'line N, byte B' of the first invalid UTF-8 in ``file``, or None."""
    with open(file, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return f"line {line}, byte {e.start}: {e.reason}"
    return None


def load_local_files(path: str, column: str):
    """The map-style HF dataset over the files at ``path``, checked; ``column`` holds the text
    (``.txt`` files: always ``"text"``). Returns ``(dataset, builder, files, column)``."""
    from datasets import load_dataset

    builder, files = find_local_files(path)
    if builder == "text":
        column = "text"  # HF's text builder: one row per line, in column "text"
    empty = [f for f in files if _is_empty(f, builder)]
    files = [f for f in files if f not in empty]
    if not files:
        raise DataError(
            f"v4.dataset_path={path!r}: every data file is empty ({', '.join(empty)}); there is nothing to train on"
        )
    for f in empty:
        logger.warning(f"titan_v4: data file {f} is empty; it is skipped")
    try:
        ds = load_dataset(builder, data_files={"train": files}, split="train")
    except Exception as e:
        raise _explain_load_error(e, builder, files, column) from e

    if column not in ds.column_names:
        raise DataError(
            f"v4.text_column={column!r} is invalid: allowed values are the columns {ds.column_names} of {path}"
        )
    _check_text_column(ds, column, builder, files)
    return ds, builder, files, column


def _explain_load_error(e: Exception, builder: str, files: list[str], column: str) -> Exception:
    causes, c = [], e
    while c is not None:
        causes.append(c)
        c = c.__cause__ or c.__context__
    if builder in ("json", "text") and any(isinstance(c, UnicodeDecodeError) for c in causes):
        for f in files:
            where = _first_undecodable(f)
            if where is not None:
                return DataError(f"data file {f} is not UTF-8 text ({where}): convert it to UTF-8 or remove it")
    if builder == "json":
        for f in files:
            problem = _json_problem(f, column)
            if problem is not None:
                return DataError(f"data file {f}, {problem}")
    root = causes[-1]
    return DataError(f"could not read the {builder} data files {_some(files)}: {type(root).__name__}: {root}")


def _json_problem(file: str, column: str) -> str | None:
    """'line N: what is wrong; what is allowed' for the first malformed record of a JSON file, or None.

    HF's json builder reads JSON Lines (one object per line; blank lines skipped) and, from a
    ``.json`` file, also one JSON document (a list of objects). A ``.json`` file whose first
    non-blank line is not an object by itself is such a document and is parsed whole."""
    with open(file, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.split("\n")  # the JSON Lines separator; str.splitlines would also split at U+2028
    first = next((line for line in lines if line.strip()), "")
    if file.endswith(".json") and not isinstance(_parse_json(first), dict):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return (
                f"line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}); "
                "allowed: one JSON object per line or one JSON list of objects"
            )
        return None
    allowed = f'allowed: one JSON object per line, such as {{"{column}": "..."}}'
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        excerpt = repr(line if len(line) <= 80 else line[:77] + "...")
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number}: not valid JSON ({e.msg} at column {e.colno}): {excerpt}; {allowed}"
        if not isinstance(value, dict):
            return f"line {number}: {excerpt} is not a JSON object; {allowed}"
    return None


def _parse_json(text: str):
    """The value of ``text``, or None where it is not valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _check_text_column(ds, column: str, builder: str, files: list[str]) -> None:
    import pyarrow.compute as pc
    from datasets import Value

    feature = ds.features[column]
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        texts = ds[column]
        row = next((i for i, v in enumerate(texts) if not isinstance(v, str) and v is not None), 0)
        file, file_row = locate_row(row, builder, files)
        raise DataError(
            f"data file {file}, row {file_row + 1}: column {column!r} holds {texts[row]!r} "
            f"(the column's type is {feature}); allowed values are text strings"
        )
    values = ds.data.column(column)
    _check_utf8(values, builder, files)
    if values.null_count:
        row = pc.index(pc.is_null(values), True).as_py()
        file, file_row = locate_row(row, builder, files)
        raise DataError(
            f"data file {file}, row {file_row + 1}: column {column!r} is null; allowed values are text strings"
        )


def _check_utf8(values, builder: str, files: list[str]) -> None:
    """The JSON reader keeps invalid UTF-8 inside strings; it would fail later, without a file name."""
    import pyarrow as pa

    try:
        for chunk in values.chunks:
            chunk.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    raw = values.cast(pa.large_binary()).to_pylist()
    row = next(i for i, b in enumerate(raw) if b is not None and not _decodes(b))
    file, file_row = locate_row(row, builder, files)
    where = _first_undecodable(file) or f"row {file_row + 1}"
    raise DataError(f"data file {file} is not UTF-8 text ({where}): convert it to UTF-8 or remove it")


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def locate_row(row: int, builder: str, files: list[str]) -> tuple[str, int]:
    """(file, 0-based row within it) of global ``row`` of the dataset built from ``files`` (error path:
    loads each file again, from HF's cache)."""
    from datasets import load_dataset

    for f in files:
        n = len(load_dataset(builder, data_files={"train": [f]}, split="train"))
        if row < n:
            return f, row
        row -= n
    return files[-1], row
