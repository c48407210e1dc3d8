"""Checksums of a DCP checkpoint's files: written after a save, checked before a resume.

A checkpoint file whose bytes were overwritten in place keeps its size, so no index-and-size check
sees it, and DCP fails only inside the load without naming the file. Each rank of the saving run
writes, once its save has completed, ``<checkpoint>/checksums/rank_<r>_of_<w>.json``::

    {"crc32": {"<file relative to the checkpoint>": [size in bytes, crc32], ...}}

for its share of the checkpoint's files: the index ``.metadata`` and every data file it points into,
sorted by name, the i-th file to rank ``i % w``. No collective is needed, so an asynchronous save
(a background thread or process) writes its share when it completes. The files are read back in
64 MiB blocks; zlib's crc32 runs at about 3 GB/s per process.

:func:`find_corruption` checks the recorded files the same way, each rank its share; a file
without a recorded checksum (a checkpoint saved without them, or a rank that stopped before
writing its share) is not checked.
"""

from __future__ import annotations

import json
import os
import zlib

from torch.distributed.checkpoint import FileSystemReader

CHECKSUMS_DIR = "checksums"
INDEX = ".metadata"
_BLOCK = 64 << 20


def checkpoint_files(path: str) -> list[str]:
    """The files of the DCP checkpoint at ``path`` (relative to it), sorted: the index and every
    data file the index points into."""
    storage = FileSystemReader(path).read_metadata().storage_data or {}
    return sorted({INDEX, *(info.relative_path for info in storage.values())})


def crc32_of(file: str) -> int:
    """The crc32 of the file's bytes."""
    crc = 0
    with open(file, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def _share(files: list[str], rank: int, world_size: int) -> list[str]:
    return files[rank::world_size]


def write_checksums(path: str, rank: int, world_size: int) -> str:
    """Record the sizes and crc32s of rank ``rank``'s share of the checkpoint at ``path`` (saved by
    ``world_size`` ranks, complete); returns the file written. The record appears whole or not at
    all (written aside, then renamed)."""
    recorded = {}
    for relative in _share(checkpoint_files(path), rank, world_size):
        file = os.path.join(path, relative)
        recorded[relative] = [os.path.getsize(file), crc32_of(file)]
    folder = os.path.join(path, CHECKSUMS_DIR)
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"rank_{rank}_of_{world_size}.json")
    with open(target + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"crc32": recorded}, f)
    os.replace(target + ".tmp", target)
    return target


def read_checksums(path: str) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """(file -> (size, crc32) recorded for the checkpoint at ``path``, problems): every rank's record
    merged; a record that cannot be read is a problem naming it."""
    folder = os.path.join(path, CHECKSUMS_DIR)
    recorded: dict[str, tuple[int, int]] = {}
    problems = []
    if not os.path.isdir(folder):
        return recorded, problems
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        record = os.path.join(folder, name)
        try:
            with open(record, encoding="utf-8") as f:
                entries = json.load(f)["crc32"]
            recorded.update({file: (int(size), int(crc)) for file, (size, crc) in entries.items()})
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"its checksum record {record} cannot be read ({type(e).__name__}: {e})")
    return recorded, problems


def find_corruption(path: str, rank: int = 0, world_size: int = 1) -> str | None:
    """Why rank ``rank``'s share (of ``world_size``) of the checkpoint at ``path`` does not match the
    checksums recorded when it was saved, naming the file; None if it matches or nothing is
    recorded. ``world_size=1`` checks every recorded file."""
    recorded, problems = read_checksums(path)
    if problems:
        return problems[0] if rank == 0 else None
    for relative in _share(sorted(recorded), rank, world_size):
        file = os.path.join(path, relative)
        size, crc = recorded[relative]
        if not os.path.isfile(file):
            return f"{file} is missing"
        actual_size = os.path.getsize(file)
        if actual_size != size:
            return f"{file} has {actual_size} bytes; it had {size} when saved"
        actual_crc = crc32_of(file)
        if actual_crc != crc:
            return f"{file} was changed after the save (crc32 {actual_crc:08x}; {crc:08x} when saved)"
    return None
