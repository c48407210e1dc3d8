"""Memory that scales with the sequence (docs/long_context.md, "Memory"): in the phases a long stage runs
(frozen, sparse) no tensor of S x P elements (queries x compressed entries) is ever allocated by a CSA
layer, forward or backward; the dense phases do allocate one (the KL over every visible entry), which is
why they belong to the short stages.

Measured with the profiler's per-op CPU allocations, which see inside the custom ops' reference
implementations. The references cap each query chunk's temporary at a fixed element count; that cap is
lowered here so that a CPU-sized sequence already exceeds it by far.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from custom_ops.indexer import reference as indexer_reference
from custom_ops.sparse_attention import reference as attention_reference
from tests.helpers.tiny_model import randomize_, tiny_args
from titan_v4.config import DENSE, FROZEN, SPARSE
from titan_v4.model.attention import Attention
from titan_v4.model.attn_kinds import CSA
from titan_v4.model.rope import rope_table

SEQ_LEN = 8192
CHUNK_CAP = 2**20  # elements per chunk temporary (the references' own cap is 2**26)


def largest_allocation(phase: str, monkeypatch) -> tuple[int, int]:
    """(largest single CPU allocation in bytes during a CSA layer's forward + backward, S x P)."""
    monkeypatch.setattr(indexer_reference, "_CHUNK_ELEMENTS", CHUNK_CAP)
    monkeypatch.setattr(attention_reference, "_CHUNK_ELEMENTS", CHUNK_CAP)
    args = tiny_args(max_seq_len=SEQ_LEN, indexer_phase=phase, index_topk=16)
    attn = Attention(args, CSA)
    randomize_(attn)
    attn.indexer_loss.reset(torch.device("cpu"))
    cos, sin = rope_table(args, args.compress_rope_theta, yarn=True)
    x = torch.randn(1, SEQ_LEN, args.dim, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        attn(x, cos, sin).sum().backward()
    largest = max(event.cpu_memory_usage for event in prof.events())
    return largest, SEQ_LEN * (SEQ_LEN // args.csa_ratio)


@pytest.mark.parametrize("phase", [FROZEN, SPARSE])
def test_long_stage_phases_never_hold_queries_by_entries(phase, monkeypatch):
    largest, s_by_p = largest_allocation(phase, monkeypatch)
    # fp32 is 4 bytes: the largest allocation holds well under S x P elements (the chunk cap, or an
    # O(S) tensor such as the queries).
    assert largest // 4 < s_by_p // 8, (largest, s_by_p)


def test_the_dense_phase_does_hold_queries_by_entries(monkeypatch):
    largest, s_by_p = largest_allocation(DENSE, monkeypatch)
    assert largest // 4 >= s_by_p, (largest, s_by_p)
