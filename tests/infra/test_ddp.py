"""DDP (parallelism.data_parallel_replicate_degree > 1) gradients equal the single-process / FSDP
ones. torchtitan 0.2.2 backpropagates SUM loss / global token count, so replica gradients must be
summed; plain DDP averages them, which halved the gradient norm on 2 replicas (0.6939 vs 1.3878)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import titan_v4  # noqa: F401  (CPU shim before torchtitan)
from titan_v4.infra.parallelize import apply_v4_ddp

WORLD = 2


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _loss(model, x, y, global_count):
    return ((model(x) - y) ** 2).sum() / global_count  # torchtitan: local SUM / global count


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp_replicate",))
        model = _model()
        apply_v4_ddp(model, mesh, enable_compile=False)
        x, y = _data()
        shard = slice(rank * 4, rank * 4 + 4)
        _loss(model, x[shard], y[shard], x.shape[0]).backward()
        if rank == 0:
            torch.save([p.grad for p in model.parameters()], out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_gradients_equal_the_full_batch_gradients(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    ddp_grads = torch.load(out)

    model = _model()
    x, y = _data()
    _loss(model, x, y, x.shape[0]).backward()
    for got, want in zip(ddp_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
