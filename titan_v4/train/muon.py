"""Muon, DeepSeek-V4's optimizer for matrix parameters (docs/deepseek_v4.md, "Muon").

For each matrix parameter W with gradient G (source: DeepSeek-V4 paper, pre-training section):

    M_t = mu * M_{t-1} + G_t                       momentum buffer, fp32 ("momentum_buffer")
    U   = mu * M_t + G_t   (Nesterov)  or  M_t     what is orthogonalised
    O   = newton_schulz(U)                         ~ the orthogonal factor of U (U = P S Q^T -> P Q^T)
    W  *= 1 - lr * weight_decay                    decoupled weight decay
    W  -= lr * update_rms * sqrt(max(n, m)) * O    an update of RMS ~update_rms, so AdamW's lr and
                                                   schedule carry over

Every matrix is orthogonalised on its own: a parameter ``[..., n, m]`` is prod(...) matrices (a
stacked expert weight ``[E, out, in]`` is E of them), and a parameter group may cut each matrix's
rows into blocks (``row_blocks``) where one weight holds several logical matrices (the grouped
output projection, the mHC mixing projection: titan_v4/train/optimizer.py says which). Matrices
of one shape are orthogonalised in one batched call.

:class:`MuonWithAdamW` adds AdamW param groups (``"algorithm": "adamw"``) for the parameters Muon
does not take, so that one ``torch.optim.Optimizer`` covers a whole model part, as torchtitan's
checkpointing expects.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.optim.adam import adam

#: The Newton-Schulz steps' (a, b, c): the fast-converging one, and the one that settles the
#: singular values at 1.
FAST_NS_STEP = (3.4445, -4.7750, 2.0315)
CLEANUP_NS_STEP = (2.0, -1.5, 0.5)


def hybrid_ns_coefficients(fast_steps: int, cleanup_steps: int) -> tuple[tuple[float, float, float], ...]:
    """The hybrid schedule: ``fast_steps`` fast steps, then ``cleanup_steps`` settling ones."""
    return (FAST_NS_STEP,) * fast_steps + (CLEANUP_NS_STEP,) * cleanup_steps


#: The paper's schedule: 8 fast steps, then 2 settling ones.
DEFAULT_NS_COEFFICIENTS = hybrid_ns_coefficients(8, 2)


def newton_schulz_flops(shape: torch.Size, row_blocks: tuple[int, ...] | None, steps: int) -> int:
    """FLOPs of orthogonalising a parameter of ``shape`` ([..., n, m]) with ``steps`` steps."""
    batch = math.prod(shape[:-2])
    flops = 0
    for rows in row_blocks or (shape[-2],):
        n, m = sorted((rows, shape[-1]))
        flops += steps * (4 * n * n * m + 2 * n**3)
    return batch * flops


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of Newton-Schulz's matmuls and result for an input like t."""
    return torch.float64 if t.dtype == torch.float64 else torch.bfloat16


def newton_schulz(
    M: torch.Tensor, steps: Sequence[tuple[float, float, float]], eps: float = 1e-7, scale: float = 1.0
) -> torch.Tensor:
    """``scale`` times the approximate orthogonalisation of every matrix of ``M`` (``[..., n, m]``,
    leading dims batch).

    X0 = M / (||M||_F + eps) (per matrix, the norm in fp32), then for each (a, b, c) of ``steps``:
    A = X X^T, B = b A + c A A, X = a X + B X; the last step also multiplies by ``scale``. A tall
    matrix (n > m) is transposed first so that A is the small side's Gram matrix. The matmuls run in
    bf16 with fp32 accumulation (the scaled sums are fused into them), or in fp64 when M is fp64
    (exact comparisons against a reference). Returns ``[..., n, m]`` in bf16 (fp64 for an fp64 M):
    with the default schedule its singular values are close to ``scale`` (tests/train/test_muon.py
    measures them).
    """
    compute = _compute_dtype(M)
    shape = M.shape
    X = M.reshape(-1, *shape[-2:])
    if X.dtype not in (torch.float32, torch.float64):
        X = X.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    norm = torch.linalg.matrix_norm(X, keepdim=True).add_(eps)
    X = torch.div(X, norm, out=torch.empty(X.shape, dtype=compute, device=X.device))
    for i, (a, b, c) in enumerate(steps):
        s = scale if i == len(steps) - 1 else 1.0
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a * s, alpha=s)
    if tall:
        X = X.mT
    return X.reshape(shape)


#: The most matrix elements one Newton-Schulz call takes (per rank): bounds the step's temporaries
#: to a few GiB (fp32 inputs, bf16 iterates and Gram matrices, fp32 updates).
MAX_BATCH_ELEMENTS = 2**27


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (aliasing it: in-place updates land in the DTensor), or t."""
    return t.to_local() if isinstance(t, DTensor) else t


class WholeMatrixPlan(NamedTuple):
    """How a parameter's matrices are assembled for orthogonalisation.

    ``gathered`` False: this rank holds whole matrices (a plain tensor, or a DTensor sharded only on
    its batch dims, e.g. expert parallelism's Shard(0) of ``[E, out, in]``): ``shape`` is the local
    shape. ``gathered`` True: one mesh dimension shards a matrix dim (FSDP2's Shard(0) of a 2-D
    weight): ``shape`` is this rank's part with ``dim`` whole; the pieces of each matrix are
    gathered to one rank of that mesh dimension's ``group`` (``size`` ranks, this one ``rank``),
    which orthogonalises it and scatters the update back."""

    shape: tuple[int, ...]
    gathered: bool = False
    group: object = None
    dim: int = 0
    size: int = 1
    rank: int = 0

    @property
    def key(self):
        return (self.gathered, self.group, self.dim)

    @property
    def piece_rows(self) -> int:
        """The padded size of a piece along ``dim``, ceil(n / size): collectives move pieces of one size."""
        return -(-self.shape[self.dim] // self.size)


def whole_matrix_plan(p: torch.Tensor) -> WholeMatrixPlan:
    """How Muon assembles the whole matrices of parameter ``p`` (a tensor or a DTensor) on this
    rank; a DTensor whose matrices are cut in a way it cannot reassemble (two mesh dimensions, a
    strided shard, a partial value) is an error naming its placements."""
    if not isinstance(p, DTensor):
        return WholeMatrixPlan(tuple(p.shape))
    local_shape = tuple(p.to_local().shape)
    matrix_dims = (p.dim() - 2, p.dim() - 1)
    if any(placement.is_partial() for placement in p.placements):
        raise ValueError(f"Muon: a parameter of placements {p.placements} has a partial value; Muon needs its full value")
    cutting = [(i, pl.dim) for i, pl in enumerate(p.placements) if pl.is_shard() and pl.dim in matrix_dims]
    if not cutting:
        return WholeMatrixPlan(local_shape)
    if len(cutting) > 1 or type(p.placements[cutting[0][0]]) is not Shard:
        raise ValueError(
            f"Muon: a parameter of shape {tuple(p.shape)} is sharded over {p.device_mesh} with placements "
            f"{p.placements}: its matrices are cut by more than one mesh dimension or by a strided shard, which "
            "Muon does not reassemble; allowed: one mesh dimension with Shard on a matrix dim (FSDP / HSDP), "
            "shards of whole matrices (EP)"
        )  # fmt: skip
    mesh_dim, dim = cutting[0]
    group = p.device_mesh.get_group(mesh_dim)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if local_shape[dim] != _piece_size(p.shape[dim], size, rank):
        raise ValueError(f"Muon: unexpected shard of {local_shape} for a parameter {tuple(p.shape)} with {p.placements}")
    full = tuple(p.shape[dim] if d == dim else n for d, n in enumerate(local_shape))
    return WholeMatrixPlan(full, True, group, dim, size, rank)


def _piece_size(n: int, size: int, rank: int) -> int:
    """Rows of rank ``rank`` when ``n`` are sharded over ``size`` ranks (torch.chunk, as Shard does)."""
    chunk = -(-n // size)
    return max(0, min(chunk, n - rank * chunk))


def _piece_buffer(piece: torch.Tensor, plan: WholeMatrixPlan, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor shaped like ``piece`` with ``plan.dim`` at ``plan.piece_rows``."""
    return piece.new_empty([*piece.shape[: plan.dim], plan.piece_rows, *piece.shape[plan.dim + 1 :]], dtype=dtype)


def _padded(piece: torch.Tensor, dim: int, rows: int) -> torch.Tensor:
    """piece with dim zero-padded to ``rows``."""
    missing = rows - piece.shape[dim]
    if missing == 0:
        return piece.contiguous()
    return torch.cat([piece, piece.new_zeros([*piece.shape[:dim], missing, *piece.shape[dim + 1 :]])], dim=dim)


def gather_to_owners(pieces: list[torch.Tensor], owners: list[int], plan: WholeMatrixPlan) -> dict[int, torch.Tensor]:
    """Each rank's piece of matrix i -> the whole matrix i on rank owners[i] (group ranks).
    Returns {i: whole} for the matrices this rank owns."""
    n = plan.shape[plan.dim]
    received: dict[int, list[torch.Tensor]] = {}
    works = []
    for i, (piece, owner) in enumerate(zip(pieces, owners)):
        buffers = None
        if owner == plan.rank:
            buffers = received[i] = [_piece_buffer(piece, plan) for _ in range(plan.size)]
        works.append(dist.gather(_padded(piece, plan.dim, plan.piece_rows), buffers, group=plan.group, group_dst=owner, async_op=True))
    for work in works:
        work.wait()
    return {
        i: torch.cat([b.narrow(plan.dim, 0, _piece_size(n, plan.size, r)) for r, b in enumerate(buffers)], dim=plan.dim)
        for i, buffers in received.items()
    }


def scatter_from_owners(
    wholes: dict[int, torch.Tensor], owners: list[int], plan: WholeMatrixPlan, pieces: list[torch.Tensor], dtype: torch.dtype
) -> list[torch.Tensor]:
    """The inverse of gather_to_owners: the owner of matrix i sends each rank its piece of
    ``wholes[i]`` (of ``dtype``); returns this rank's pieces (shaped as ``pieces``)."""
    outputs, works = [], []
    for i, (piece, owner) in enumerate(zip(pieces, owners)):
        out = _piece_buffer(piece, plan, dtype)
        chunks = None
        if owner == plan.rank:
            chunks = [_padded(c, plan.dim, plan.piece_rows) for c in wholes[i].split(plan.piece_rows, dim=plan.dim)]
            chunks += [out.new_zeros(out.shape) for _ in range(plan.size - len(chunks))]
        works.append(dist.scatter(out, chunks, group=plan.group, group_src=owner, async_op=True))
        outputs.append(out.narrow(plan.dim, 0, piece.shape[plan.dim]))
    for work in works:
        work.wait()
    return outputs


def _check(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"Muon {name}={value!r} is invalid: allowed values are {allowed}")


def _check_muon_settings(settings: dict) -> None:
    lr, wd, mu = settings["lr"], settings["weight_decay"], settings["momentum"]
    _check("lr", lr, isinstance(lr, (int, float)) and lr >= 0, "numbers >= 0")
    _check("weight_decay", wd, isinstance(wd, (int, float)) and wd >= 0, "numbers >= 0")
    _check("momentum", mu, isinstance(mu, (int, float)) and 0 <= mu < 1, "numbers in [0, 1)")
    rms = settings["update_rms"]
    _check("update_rms", rms, isinstance(rms, (int, float)) and rms > 0, "numbers > 0")
    steps = settings["ns_coefficients"]
    _check("ns_coefficients", steps, len(steps) >= 1 and all(len(s) == 3 for s in steps),
           "a non-empty sequence of (a, b, c) Newton-Schulz steps")  # fmt: skip
    eps = settings["eps"]
    _check("eps", eps, isinstance(eps, (int, float)) and eps > 0, "numbers > 0")


class Muon(torch.optim.Optimizer):
    """Muon over parameters of dim >= 2 (module docstring). Per-group options: lr, weight_decay,
    momentum, nesterov, ns_coefficients (a tuple of (a, b, c) steps), update_rms, eps, and
    row_blocks (None: each ``[n, m]`` matrix is one; a tuple of row counts summing to n: the rows
    are cut into independent matrices). State per parameter: ``momentum_buffer`` (fp32; fp64 for an
    fp64 parameter). Parameters keep their dtype."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Sequence[tuple[float, float, float]] = DEFAULT_NS_COEFFICIENTS,
        update_rms: float = 0.18,
        eps: float = 1e-7,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(tuple(s) for s in ns_coefficients), update_rms=update_rms,
                        eps=eps, row_blocks=None)  # fmt: skip
        _check_muon_settings(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group.get("algorithm", "muon") == "muon":
            _check_muon_settings(group)
            for p in group["params"]:
                _check("parameter dim", p.dim(), p.dim() >= 2, "dims >= 2 (Muon orthogonalises matrices)")
                blocks = group["row_blocks"]
                if blocks is not None:
                    _check("row_blocks", blocks, sum(blocks) == p.shape[-2],
                           f"row counts that sum to the parameter's {p.shape[-2]} rows")  # fmt: skip

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon_step([g for g in self.param_groups if g.get("algorithm", "muon") == "muon"])
        return loss

    def _muon_step(self, groups: list[dict]) -> None:
        # Parameters of one group, shape and placement are orthogonalised together, in batches of
        # at most MAX_BATCH_ELEMENTS matrix elements (bounds the step's temporaries).
        batches: dict = defaultdict(list)
        for group in groups:
            for p in group["params"]:
                if p.grad is not None:
                    plan = whole_matrix_plan(p)
                    batches[(id(group), plan.shape, p.dtype, plan.key)].append((group, p, plan))
        owner = 0  # gathered matrices go to the group's ranks in turn, across batches
        for members in batches.values():
            group, _, plan = members[0]
            budget = MAX_BATCH_ELEMENTS * (plan.size if plan.gathered else 1)
            per_batch = max(1, budget // math.prod(plan.shape))
            for start in range(0, len(members), per_batch):
                batch = [p for _, p, _ in members[start : start + per_batch]]
                inputs = self._orthogonalisation_inputs(group, batch)
                if plan.gathered:
                    owners = [(owner + i) % plan.size for i in range(len(batch))]
                    owner = (owner + len(batch)) % plan.size
                    mine = [i for i, o in enumerate(owners) if o == plan.rank]
                    pieces = list(inputs.unbind())
                    full = gather_to_owners(pieces, owners, plan)
                    updates = self._updates(group, torch.stack([full[i] for i in mine]) if mine else None, plan.shape)
                    del full
                    local = scatter_from_owners(dict(zip(mine, updates)), owners, plan, pieces, _compute_dtype(inputs))
                else:
                    local = self._updates(group, inputs, plan.shape)
                del inputs
                params = [local_shard(p) for p in batch]
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, local, alpha=-group["lr"])

    def _orthogonalisation_inputs(self, group: dict, batch: list[torch.Tensor]) -> torch.Tensor:
        """Updates the momentum buffers of ``batch`` (parameters of one shape) with their gradients;
        returns what Newton-Schulz takes, stacked: ``[len(batch), *this rank's part]``, fp32 (fp64
        for fp64 parameters)."""
        state_dtype = torch.float64 if batch[0].dtype == torch.float64 else torch.float32
        buffers, grads = [], []
        for p in batch:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=state_dtype)
            buffers.append(local_shard(state["momentum_buffer"]))
            grads.append(local_shard(p.grad).to(state_dtype))
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, grads)
        stacked = torch.empty((len(batch), *buffers[0].shape), dtype=state_dtype, device=buffers[0].device)
        for grad, buffer, out in zip(grads, buffers, stacked.unbind()):
            if group["nesterov"]:
                torch.add(grad, buffer, alpha=group["momentum"], out=out)
            else:
                out.copy_(buffer)
        return stacked

    @staticmethod
    def _updates(group: dict, stacked: torch.Tensor | None, shape: tuple[int, ...]) -> list[torch.Tensor]:
        """update_rms * sqrt(max(rows, cols)) * newton_schulz of each matrix (row block) of each of
        the stacked ``[k, *shape]`` inputs, one batched call per block shape; k updates of ``shape``
        in bf16 (fp64 for fp64 inputs)."""
        if stacked is None:
            return []
        matrices = stacked.reshape(-1, *shape[-2:])  # [k * batch, n, m]
        blocks = matrices.split(group["row_blocks"], dim=-2) if group["row_blocks"] else (matrices,)
        orthogonal = [
            newton_schulz(block, group["ns_coefficients"], group["eps"], scale=group["update_rms"] * math.sqrt(max(block.shape[-2:])))
            for block in blocks
        ]  # fmt: skip
        update = orthogonal[0] if len(orthogonal) == 1 else torch.cat(orthogonal, dim=-2)
        return list(update.reshape(stacked.shape[0], *shape).unbind())


class MuonWithAdamW(Muon):
    """Muon for the groups with ``"algorithm": "muon"`` (the default), torch's AdamW for those with
    ``"algorithm": "adamw"`` (options lr, betas, eps, weight_decay, implementation: "fused",
    "foreach" or "for-loop"; state exp_avg, exp_avg_sq, step as torch.optim.AdamW keeps them, so
    its update is exactly torch's)."""

    def add_param_group(self, param_group: dict) -> None:
        algorithm = param_group.get("algorithm", "muon")
        _check("algorithm", algorithm, algorithm in ("muon", "adamw"), "'muon', 'adamw'")
        if algorithm == "adamw":
            for key in ("betas", "eps", "weight_decay"):
                _check(f"AdamW group's {key}", None, key in param_group, "a value given in every AdamW group")
            param_group.setdefault("implementation", "for-loop")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            if group.get("algorithm", "muon") == "adamw":
                self._adamw_group(group)
        return loss

    def _adamw_group(self, group: dict) -> None:
        fused = group["implementation"] == "fused"
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                # As torch.optim.Adam._init_group creates it.
                state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if fused
                                 else torch.tensor(0.0, dtype=torch.float32))  # fmt: skip
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=group["implementation"] == "foreach",
             fused=fused, decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
             weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)  # fmt: skip

