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

import torch
from torch.optim.adam import adam

#: The hybrid schedule: 8 fast-converging steps, then 2 that settle the singular values at 1.
DEFAULT_NS_COEFFICIENTS = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2


def newton_schulz(M: torch.Tensor, steps: Sequence[tuple[float, float, float]], eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonalisation of every matrix of ``M`` (``[..., n, m]``, leading dims batch).

    X0 = M / (||M||_F + eps) (per matrix, in fp32), then for each (a, b, c) of ``steps``:
    A = X X^T, B = b A + c A A, X = a X + B X. A tall matrix (n > m) is transposed first so that
    A is the small side's Gram matrix. The matmuls run in bf16, or in fp64 when M is fp64 (exact
    comparisons against a reference). Returns ``[..., n, m]`` in fp32 (fp64 for an fp64 M): with the
    default schedule its singular values are close to 1 (tests/train/test_muon.py measures them).
    """
    compute = torch.float64 if M.dtype == torch.float64 else torch.bfloat16
    X = M.to(torch.float64 if compute == torch.float64 else torch.float32)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = (X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)).to(compute)
    for a, b, c in steps:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(torch.float64 if compute == torch.float64 else torch.float32)


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
        # (params, their blocks) of every parameter, then one Newton-Schulz call per block shape.
        todo = []  # (group, p, blocks [k, r, m] list)
        buckets: dict = defaultdict(list)  # key -> [(index in todo, block index)]
        for group in groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=state_dtype)
                buf = state["momentum_buffer"]
                grad = p.grad.to(state_dtype)
                buf.mul_(group["momentum"]).add_(grad)
                u = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                matrices = u.reshape(-1, *u.shape[-2:])  # [k, n, m]
                blocks = list(matrices.split(group["row_blocks"], dim=-2)) if group["row_blocks"] else [matrices]
                todo.append((group, p, blocks))
                for j, block in enumerate(blocks):
                    key = (tuple(block.shape[-2:]), block.dtype, block.device, group["ns_coefficients"], group["eps"])
                    buckets[key].append((len(todo) - 1, j))
        for (shape, _, _, steps, eps), members in buckets.items():
            stacked = torch.cat([todo[i][2][j] for i, j in members])
            orthogonal = newton_schulz(stacked, steps, eps).split([todo[i][2][j].shape[0] for i, j in members])
            for (i, j), o in zip(members, orthogonal):
                todo[i][2][j] = o * math.sqrt(max(shape))
        for group, p, blocks in todo:
            update = torch.cat(blocks, dim=-2).reshape(p.shape) * group["update_rms"]
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update.to(p.dtype), alpha=-group["lr"])


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

