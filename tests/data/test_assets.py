"""The bundled corpus and tokenizer: contents, round trip, and that make_assets.py reproduces them."""

import filecmp
import os

import pytest
import tokenizers

from titan_v4.data import make_assets
from titan_v4.data.dataset import ASSETS_DIR, load_synthetic_documents


@pytest.fixture(scope="module")
def tokenizer():
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    return HuggingFaceTokenizer(ASSETS_DIR)


def test_assets_are_small():
    total = sum(os.path.getsize(os.path.join(ASSETS_DIR, f)) for f in os.listdir(ASSETS_DIR))
    assert total < 2 * 1024 * 1024


def test_tokenizer_vocab_and_special_tokens(tokenizer):
    assert tokenizer.get_vocab_size() == make_assets.VOCAB_SIZE == 2048
    assert (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)
    assert tokenizer.id_to_token(2) == make_assets.PAD
    # BOS/EOS come only when asked for (the dataset asks).
    assert tokenizer.encode("Alice", add_bos=False, add_eos=False) == tokenizer.encode("Alice")
    assert tokenizer.encode("Alice", add_bos=True, add_eos=True)[::len(tokenizer.encode("Alice")) + 1] == [0, 1]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("The capital of France is Paris. 17 + 25 = 42.", id="corpus-like"),
        pytest.param("Unseen words: zebra, quixotic; tabs\tand\nnewlines  ", id="unseen"),
        pytest.param("bytes: héllo wörld, 日本語, emoji 🚀", id="non-ascii"),
    ],
)
def test_tokenizer_round_trip(tokenizer, text):
    token_ids = tokenizer.encode(text)
    assert max(token_ids) < tokenizer.get_vocab_size()
    assert tokenizer.decode(token_ids) == text


def test_tokenizer_compresses_the_corpus(tokenizer):
    documents = load_synthetic_documents()
    assert len(documents) == make_assets.NUM_DOCUMENTS
    text = " ".join(documents[:50])
    assert len(text) / len(tokenizer.encode(text)) > 3  # characters per token: whole words/numbers


def test_make_assets_reproduces_the_bundled_files(tmp_path):
    make_assets.write_assets(str(tmp_path))
    assert filecmp.cmp(tmp_path / "corpus.txt", os.path.join(ASSETS_DIR, "corpus.txt"), shallow=False)
    assert filecmp.cmp(tmp_path / "tokenizer_config.json", os.path.join(ASSETS_DIR, "tokenizer_config.json"), shallow=False)
    if tokenizers.__version__ != make_assets.TOKENIZERS_VERSION:
        pytest.skip(f"tokenizer.json was made by tokenizers {make_assets.TOKENIZERS_VERSION}, this is {tokenizers.__version__}")
    assert filecmp.cmp(tmp_path / "tokenizer.json", os.path.join(ASSETS_DIR, "tokenizer.json"), shallow=False)
