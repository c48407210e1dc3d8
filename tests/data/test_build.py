"""titan_v4.data.build: build_v4_tokenizer / build_v4_dataloader (the TrainSpec builders)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.job_config import job_config
from titan_v4.model.loss import IGNORE_INDEX
from titan_v4.data import ASSETS_DIR, build_v4_dataloader, build_v4_tokenizer


# ------------------------------------------------------------------------------------- tokenizer
def test_default_tokenizer_is_the_bundled_one():
    tok = build_v4_tokenizer(job_config())
    assert tok.get_vocab_size() == 2048 and (tok.bos_id, tok.eos_id) == (0, 1)


def test_tokenizer_path_may_name_the_file_or_its_directory(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(ASSETS_DIR) / name, tmp_path / name)
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        assert build_v4_tokenizer(job_config("--v4.tokenizer_path", str(path))).get_vocab_size() == 2048


@pytest.mark.parametrize(
    "setup, error, message",
    [
        pytest.param(lambda d: d / "missing.json", FileNotFoundError, "does not exist", id="missing"),
        pytest.param(lambda d: d, FileNotFoundError, "no tokenizer.json", id="empty-dir"),
        pytest.param(lambda d: _write(d / "vocab.json", "{}"), ValueError, "a file named tokenizer.json", id="wrong-file"),
        pytest.param(lambda d: _copy_tokenizer_only(d), ValueError, "no BOS/EOS token", id="no-bos-eos"),
    ],
)
def test_tokenizer_errors_are_clear(tmp_path, setup, error, message):
    with pytest.raises(error, match=message):
        build_v4_tokenizer(job_config("--v4.tokenizer_path", str(setup(tmp_path))))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _copy_tokenizer_only(directory: Path) -> Path:
    shutil.copy(Path(ASSETS_DIR) / "tokenizer.json", directory / "tokenizer.json")
    return directory


# ------------------------------------------------------------------------------------ dataloader
def assert_document_layout(inputs: dict, labels: torch.Tensor, bos_id: int) -> None:
    """Labels are the inputs shifted by one, except a BOS target (a document boundary), which is
    ignored; doc_ids count the BOS tokens seen so far in the row (titan_v4/data/documents.py)."""
    tokens = inputs["input"]
    boundary = tokens[:, 1:] == bos_id
    assert boundary.any(), "the batch should hold a document boundary"
    assert torch.equal(labels[:, :-1], tokens[:, 1:].masked_fill(boundary, IGNORE_INDEX))
    assert not (labels == bos_id).any()
    assert inputs["doc_ids"].dtype == torch.int32
    assert torch.equal(inputs["doc_ids"], (tokens == bos_id).cumsum(dim=1).to(torch.int32))


def test_synthetic_dataloader_batches():
    cfg = job_config()
    tokenizer = build_v4_tokenizer(cfg)
    loader = build_v4_dataloader(dp_world_size=2, dp_rank=1, tokenizer=tokenizer, job_config=cfg)
    inputs, labels = next(iter(loader))
    assert set(inputs) == {"input", "doc_ids"}
    assert inputs["input"].shape == inputs["doc_ids"].shape == labels.shape == (2, 32)
    assert inputs["input"].dtype == torch.long
    assert_document_layout(inputs, labels, tokenizer.bos_id)
    assert int(labels.max()) < 2048


def test_without_document_masking_labels_are_the_shifted_inputs():
    cfg = job_config("--v4.no-document_masking")
    loader = build_v4_dataloader(dp_world_size=2, dp_rank=1, tokenizer=build_v4_tokenizer(cfg), job_config=cfg)
    inputs, labels = next(iter(loader))
    assert set(inputs) == {"input"}
    assert torch.equal(inputs["input"][:, 1:], labels[:, :-1])


def test_document_masking_keeps_the_checkpointed_position():
    """The layout wrapper holds no state: the dataloader's state is the dataset's, with masking on or
    off, and a loader restored from it continues with the same batch."""
    states, following = {}, {}
    for masking in (True, False):
        cfg = job_config("--v4.document_masking" if masking else "--v4.no-document_masking")
        tokenizer = build_v4_tokenizer(cfg)
        loader = build_v4_dataloader(dp_world_size=1, dp_rank=0, tokenizer=tokenizer, job_config=cfg)
        batches = iter(loader)
        next(batches)
        states[masking] = loader.state_dict()
        following[masking] = next(batches)
    resumed = build_v4_dataloader(1, 0, tokenizer, job_config())
    resumed.load_state_dict(states[False])  # a checkpoint written without masking
    inputs, labels = next(iter(resumed))
    assert torch.equal(inputs["input"], following[True][0]["input"]) and torch.equal(labels, following[True][1])
    assert torch.equal(inputs["input"], following[False][0]["input"])


def test_training_dataset_path_is_refused():
    cfg = job_config("--training.dataset_path", "/data")
    with pytest.raises(ValueError, match="training.dataset_path='/data' is not used by titan_v4"):
        build_v4_dataloader(dp_world_size=1, dp_rank=0, tokenizer=build_v4_tokenizer(cfg), job_config=cfg)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep HF datasets' Arrow cache inside the test's tmp dir."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


DOCS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 3) for i in range(40)]


def _write_local(directory: Path, fmt: str) -> Path:
    if fmt == "jsonl":
        return _write(directory / "data.jsonl", "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    if fmt == "txt":
        return _write(directory / "data.txt", "\n".join(DOCS) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    sub = directory / "shards"
    sub.mkdir()
    for k in range(2):  # a directory of two parquet files
        pq.write_table(pa.table({"body": DOCS[k::2]}), sub / f"part-{k}.parquet")
    return sub


@pytest.mark.parametrize("fmt", ["jsonl", "txt", "parquet"])
def test_local_dataset(tmp_path, hf_cache, fmt):
    path = _write_local(tmp_path, fmt)
    cfg = job_config("--v4.dataset", "local", "--v4.dataset_path", str(path), "--v4.text_column", "body")
    tok = build_v4_tokenizer(cfg)
    loader = build_v4_dataloader(dp_world_size=1, dp_rank=0, tokenizer=tok, job_config=cfg)
    inputs, labels = next(iter(loader))
    assert inputs["input"].shape == labels.shape == (2, 32)
    assert_document_layout(inputs, labels, tok.bos_id)
    first = inputs["input"][0].tolist()
    assert first[0] == tok.bos_id
    assert tok.decode(first[1:]).startswith("Document")


def test_local_dataset_errors(tmp_path, hf_cache):
    def build(path, column="text"):
        cfg = job_config("--v4.dataset", "local", "--v4.dataset_path", str(path), "--v4.text_column", column)
        return next(iter(build_v4_dataloader(1, 0, build_v4_tokenizer(cfg), cfg)))

    with pytest.raises(FileNotFoundError, match="does not exist"):
        build(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="no data files found"):
        build(tmp_path)
    with pytest.raises(ValueError, match="allowed extensions are"):
        build(_write(tmp_path / "data.csv", "a,b\n"))
    jsonl = _write_local(tmp_path, "jsonl")
    with pytest.raises(ValueError, match=r"v4.text_column='text' is invalid: allowed values are the columns \['body', 'id'\]"):
        build(jsonl, column="text")


class _NoBosTokenizer:
    """Has a BOS id but does not put it in front of a document (a stream without boundaries)."""

    bos_id, eos_id = 1, 2

    def encode(self, text, *, add_bos, add_eos):
        return [ord(c) % 50 + 10 for c in text] + [self.eos_id] * add_eos


def test_document_masking_refuses_a_stream_without_document_boundaries():
    with pytest.raises(ValueError, match=r"v4.document_masking=true needs every document to begin with the tokenizer's BOS token \(id 1\)"):
        build_v4_dataloader(1, 0, _NoBosTokenizer(), job_config())
    loader = build_v4_dataloader(1, 0, _NoBosTokenizer(), job_config("--v4.no-document_masking"))
    assert set(next(iter(loader))[0]) == {"input"}


def test_a_longer_seq_len_resumes_where_the_stream_stopped():
    """A stage switch (4K -> 16K -> 64K, docs/long_context.md) resumes the dataloader's state under a new
    training.seq_len: the next window starts at the first token the shorter run did not consume."""
    # Masking off so that each window's last label is its last token (masking keeps the state: above).
    plain = "--v4.no-document_masking"
    short_cfg, long_cfg = job_config("--training.seq_len", "32", plain), job_config("--training.seq_len", "80", plain)
    tokenizer = build_v4_tokenizer(short_cfg)
    fresh = iter(build_v4_dataloader(1, 0, tokenizer, short_cfg))
    # The token stream: windows of seq_len + 1 tokens, back to back (the last label of each is its end).
    stream = torch.cat([torch.cat((x["input"], y[:, -1:]), dim=1).flatten() for x, y in (next(fresh) for _ in range(6))])
    short = build_v4_dataloader(1, 0, tokenizer, short_cfg)
    batches = iter(short)
    next(batches), next(batches)  # 2 steps of 2 windows of 33 tokens: 132 tokens consumed
    state = short.state_dict()
    longer = build_v4_dataloader(1, 0, tokenizer, long_cfg)
    longer.load_state_dict(state)
    inputs, labels = next(iter(longer))
    assert inputs["input"].shape == (2, 80)
    window = torch.cat((inputs["input"][0], labels[0, -1:]))
    assert torch.equal(window, stream[132 : 132 + 81])
