"""Packed documents (the model's ``doc_ids``, docs/long_context.md): nothing flows across a document
boundary, and a document placed on the compressors' grid gets the logits it gets alone.

The model is the tiny configuration with every attention kind, a hash layer, the indexer and two MTP
depths, in fp64 (fp32 where said). The balance losses are switched off for the gradient test: the
sequence-wise balance loss counts experts over the whole packed sequence, as the released recipe does
(titan_v4/model/moe.py), so its gradient is the one deliberate exception.
"""

import pytest
import torch

from tests.helpers.tiny_model import tiny_args
from titan_v4.config import DENSE, FROZEN, SPARSE
from titan_v4.model.aux_loss import set_aux_loss_scale
from titan_v4.model.loss import IGNORE_INDEX, V4Loss, mtp_targets
from titan_v4.model.model import DeepSeekV4Model
from titan_v4.model.rope import compress_rope_table, main_rope_table

MTP_DEPTH = 2


def make_model(dtype: torch.dtype, indexer_phase: str = FROZEN, max_seq_len: int = 384, seed: int = 0) -> DeepSeekV4Model:
    torch.manual_seed(seed)
    # 16 indexer heads: a score of exactly 0 (every head's relu at 0) is then too rare to leave a tie at
    # the top-k boundary, where the pick is arbitrary (custom_ops/indexer/contract.py).
    args = tiny_args(
        mtp_depth=MTP_DEPTH, max_seq_len=max_seq_len, indexer_phase=indexer_phase, index_topk=4, index_n_heads=16
    )
    model = DeepSeekV4Model(args)
    model.init_weights()
    with torch.no_grad():  # non-zero attention sinks (initialised to 0)
        for name, p in model.named_parameters():
            if "attn_sink" in name:
                p.normal_(0.0, 0.3)
    model = model.to(dtype)
    # Rotary tables computed in fp64, then cast: a shifted document then sees the same rotations up to
    # the model dtype's rounding (tables computed in fp32 are off by ~1e-7 whatever the model's dtype).
    model.rope_main = main_rope_table(args, dtype=torch.float64).to(dtype)
    model.rope_compress = compress_rope_table(args, dtype=torch.float64).to(dtype)
    return model


def doc_ids_of(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), d, dtype=torch.int32) for d, n in enumerate(lengths)])[None]


def document_labels(tokens: torch.Tensor, doc_ids: torch.Tensor, doc: int) -> torch.Tensor:
    """Next-token labels [1, S] of document ``doc`` only: positions of other documents, and the last
    position of ``doc`` (its next token is in the next document), are ignored; the final position has
    no next token in the window."""
    labels = torch.roll(tokens, -1, dims=1)
    same_next = torch.roll(doc_ids, -1, dims=1) == doc_ids
    keep = (doc_ids == doc) & same_next
    keep[:, -1] = False
    return labels.masked_fill(~keep, IGNORE_INDEX)


def embedding_grads(model, tokens, doc_ids, labels):
    """d(loss)/d(every embedding lookup): the main one [S, D] and the MTP one [S, depth, D], whose slot
    (i, k) is token i + k + 1 (mod S)."""
    outputs = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        outputs.append(output)

    handle = model.tok_embeddings.register_forward_hook(keep)
    try:
        pred = model(tokens, doc_ids=doc_ids)
    finally:
        handle.remove()
    V4Loss(mtp_loss_weight=0.3)(pred, labels).backward()
    main, mtp = outputs
    return main.grad[0], mtp.grad[0]


@pytest.mark.parametrize("phase", [FROZEN, DENSE, SPARSE])
def test_a_documents_loss_has_zero_gradient_on_other_documents(phase):
    """Exactly zero, for every document of the packed row, through every layer kind, the indexer's
    top-k and MTP; without doc_ids the same loss does reach earlier documents (the check can fail)."""
    model = make_model(torch.float64, phase, max_seq_len=96)
    set_aux_loss_scale([model], 0.0)  # the balance losses aside (module docstring)
    lengths = [37, 33, 26]  # boundaries off the compressors' grid (ratios 4 and 8)
    doc_ids = doc_ids_of(lengths)
    seq_len = doc_ids.shape[1]
    tokens = torch.randint(0, model.model_args.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))
    position_doc = doc_ids[0]
    slot_doc = torch.stack([torch.roll(position_doc, -(k + 1)) for k in range(MTP_DEPTH)], dim=1)  # [S, depth]
    for doc in range(len(lengths)):
        labels = document_labels(tokens, doc_ids, doc)
        model.zero_grad()
        main, mtp = embedding_grads(model, tokens, doc_ids, labels)
        other = position_doc != doc
        assert torch.count_nonzero(main[other]) == 0, f"document {doc}'s loss reached another document"
        assert torch.count_nonzero(mtp[slot_doc != doc]) == 0, f"document {doc}'s MTP loss reached another document"
        assert torch.count_nonzero(main[~other]) > 0  # its own document does get a gradient

    labels = document_labels(tokens, doc_ids, 2)
    main, _ = embedding_grads(model, tokens, None, labels)
    assert torch.count_nonzero(main[position_doc != 2]) > 0


@pytest.mark.parametrize(
    "dtype,rel", [pytest.param(torch.float64, 1e-10, id="fp64"), pytest.param(torch.float32, 1e-5, id="fp32")]
)
@pytest.mark.parametrize("phase", [FROZEN, SPARSE])
def test_a_document_on_the_grid_gets_the_logits_it_gets_alone(dtype, rel, phase):
    """A document starting at position 128 (a multiple of every compression ratio) between two others:
    its next-token logits, and its MTP logits wherever their input tokens are its own, equal those of the
    document run alone, within ``rel`` of the largest logit (max abs difference)."""
    model = make_model(dtype, phase)
    lengths = [128, 172, 84]
    doc_ids = doc_ids_of(lengths)
    tokens = torch.randint(0, model.model_args.vocab_size, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
    start, length = lengths[0], lengths[1]
    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids)
        alone = model(tokens[:, start : start + length].contiguous())
    for depth, (p, a) in enumerate(zip(packed, alone)):
        valid = length - depth  # MTP depth k's input at i is token i + k: inside the document below that
        got, want = p[0, start : start + valid], a[0, :valid]
        error = (got - want).abs().max() / want.abs().max()
        assert error <= rel, f"head {depth}: {error:.2e} relative"


def test_mtp_targets_stop_at_document_boundaries():
    """Depth k at position i predicts labels[i + k] only when labels[i .. i + k] are all kept."""
    labels = torch.tensor([[10, 11, IGNORE_INDEX, 13, 14, 15, IGNORE_INDEX, 17]])
    assert mtp_targets(labels, 1).tolist() == [[11, IGNORE_INDEX, IGNORE_INDEX, 14, 15, IGNORE_INDEX, IGNORE_INDEX]]
    assert mtp_targets(labels, 2).tolist() == [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 15, IGNORE_INDEX, IGNORE_INDEX]]
    plain = torch.arange(8)[None]
    assert torch.equal(mtp_targets(plain, 3), plain[:, 3:])
