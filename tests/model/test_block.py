"""titan_v4.model.block (and the MTP block): every block kind under torch.compile(fullgraph=True)
equals eager, forward and backward, on the CPU. fullgraph=True raises on any graph break, so passing
also proves zero graph breaks."""

import pytest
import torch

from tests.helpers.tolerances import assert_close
from titan_v4.model.args import DeepSeekV4ModelArgs
from titan_v4.model.attn_kinds import CSA, HCA, SWA
from titan_v4.model.block import TransformerBlock
from titan_v4.model.mtp import MTPBlock
from titan_v4.model.rope import rope_table

ARGS = DeepSeekV4ModelArgs(
    vocab_size=64, dim=32, n_layers=3, n_heads=4, head_dim=16, rope_head_dim=8, q_lora_rank=24, o_groups=2,
    o_lora_rank=8, window_size=6, attn_types=(SWA, CSA, HCA), csa_ratio=4, hca_ratio=8, index_n_heads=2,
    index_head_dim=12, index_topk=3, original_seq_len=16, n_routed_experts=6, n_activated_experts=2,
    moe_inter_dim=16, n_hash_layers=1, max_seq_len=32, swiglu_limit=0.5,
    seq_balance_loss_weight=0.1,
)  # fmt: skip
SEQ = 22


def make_block(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "mtp":
        block = MTPBlock(3, ARGS)
    else:
        # csa-sparse / csa-dense: a CSA block that trains its indexer (the KL attached in the block).
        kind, _, phase = kind.partition("-") if kind.startswith("csa-") else (kind, "", "frozen")
        args = ARGS.replace(indexer_phase=phase)
        layer = {"swa-hash": 0, "csa": 1, "hca": 2}[kind]
        block = TransformerBlock(layer, args, args.attn_types[layer], args.is_hash_layer(layer))
    with torch.no_grad():  # init, then non-trivial mHC / sink / bias values
        block.init_weights()
        for name, p in block.named_parameters():
            if name.endswith(("base", "scale", "attn_sink", "ape")):
                p.copy_(torch.randn_like(p))
    return block.train()


def run(fn, block, inputs):
    """fn(*inputs) forward + backward of a fixed non-uniform loss; grads of block's parameters."""
    for p in block.parameters():
        p.grad = None
    out = fn(*inputs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["swa-hash", "csa", "csa-sparse", "csa-dense", "hca", "mtp"])
def test_block_compiles_fullgraph_and_matches_eager(kind):
    block = make_block(kind)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, SEQ, ARGS.hc_mult, ARGS.dim, generator=g)
    rope = rope_table(ARGS, ARGS.rope_theta if kind in ("swa-hash", "mtp") else ARGS.compress_rope_theta, yarn=kind not in ("swa-hash", "mtp"))
    cos, sin = rope[:, :SEQ]
    if kind == "mtp":
        inputs = (x, torch.randn(2, SEQ, ARGS.dim, generator=g), cos, sin)
    else:
        inputs = (x, cos, sin, torch.randint(0, ARGS.vocab_size, (2, SEQ), generator=g))
    torch._dynamo.reset()
    eager_out, eager_grads = run(block, block, inputs)
    out, grads = run(torch.compile(block, fullgraph=True), block, inputs)
    assert out.dtype == eager_out.dtype == torch.float32
    assert_close(out, eager_out, torch.float32, "model_out", "block output")
    assert grads.keys() == eager_grads.keys() and len(grads) > 0
    for name in grads:
        assert_close(grads[name], eager_grads[name], torch.float32, "model_grad", name)
