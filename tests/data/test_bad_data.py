"""Bad training data and tokenizers stop the run with one message naming the file (and row); blank
lines and empty documents are skipped on every data path instead of becoming BOS EOS samples.
(torchtitan 0.2.2 + HF datasets: bare StopIteration, SchemaInferenceError, "TextInputSequence must
be str", "expected , or }", a decode error without the file name.)"""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.job_config import job_config
from titan_v4.data import ASSETS_DIR, PackedDocumentDataset, build_v4_dataloader, build_v4_tokenizer
from titan_v4.data.local_files import DataError


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _loader(path, seq_len="32", column="text"):
    cfg = job_config(
        "--v4.dataset", "local", "--v4.dataset_path", str(path), "--v4.text_column", column, "--training.seq_len", seq_len
    )
    return build_v4_dataloader(1, 0, build_v4_tokenizer(cfg), cfg)


def _first_batch(path, **kwargs):
    return next(iter(_loader(path, **kwargs)))


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def _jsonl(path: Path, texts) -> Path:
    return _write(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("empty.txt", ""), ("blank.txt", "\n  \n\n")])
def test_an_empty_file_is_named(tmp_path, name, content):
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=f"every data file is empty \\({path}\\)"):
        _first_batch(path)


def test_an_empty_file_among_others_is_skipped_with_a_warning(tmp_path, caplog):
    empty = _write(tmp_path / "d" / "a.jsonl", "")
    _jsonl(tmp_path / "d" / "b.jsonl", ["word " * 50])
    with caplog.at_level(logging.WARNING):
        inputs, _ = _first_batch(tmp_path / "d")
    assert inputs["input"].shape == (2, 32)
    assert f"data file {empty} is empty; it is skipped" in caplog.text


@pytest.mark.parametrize(
    "texts, message",
    [
        (["good text", None, "more"], r"data\.jsonl, row 2: column 'text' is null; allowed values are text strings"),
        ([5, 7], r"data\.jsonl, row 1: column 'text' holds 5 \(the column's type is Value\('int64'\)\)"),
        (["good", 7], r"data\.jsonl, row 2: column 'text' holds 7"),
    ],
)
def test_a_non_text_value_names_the_file_and_row(tmp_path, texts, message):
    with pytest.raises(DataError, match=message):
        _first_batch(_jsonl(tmp_path / "data.jsonl", texts))


def test_the_row_is_counted_within_its_file(tmp_path):
    _jsonl(tmp_path / "d" / "a.jsonl", ["one", "two", "three"])
    _jsonl(tmp_path / "d" / "b.jsonl", ["four", None])
    with pytest.raises(DataError, match=r"b\.jsonl, row 2: column 'text' is null"):
        _first_batch(tmp_path / "d")


@pytest.mark.parametrize("name", ["bad.txt", "bad.jsonl"])
def test_non_utf8_text_names_the_file_and_line(tmp_path, name):
    body = b"hello\n\xff\xfe bad\n" if name.endswith(".txt") else b'{"text": "ok"}\n{"text": "\xff"}\n'
    path = _write(tmp_path / name, body)
    with pytest.raises(DataError, match=f"data file {path} is not UTF-8 text \\(line 2, byte"):
        _first_batch(path)


@pytest.mark.parametrize(
    "name, body, message",
    [
        pytest.param(
            "d.jsonl", '{"text": "ok"}\n\n{"text": "a"} x\n{"text": "b"}\n',
            """line 3: not valid JSON (Extra data at column 15): '{"text": "a"} x'; """
            """allowed: one JSON object per line, such as {"text": "..."}""",
            id="trailing-data",
        ),
        pytest.param(
            "d.jsonl", '{"text": "ok"}\n{"text": "b"\n',
            """line 2: not valid JSON (Expecting ',' delimiter at column 13): '{"text": "b"'; """
            """allowed: one JSON object per line, such as {"text": "..."}""",
            id="unterminated",
        ),
        pytest.param(
            "d.jsonl", '{"text": "ok"}\n5\n',
            """line 2: '5' is not a JSON object; allowed: one JSON object per line, such as {"text": "..."}""",
            id="not-an-object",
        ),
        pytest.param(
            "d.json", '[{"text": "ok"},\n {"text": "b"]\n',
            "line 2, column 14: not valid JSON (Expecting ',' delimiter); "
            "allowed: one JSON object per line or one JSON list of objects",
            id="json-document",
        ),
    ],
)  # fmt: skip
def test_malformed_json_names_the_file_line_and_problem(tmp_path, name, body, message):
    _write((tmp_path / "d" / "a").with_suffix(Path(name).suffix), '{"text": "fine"}\n')  # a good file first
    path = _write(tmp_path / "d" / name, body)
    with pytest.raises(DataError) as error:
        _first_batch(tmp_path / "d")
    assert str(error.value) == f"data file {path}, {message}"


def test_a_non_text_record_met_while_streaming_names_the_record(tmp_path):
    from datasets import Dataset
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS

    from titan_v4.data.hf_text import V4TextDataset

    DATASETS["titan_v4_test_stream"] = DatasetConfig(
        path="x", loader=lambda _: Dataset.from_dict({"text": ["fine text", None]}), sample_processor=lambda s: s["text"]
    )
    ds = V4TextDataset(
        dataset_name="titan_v4_test_stream", dataset_path=None, tokenizer=build_v4_tokenizer(job_config()),
        seq_len=4, describe_row=lambda row: f"record {row + 1}",
    )  # fmt: skip
    with pytest.raises(DataError, match="record 2: the text is None; allowed values are text strings"):
        list(ds)


def _bos_eos_pairs(ids, tok):
    return sum(1 for a, b in zip(ids, ids[1:]) if (a, b) == (tok.bos_id, tok.eos_id))


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_blank_documents_are_skipped_on_the_local_path(tmp_path, fmt):
    docs = ["first document here", "", "   ", "second document", "\t"]
    path = _write(tmp_path / "d.txt", "\n".join(docs) + "\n") if fmt == "txt" else _jsonl(tmp_path / "d.jsonl", docs)
    cfg = job_config("--v4.dataset", "local", "--v4.dataset_path", str(path), "--training.seq_len", "8")
    tok = build_v4_tokenizer(cfg)
    loader = build_v4_dataloader(1, 0, tok, cfg, infinite=False)
    ids = torch.cat([torch.cat([x["input"].flatten(), y[:, -1]]) for x, y in loader]).tolist()
    assert ids and _bos_eos_pairs(ids, tok) == 0


def test_blank_documents_are_skipped_on_the_synthetic_path():
    tok = build_v4_tokenizer(job_config())
    ds = PackedDocumentDataset(["some text", "", "  ", "more text"] * 4, tok, seq_len=8, infinite=False)
    ids = [t for x, y in ds for t in x["input"].tolist() + y[-1:].tolist()]
    assert ids and _bos_eos_pairs(ids, tok) == 0


def test_a_json_file_that_is_not_a_tokenizer_is_named(tmp_path):
    _write(tmp_path / "tokenizer.json", '{"not": "a tokenizer"')
    shutil.copy(Path(ASSETS_DIR) / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    with pytest.raises(ValueError, match=f"v4.tokenizer_path=.*{tmp_path / 'tokenizer.json'}.*is not a valid Hugging Face tokenizers file"):
        build_v4_tokenizer(job_config("--v4.tokenizer_path", str(tmp_path)))


def _tiny_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    _write(directory / "tokenizer_config.json", json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return directory


def test_model_hf_assets_path_is_honoured_for_the_tokenizer(tmp_path):
    assets = _tiny_tokenizer(tmp_path / "assets")
    assert build_v4_tokenizer(job_config("--model.hf_assets_path", str(assets))).get_vocab_size() == 4
    # v4.tokenizer_path wins; a folder without tokenizer.json means the bundled tokenizer.
    both = job_config("--model.hf_assets_path", str(assets), "--v4.tokenizer_path", ASSETS_DIR)
    assert build_v4_tokenizer(both).get_vocab_size() == 2048
    assert build_v4_tokenizer(job_config("--model.hf_assets_path", str(tmp_path))).get_vocab_size() == 2048
