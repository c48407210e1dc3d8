"""PackedDocumentDataset: packing, shifted labels, data-parallel shards, looping, resume."""

import itertools

import pytest
import torch

from titan_v4.data.dataset import PackedDocumentDataset

BOS, EOS = 1, 2


class CharTokenizer:
    """One id per character (ord + 10), so expected token streams can be written by hand."""

    def encode(self, text, *, add_bos, add_eos):
        return [BOS] * add_bos + [ord(c) + 10 for c in text] + [EOS] * add_eos


def ids(text):
    return [ord(c) + 10 for c in text]


def take(dataset, n):
    return list(itertools.islice(iter(dataset), n))


def test_packs_documents_with_bos_eos_into_seq_len_plus_one_windows():
    ds = PackedDocumentDataset(["ab", "cde"], CharTokenizer(), seq_len=3)
    stream = [BOS, *ids("ab"), EOS, BOS, *ids("cde"), EOS] * 3
    for k, (inputs, labels) in enumerate(take(ds, 5)):
        window = stream[4 * k : 4 * k + 4]  # windows of seq_len + 1, not overlapping
        assert set(inputs) == {"input"}
        assert inputs["input"].dtype == labels.dtype == torch.long
        assert inputs["input"].tolist() == window[:-1]
        assert labels.tolist() == window[1:]


def test_labels_are_inputs_shifted_by_one():
    ds = PackedDocumentDataset(["hello world", "x", "packing test"], CharTokenizer(), seq_len=5)
    for inputs, labels in take(ds, 10):
        assert inputs["input"].shape == labels.shape == (5,)
        assert torch.equal(inputs["input"][1:], labels[:-1])


def test_data_parallel_ranks_read_disjoint_document_shards():
    docs = [chr(ord("a") + i) * 3 for i in range(6)]  # "aaa", "bbb", ...
    seen = []
    for rank in range(3):
        ds = PackedDocumentDataset(docs, CharTokenizer(), seq_len=4, dp_rank=rank, dp_world_size=3, infinite=False)
        tokens = {t for inputs, labels in ds for t in inputs["input"].tolist() + labels.tolist()}
        letters = {chr(t - 10) for t in tokens if t not in (BOS, EOS)}
        assert letters == {docs[rank][0], docs[rank + 3][0]}  # documents rank, rank + 3
        seen.append(letters)
    assert set.union(*seen) == {d[0] for d in docs}


def test_finite_stops_and_infinite_loops_over_the_shard():
    finite = PackedDocumentDataset(["abc"] * 3, CharTokenizer(), seq_len=4, infinite=False)
    assert len(list(finite)) == 3  # 15 tokens -> 3 windows of 5
    looping = PackedDocumentDataset(["abc"] * 3, CharTokenizer(), seq_len=4)
    assert len(take(looping, 20)) == 20
    assert looping.epoch >= 5


def test_state_dict_resume_yields_the_same_next_batches():
    docs = [f"document number {i} " * (1 + i % 4) for i in range(7)]
    ref = PackedDocumentDataset(docs, CharTokenizer(), seq_len=16)
    ref_iter = iter(ref)
    for _ in range(9):  # part-way through an epoch, with tokens left in the buffer
        next(ref_iter)
    state = ref.state_dict()
    expected = [next(ref_iter) for _ in range(20)]  # crosses the epoch boundary

    resumed = PackedDocumentDataset(docs, CharTokenizer(), seq_len=16)
    resumed.load_state_dict(state)
    for (exp_in, exp_lab), (got_in, got_lab) in zip(expected, take(resumed, 20)):
        assert torch.equal(exp_in["input"], got_in["input"])
        assert torch.equal(exp_lab, got_lab)


def test_state_dict_resume_through_torchtitan_dataloader():
    """The state torchtitan's checkpointer saves (ParallelAwareDataloader) restores the position."""
    from torchtitan.components.dataloader import ParallelAwareDataloader

    docs = [f"doc {i} " * (2 + i % 5) for i in range(11)]

    def loader():
        ds = PackedDocumentDataset(docs, CharTokenizer(), seq_len=8, dp_rank=1, dp_world_size=2)
        return ParallelAwareDataloader(ds, dp_rank=1, dp_world_size=2, batch_size=3)

    ref = loader()
    ref_iter = iter(ref)
    for _ in range(4):
        next(ref_iter)
    state = ref.state_dict()
    expected = [next(ref_iter) for _ in range(5)]

    resumed = loader()
    resumed.load_state_dict(state)
    got = list(itertools.islice(iter(resumed), 5))
    for (exp_in, exp_lab), (got_in, got_lab) in zip(expected, got, strict=True):
        assert exp_in["input"].shape == (3, 8)
        assert torch.equal(exp_in["input"], got_in["input"])
        assert torch.equal(exp_lab, got_lab)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param(dict(seq_len=0), "seq_len=0", id="seq_len"),
        pytest.param(dict(seq_len=4, dp_rank=2, dp_world_size=2), "dp_rank=2", id="dp_rank"),
        pytest.param(dict(seq_len=4, dp_rank=3, dp_world_size=4), "rank 3 of 4 gets no documents", id="empty-shard"),
    ],
)
def test_invalid_arguments_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PackedDocumentDataset(["a", "b", "c"], CharTokenizer(), **kwargs)


def test_load_state_dict_rejects_a_position_outside_the_shard():
    ds = PackedDocumentDataset(["a", "b"], CharTokenizer(), seq_len=4)
    with pytest.raises(ValueError, match="document 5"):
        ds.load_state_dict({"next_document": 5, "epoch": 0, "buffer": []})
