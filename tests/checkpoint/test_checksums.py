"""titan_v4.checkpoint.checksums: a checkpoint file changed in place (same size, so no size check
sees it) is found and named, by every split of the files over the ranks; and the trainer's save
hook (titan_v4.train.resume.record_checksums) records them after sync and async saves."""

import json
import os
import zlib
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp

from titan_v4.checkpoint.checksums import CHECKSUMS_DIR, checkpoint_files, crc32_of, find_corruption, write_checksums
from titan_v4.train.resume import record_checksums


def _save(path, tensors=3):
    dcp.save({f"w{i}": torch.randn(64, 64) for i in range(tensors)} | {"step": 7}, checkpoint_id=str(path))
    return str(path)


def _overwrite_in_place(file, offset_fraction=0.5, length=16):
    """Flip `length` bytes in the middle of the file; its size does not change."""
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.seek(int(size * offset_fraction))
        data = f.read(length)
        f.seek(int(size * offset_fraction))
        f.write(bytes(b ^ 0xFF for b in data))
    assert os.path.getsize(file) == size


def test_crc32_matches_zlib_over_blocks(tmp_path, monkeypatch):
    import titan_v4.checkpoint.checksums as checksums

    monkeypatch.setattr(checksums, "_BLOCK", 1000)  # several blocks, the last one short
    data = os.urandom(4321)
    (tmp_path / "f").write_bytes(data)
    assert crc32_of(str(tmp_path / "f")) == zlib.crc32(data)


def test_files_are_the_index_and_its_data_files(tmp_path):
    path = _save(tmp_path / "ckpt")
    files = checkpoint_files(path)
    assert files[0] == ".metadata" and len(files) >= 2
    assert set(files[1:]) == {name for name in os.listdir(path) if name.endswith(".distcp")}


@pytest.mark.parametrize("saved_by, checked_by", [(1, 1), (2, 1), (1, 3), (3, 2)])
def test_a_file_changed_in_place_is_named_by_exactly_one_checking_rank(tmp_path, saved_by, checked_by):
    path = _save(tmp_path / "ckpt")
    for rank in range(saved_by):
        write_checksums(path, rank, saved_by)
    assert sorted(os.listdir(os.path.join(path, CHECKSUMS_DIR))) == [f"rank_{r}_of_{saved_by}.json" for r in range(saved_by)]
    assert [find_corruption(path, rank, checked_by) for rank in range(checked_by)] == [None] * checked_by

    data = os.path.join(path, checkpoint_files(path)[-1])
    _overwrite_in_place(data)
    found = [find_corruption(path, rank, checked_by) for rank in range(checked_by)]
    assert sum(f is not None for f in found) == 1, found
    assert f"{data} was changed after the save" in next(f for f in found if f)


def test_a_missing_or_resized_file_and_an_unreadable_record_are_named(tmp_path):
    path = _save(tmp_path / "ckpt")
    write_checksums(path, 0, 1)
    data = os.path.join(path, checkpoint_files(path)[-1])
    with open(data, "ab") as f:
        f.write(b"x")
    assert find_corruption(path) == f"{data} has {os.path.getsize(data)} bytes; it had {os.path.getsize(data) - 1} when saved"
    os.remove(data)
    assert find_corruption(path) == f"{data} is missing"

    record = os.path.join(path, CHECKSUMS_DIR, "rank_0_of_1.json")
    with open(record, "w") as f:
        f.write('{"crc32": {".metadata": [1,')
    assert find_corruption(path).startswith(f"its checksum record {record} cannot be read (JSONDecodeError")


def test_a_checkpoint_without_checksums_is_not_checked(tmp_path):
    path = _save(tmp_path / "ckpt")
    _overwrite_in_place(os.path.join(path, checkpoint_files(path)[-1]))
    assert find_corruption(path) is None


# ---------------------------------------------------------------------------- the trainer's hook
def _checkpointer(folder, result=None):
    saved = []

    def dcp_save(state_dict, checkpoint_id, async_mode=None, enable_garbage_collection=False, to_hf=False):
        _save(checkpoint_id)
        saved.append(checkpoint_id)
        return result

    return SimpleNamespace(folder=str(folder), dcp_save=dcp_save, saved=saved)


def _recorded(path):
    with open(os.path.join(path, CHECKSUMS_DIR, "rank_0_of_1.json")) as f:
        return json.load(f)["crc32"]


def test_the_hook_records_after_a_synchronous_save(tmp_path):
    checkpointer = _checkpointer(tmp_path / "checkpoint", "metadata")  # what torchtitan's sync save returns
    record_checksums(checkpointer)
    path = str(tmp_path / "checkpoint" / "step-5")
    assert checkpointer.dcp_save({}, checkpoint_id=path, async_mode="disabled") == "metadata"
    assert sorted(_recorded(path)) == checkpoint_files(path)
    assert find_corruption(path) is None


@pytest.mark.parametrize("wrapped", [False, True], ids=["future", "AsyncSaveResponse"])
def test_the_hook_records_when_an_asynchronous_save_completes(tmp_path, wrapped):
    upload = Future()
    result = SimpleNamespace(staging_completion=Future(), upload_completion=upload) if wrapped else upload
    checkpointer = _checkpointer(tmp_path / "checkpoint", result)
    record_checksums(checkpointer)
    path = str(tmp_path / "checkpoint" / "step-5")
    assert checkpointer.dcp_save({}, checkpoint_id=path, async_mode="async") is result
    assert not os.path.exists(os.path.join(path, CHECKSUMS_DIR))  # not before the upload completes
    upload.set_result(None)
    assert sorted(_recorded(path)) == checkpoint_files(path)


def test_the_hook_records_nothing_for_an_hf_export_or_another_folder(tmp_path):
    checkpointer = _checkpointer(tmp_path / "checkpoint")
    record_checksums(checkpointer)
    export = str(tmp_path / "checkpoint" / "step-5")
    checkpointer.dcp_save({}, checkpoint_id=export, async_mode="disabled", to_hf=True)
    elsewhere = str(tmp_path / "ft" / "step-5")  # e.g. torchft's own checkpoints
    checkpointer.dcp_save({}, elsewhere, "disabled")
    assert len(checkpointer.saved) == 2
    assert not any(os.path.exists(os.path.join(p, CHECKSUMS_DIR)) for p in checkpointer.saved)
