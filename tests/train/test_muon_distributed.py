"""Muon on sharded DTensors (titan_v4/train/muon.py) takes the steps Muon takes on whole tensors.

4 gloo processes. Parameters are fp64, so Muon's matmuls are fp64 and the sharded run must equal
the whole one to rounding. Layouts: a [replicate 2, shard 2] mesh (HSDP; its shard dimension alone is
FSDP) and a 1-D mesh of 4 (FSDP 4, where a 3-row matrix leaves one rank an empty piece); rows cut
(FSDP's Shard(0)), unevenly too, columns cut, tall matrices, stacked experts cut on their rows, experts
whole on each rank (expert parallelism's Shard(0)), and row blocks that straddle the shard boundary.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import titan_v4.train.muon as muon_module
from titan_v4.train.muon import Muon

WORLD = 4
STEPS = 3
# name: (shape, mesh, placement on the mesh's last dimension, row_blocks)
CASES = {
    "rows cut": ((8, 12), "hsdp", Shard(0), None),
    "rows cut unevenly": ((5, 12), "hsdp", Shard(0), None),
    "columns cut": ((12, 7), "hsdp", Shard(1), None),
    "tall, rows cut": ((20, 6), "hsdp", Shard(0), None),
    "experts cut on their rows": ((3, 10, 6), "hsdp", Shard(1), None),
    "experts whole per rank": ((4, 6, 10), "hsdp", Shard(0), None),
    "row blocks across the cut": ((12, 8), "hsdp", Shard(0), (2, 2, 8)),
    "fewer rows than ranks": ((3, 8), "fsdp4", Shard(0), None),
    "rows cut over 4": ((10, 16), "fsdp4", Shard(0), None),
}
# Same-shape matrices, to see the work spread over the shard group.
SAME_SHAPE = 8


def tensors(name: str, shape) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(shape, generator=g, dtype=torch.float64), [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(STEPS)]


def check_rank(rank: int, store_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        meshes = {
            "hsdp": init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard")),
            "fsdp4": init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp_shard",)),
        }
        for name, (shape, mesh_name, placement, row_blocks) in CASES.items():
            mesh = meshes[mesh_name]
            placements = [Replicate(), placement] if mesh.ndim == 2 else [placement]
            W0, grads = tensors(name, shape)
            whole = torch.nn.Parameter(W0.clone())
            sharded = torch.nn.Parameter(distribute_tensor(W0.clone(), mesh, placements))
            reference = Muon([{"params": [whole], "row_blocks": row_blocks}], lr=0.05)
            optimizer = Muon([{"params": [sharded], "row_blocks": row_blocks}], lr=0.05)
            for G in grads:
                whole.grad = G.clone()
                sharded.grad = distribute_tensor(G.clone(), mesh, placements)
                reference.step()
                optimizer.step()
            torch.testing.assert_close(sharded.full_tensor(), whole.detach(), rtol=0, atol=1e-12, msg=name)
            assert not torch.allclose(whole.detach(), W0, atol=1e-3), name
            buffer = optimizer.state[sharded]["momentum_buffer"]
            assert isinstance(buffer, DTensor) and buffer.placements == sharded.placements, name
            torch.testing.assert_close(buffer.full_tensor(), reference.state[whole]["momentum_buffer"], rtol=0, atol=1e-12)

        # SAME_SHAPE matrices cut over 4 ranks: each rank orthogonalises SAME_SHAPE / 4 of them.
        mesh = meshes["fsdp4"]
        params = [torch.nn.Parameter(distribute_tensor(tensors(f"m{i}", (8, 8))[0], mesh, [Shard(0)])) for i in range(SAME_SHAPE)]
        counted = []
        original = muon_module.newton_schulz

        def counting(M, *args, **kwargs):
            counted.append(M.reshape(-1, *M.shape[-2:]).shape[0])
            return original(M, *args, **kwargs)

        muon_module.newton_schulz = counting
        try:
            optimizer = Muon(params, lr=0.05)
            for p in params:
                p.grad = distribute_tensor(torch.ones(8, 8, dtype=torch.float64), mesh, [Shard(0)])
            optimizer.step()
        finally:
            muon_module.newton_schulz = original
        assert sum(counted) == SAME_SHAPE // WORLD, counted

        # Two mesh dimensions cutting the matrices: refused, naming the placements.
        both = torch.nn.Parameter(distribute_tensor(torch.zeros(8, 8, dtype=torch.float64), meshes["hsdp"], [Shard(0), Shard(1)]))
        both.grad = torch.zeros_like(both)
        with pytest.raises(ValueError, match=r"cut by more than one mesh dimension or by a strided shard"):
            Muon([both], lr=0.05).step()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_muon_equals_whole_muon(tmp_path):
    mp.spawn(check_rank, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
