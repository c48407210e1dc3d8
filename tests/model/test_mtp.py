"""titan_v4.model.mtp: MTP logits' shapes, targets and causality inside the whole model."""

import torch

from tests.helpers.tiny_model import randomize_, tiny_args
from titan_v4.model.model import DeepSeekV4Model


def test_mtp_shapes_targets_and_causality():
    a = tiny_args()
    torch.manual_seed(0)
    model = DeepSeekV4Model(a).double()
    model.init_weights()
    randomize_(model.mtp, seed=15)
    tokens = torch.randint(0, a.vocab_size, (2, 24))
    logits, mtp = model(tokens)
    assert logits.shape == mtp.shape == (2, 24, a.vocab_size) and mtp.dtype == torch.float64
    # Depth-1 position i sees tokens <= i+1 (it embeds token i+1), never i+2 or later.
    p = 12
    changed = tokens.clone()
    changed[:, p] = (changed[:, p] + 1) % a.vocab_size
    logits2, mtp2 = model(changed)
    assert torch.equal(logits2[:, :p], logits[:, :p]) and not torch.equal(logits2[:, p], logits[:, p])
    assert torch.equal(mtp2[:, : p - 1], mtp[:, : p - 1]) and not torch.equal(mtp2[:, p - 1], mtp[:, p - 1])
