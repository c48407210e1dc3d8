"""titan_v4.infra.expert_parallel: with two gloo processes, the routed experts under expert
parallelism (TokenDispatcher inside the experts' forward) equal the same experts computed whole on
one rank, forward and backward, eagerly and under torch.compile(fullgraph=True), and the compiled
dispatch takes new token counts without recompiling."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import parallelize_module

from tests.helpers.graph_capture import GraphCapture, count_calls
from tests.helpers.tolerances import assert_close
from titan_v4.infra.expert_parallel import ExpertParallel
from titan_v4.model.moe import ClampedGroupedExperts

WORLD = 2
EXPERTS, DIM, HIDDEN = 4, 8, 12
ROWS = (9, 5)  # rows on rank 0 and rank 1 (uneven on purpose)


def make_experts() -> ClampedGroupedExperts:
    torch.manual_seed(0)
    experts = ClampedGroupedExperts(DIM, HIDDEN, EXPERTS, swiglu_limit=0.7)
    with torch.no_grad():
        for w in (experts.w1, experts.w2, experts.w3):
            w.normal_()
    return experts


def routed_rows(rank: int, call: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by expert and the count per expert; different counts for every rank and call
    (call 1 leaves expert 3 without rows)."""
    g = torch.Generator().manual_seed(100 * call + rank)
    experts = torch.randint(0, EXPERTS - call, (ROWS[rank],), generator=g).sort().values
    counts = torch.bincount(experts, minlength=EXPERTS)
    return torch.randn(ROWS[rank], DIM, generator=g), counts


def reference(rank: int, call: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """All ranks' rows through the whole experts on one rank: (this rank's output, this rank's input
    gradient, full weight gradients) for the loss sum over ranks of sum(out * weight)."""
    experts = make_experts()
    outs, xs = [], []
    for r in range(WORLD):
        x, counts = routed_rows(r, call)
        x.requires_grad_(True)
        out = experts(x, counts)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        xs.append(x.grad)
    return outs[rank], xs[rank], [w.grad for w in (experts.w1, experts.w2, experts.w3)]


def check_rank(rank: int, store_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
        experts = parallelize_module(make_experts(), mesh, ExpertParallel())
        local = EXPERTS // WORLD
        torch._dynamo.config.capture_scalar_outputs = True  # as parallelize.py sets it
        capture = GraphCapture()
        compiled = torch.compile(experts, backend=capture, fullgraph=True)
        for call, fn in enumerate((experts, compiled, compiled)):
            for w in (experts.w1, experts.w2, experts.w3):
                w.grad = None
            x, counts = routed_rows(rank, call)
            x.requires_grad_(True)
            out = fn(x, counts)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            ref_out, ref_dx, ref_dw = reference(rank, call)
            assert_close(out, ref_out, torch.float32, "out", f"call {call} out")
            assert_close(x.grad, ref_dx, torch.float32, "grad", f"call {call} dx")
            for w, ref in zip((experts.w1, experts.w2, experts.w3), ref_dw):
                mine = ref[rank * local : (rank + 1) * local]
                assert_close(w.grad.to_local(), mine, torch.float32, "grad", f"call {call} dw")
        # One graph for both compiled calls (new counts, new split sizes: no recompile), and the
        # token all-to-alls inside it: counts + rows + reverse rows forward, two reverses backward.
        assert len(capture.dynamo_graphs) == 1
        all_to_all = torch.ops._c10d_functional.all_to_all_single.default
        assert count_calls(capture.fw_graphs, all_to_all) == 3
        assert count_calls(capture.bw_graphs, all_to_all) == 2
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_expert_parallel_matches_whole_experts_eager_and_compiled(tmp_path):
    mp.spawn(check_rank, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
