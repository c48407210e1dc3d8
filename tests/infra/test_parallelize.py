"""titan_v4.infra.parallelize on one device: with every activation-checkpointing mode, each block
kind compiles to one graph with fullgraph=True (a graph break would raise), no block recompiles on
the second step, and the compiled model equals the eager one. Without checkpointing the same holds
with Inductor in tests/tools/test_dump_graphs.py; multi-process FSDP2 / EP runs are in
tests/integration/test_compile_parallel.py.

The blocks are compiled through the dump tool's recorder (titan_v4.tools.graph_recorder) wrapping
aot_eager: the graph structure is Inductor's input without Inductor's compile time."""

import copy

import pytest
import torch
from torchtitan.distributed import ParallelDims

from tests.helpers.job_config import job_config
from tests.helpers.tiny_model import randomize_, tiny_args
from tests.helpers.tolerances import assert_close
from titan_v4.infra.parallelize import parallelize_deepseek_v4
from titan_v4.model.model import DeepSeekV4Model
from titan_v4.tools.graph_recorder import GraphRecorder, activate

SEQ = 24
ARGS = tiny_args(n_routed_experts=4, max_seq_len=SEQ)
KINDS = {"swa-hash": 1, "csa-learned": 2, "hca-learned": 1, "mtp": 1}  # kind -> blocks (tiny_args)


def loss(model, tokens):
    logits, mtp_logits = model(tokens)
    return sum((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() for out in (logits, *mtp_logits))


@pytest.mark.slow
@pytest.mark.parametrize(
    "ac_args",
    [
        pytest.param(["--activation_checkpoint.mode", "full"], id="full"),
        pytest.param(["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"], id="selective-op"),
        pytest.param(["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "2"], id="selective-layer"),
        pytest.param(["--activation_checkpoint.mode", "memory_budget", "--activation_checkpoint.memory_budget", "0.5"], id="memory-budget"),
    ],
)  # fmt: skip
def test_every_block_kind_compiles_whole_without_recompiles(ac_args):
    # parallelize sets these process-wide; the patches restore them for the other tests.
    with torch._functorch.config.patch(activation_memory_budget=1.0), torch._dynamo.config.patch(capture_scalar_outputs=False):
        check_compiled_model(ac_args)


def check_compiled_model(ac_args):
    torch.manual_seed(0)
    eager = DeepSeekV4Model(ARGS)
    eager.init_weights()
    randomize_(eager)
    model = copy.deepcopy(eager)
    recorder = GraphRecorder("aot_eager")
    job = job_config("--compile.enable", "--compile.backend", activate(recorder), *ac_args)
    parallelize_deepseek_v4(model, ParallelDims(1, 1, 1, 1, 1, 1, 1, world_size=1), job)
    recorder.track_blocks([model])
    assert {kind: len(blocks) for kind, blocks in recorder.blocks.items()} == KINDS

    tokens = torch.randint(0, ARGS.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    for step in (1, 2):
        recorder.step = step
        model.zero_grad()
        eager.zero_grad()
        loss(model, tokens).backward()
        loss(eager, tokens).backward()

    assert not any(recorder.graph_breaks.values())
    graphs = [(g.kind, g.step) for g in recorder.graphs]
    assert {kind for kind, _ in graphs} == set(KINDS)  # every kind compiled, nothing outside blocks
    assert all(step == 1 for _, step in graphs), f"recompiled after step 1: {graphs}"
    assert all(g.forward is not None and g.backward is not None for g in recorder.graphs)
    compiled_grads = dict(model.named_parameters())
    for name, p in eager.named_parameters():
        if p.grad is not None:
            name = name.replace("_checkpoint_wrapped_module.", "")
            got = next(q for n, q in compiled_grads.items() if n.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "") == name)
            assert_close(got.grad, p.grad, torch.float32, "model_grad", name)
