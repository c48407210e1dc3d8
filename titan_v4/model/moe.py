"""DeepSeek-V4 MoE on top of torchtitan's MoE machinery.

V4 differs from torchtitan's DeepSeek-V3 MoE in four places, each added by subclassing so that
torchtitan's expert parallelism, FSDP, compile and aux-loss-free bias hook keep working (they key on
the attribute names `router.gate`, `reorderer`, `experts.w1/w2/w3`, `shared_experts`, `expert_bias`,
`tokens_per_expert`, `load_balance_coeff`):

- scores are sqrt(softplus(logits)) (router in fp32, like the official Gate);
- the first `n_hash_layers` layers choose experts by a fixed token-id table `tid2eid` (the gate still
  weights them), so the router takes the token ids;
- experts use the clamped SwiGLU `silu(min(gate, L)) * clamp(up, -L, L)`;
- a sequence-wise balance loss (DeepSeek-V3 eq. 17-20) on learned-routing layers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from torchtitan.models.moe.moe import FeedForward, GroupedExperts, MoE, MoEArgs, TokenChoiceTopKRouter, TokenReorderer
from torchtitan.models.moe.utils import indices_padding_wrapper

from .args import DeepSeekV4ModelArgs
from .aux_loss import AuxLoss
from .precision import compute_dtype, full_precision, matmul_dtype


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit); limit 0 = plain SwiGLU (official `Expert`)."""
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


def count_tokens_per_expert(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [num_experts] histogram of expert ids, without a host sync or a data-dependent shape.

    (torch.histc has no integer CPU kernel and bincount's output size depends on the data, which
    breaks torch.compile(fullgraph=True).)
    """
    flat = indices.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=indices.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def _run_clamped_experts_grouped_mm(
    w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, x: torch.Tensor, num_tokens_per_expert: torch.Tensor, *, swiglu_limit: float
) -> torch.Tensor:
    """Routed experts as three bf16 grouped GEMMs (CUDA SM90+); x rows are grouped by expert."""
    offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
    xb = x.bfloat16()
    gate = torch._grouped_mm(xb, w1.bfloat16().transpose(-2, -1), offs=offsets)
    up = torch._grouped_mm(xb, w3.bfloat16().transpose(-2, -1), offs=offsets)
    h = clamped_swiglu(gate, up, swiglu_limit)
    return torch._grouped_mm(h, w2.bfloat16().transpose(-2, -1), offs=offsets).type_as(x)


def _run_clamped_experts_loop(
    w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, x: torch.Tensor, num_tokens_per_expert: torch.Tensor, *, swiglu_limit: float
) -> torch.Tensor:
    """Routed experts without grouped GEMM, host syncs or data-dependent shapes (CPU, pre-SM90).

    Every local expert runs on every row and a mask keeps its own rows: num_experts x the FLOPs of
    the grouped version, exact, and compilable with fullgraph=True. Meant for small (debug / test)
    models; rows past the counted ones (EP padding) come out as 0.
    """
    row = torch.arange(x.shape[0], device=x.device)
    expert_of_row = torch.searchsorted(torch.cumsum(num_tokens_per_expert, 0), row, right=True)
    # Expert weights outside FSDP (expert parallelism) keep their own dtype; compute in x's.
    w1, w2, w3 = (w.to(x.dtype) for w in (w1, w2, w3))
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        h = clamped_swiglu(x @ w1[e].transpose(0, 1), x @ w3[e].transpose(0, 1), swiglu_limit) @ w2[e].transpose(0, 1)
        out = torch.where((expert_of_row == e).unsqueeze(-1), h.to(out.dtype), out)
    return out


def grouped_mm_applies(x: torch.Tensor) -> bool:
    """Whether the routed experts of this call run as bf16 grouped GEMMs: only on an SM90+ CUDA
    device when the matmuls run in bf16 (bf16 activations or bf16 autocast). Everything else (the
    CPU, older GPUs, an fp32 or fp64 model without autocast) takes the exact loop in its own dtype.
    """
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0) and matmul_dtype(x) == torch.bfloat16


class ClampedGroupedExperts(GroupedExperts):
    """torchtitan's GroupedExperts (params w1/w3 [E, H, D], w2 [E, D, H]) with V4's clamped SwiGLU.

    The compute path is chosen per call from the device and dtype (`grouped_mm_applies`), so a model
    built outside the trainer (an HF comparison, an evaluation on the CPU) computes its experts in
    its own precision; torchtitan's `use_grouped_mm` attribute is not used.

    Under expert parallelism, titan_v4.infra.expert_parallel shards the weights over the experts
    and sets `token_dispatcher`, which this forward calls to move the rows to the ranks that own
    their experts and back (no module hooks: the whole block stays one compiled graph).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, swiglu_limit: float):
        super().__init__(dim=dim, hidden_dim=hidden_dim, num_experts=num_experts, use_grouped_mm=False)
        self.swiglu_limit = swiglu_limit
        self.token_dispatcher = None

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x [T, D] rows grouped by expert, num_tokens_per_expert [E] int -> [T, D]."""
        if self.token_dispatcher is None:
            return self._run_local_experts(x, num_tokens_per_expert)
        rows, local_counts, route = self.token_dispatcher.dispatch(x, num_tokens_per_expert)
        return self.token_dispatcher.combine(self._run_local_experts(rows, local_counts), route)

    def _run_local_experts(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """The experts this rank holds on rows grouped by (local) expert."""
        ws = [w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w2, self.w3)]
        if not grouped_mm_applies(x):
            return _run_clamped_experts_loop(*ws, x, num_tokens_per_expert, swiglu_limit=self.swiglu_limit)
        # Grouped GEMMs need every group padded to the alignment (torchtitan's wrapper).
        run = indices_padding_wrapper(functools.partial(_run_clamped_experts_grouped_mm, swiglu_limit=self.swiglu_limit))
        return run(*ws, x, num_tokens_per_expert)


class ClampedFeedForward(FeedForward):
    """The shared expert: a SwiGLU MLP (w1 gate, w3 up, w2 down), clamped when `swiglu_limit` > 0."""

    def __init__(self, dim: int, hidden_dim: int, swiglu_limit: float):
        super().__init__(dim=dim, hidden_dim=hidden_dim)
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.swiglu_limit))


class V4Router(TokenChoiceTopKRouter):
    """Learned (top-k over scores + correction bias) or hash (fixed `tid2eid[token]`) routing.

    Scores are `score_func(x @ gate.T)` in fp32; the selected scores are renormalised to sum to 1
    (for sqrtsoftplus / sigmoid, as the official Gate) and multiplied by `route_scale`.
    """

    def __init__(self, args: DeepSeekV4ModelArgs, hash_routed: bool):
        super().__init__(
            dim=args.dim,
            num_experts=args.n_routed_experts,
            num_expert_groups=None,
            num_limited_groups=None,
            top_k=args.n_activated_experts,
            score_func="sigmoid",  # torchtitan's Literal; the V4 score function is applied below
            route_norm=args.score_func != "softmax",
            route_scale=args.route_scale,
            gate_bias=False,
        )
        self.score_func = args.score_func
        self.hash_routed = hash_routed
        if hash_routed:
            # Persistent: loaded from official / HF checkpoints; generated in init_weights otherwise.
            self.register_buffer(
                "tid2eid", torch.zeros(args.vocab_size, args.n_activated_experts, dtype=torch.int64), persistent=True
            )

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """[T, D] -> [T, E] affinities, computed in fp32 (fp64 for fp64 inputs)."""
        dtype = compute_dtype(x.dtype)
        with full_precision(x):  # routing stays fp32 under autocast
            logits = F.linear(x.to(dtype), self.gate.weight.to(dtype))
        if self.score_func == "sqrtsoftplus":
            return F.softplus(logits).sqrt()
        if self.score_func == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def forward(
        self, x: torch.Tensor, expert_bias: torch.Tensor | None = None, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, K], experts [T, K] int64, tokens per expert [E] int64, scores [T, E]); weights and scores fp32 (fp64 for fp64 x)."""
        scores = self.scores(x)
        if self.hash_routed:
            if token_ids is None:
                raise ValueError("a hash-routed MoE layer needs token_ids (pass them to the model's forward)")
            selected = self.tid2eid[token_ids.reshape(-1)]
        else:
            # The correction bias only chooses experts; the weights come from the unbiased scores.
            choice = scores if expert_bias is None else scores + expert_bias
            selected = torch.topk(choice, k=self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, selected)
        if self.route_norm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale
        return weights, selected, count_tokens_per_expert(selected, self.num_experts), scores

    def init_hash_table(self, layer_id: int) -> None:
        """Deterministic from-scratch table: each token gets top_k distinct experts, uniformly.

        The released hash function is not public; checkpoints carry the real table. Seeded by the
        layer id so every rank builds the same table.
        """
        # Drawn on the CPU (explicitly, so a surrounding `with torch.device("cuda")` cannot move the
        # draw away from the CPU generator): the same table on every device and rank.
        g = torch.Generator().manual_seed(0x5EED0000 + layer_id)
        scores = torch.rand(self.tid2eid.shape[0], self.num_experts, generator=g, device="cpu")
        table = scores.argsort(dim=-1)[:, : self.top_k]
        self.tid2eid.copy_(table.to(self.tid2eid.device))


class V4TokenReorderer(TokenReorderer):
    """torchtitan's stateless reorderer, counting with a compile-friendly integer histogram."""

    def forward(self, top_scores: torch.Tensor, selected_experts_indices: torch.Tensor):
        num_tokens_per_expert = count_tokens_per_expert(selected_experts_indices, self.num_experts)
        token_indices_experts_sorted = torch.argsort(selected_experts_indices.view(-1), stable=True)
        top_scores_experts_sorted = top_scores.view(-1)[token_indices_experts_sorted]
        return top_scores_experts_sorted, token_indices_experts_sorted, num_tokens_per_expert


def sequence_balance_loss(scores: torch.Tensor, selected: torch.Tensor, num_experts: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over the batch.

    scores [B, S, E] (unnormalised affinities), selected [B, S, K] -> scalar fp32
    `mean_b sum_i f_i P_i`, f_i = E / (K S) * #tokens of the sequence routed to i,
    P_i = mean_t s_{t,i} / sum_j s_{t,j}.
    """
    b, s, k = selected.shape
    probs = scores / scores.sum(dim=-1, keepdim=True)
    p = probs.mean(dim=1)  # [B, E]
    counts = torch.zeros(b, num_experts, dtype=scores.dtype, device=scores.device)
    counts.scatter_add_(1, selected.reshape(b, s * k), torch.ones(b, s * k, dtype=scores.dtype, device=scores.device))
    f = counts * (num_experts / (k * s))
    return (f * p).sum(dim=-1).mean()


class V4MoE(MoE):
    """V4 MoE layer: routed experts (clamped SwiGLU) + one shared expert, weights applied after the
    experts (`score_before_experts=False`; the SwiGLU is not linear in its input)."""

    def __init__(self, args: DeepSeekV4ModelArgs, layer_id: int, hash_routed: bool):
        moe_args = MoEArgs(
            num_experts=args.n_routed_experts,
            num_shared_experts=args.n_shared_experts,
            score_func="sigmoid",
            route_norm=args.score_func != "softmax",
            route_scale=args.route_scale,
            score_before_experts=False,
            top_k=args.n_activated_experts,
            # The bias-update speed (titan_v4/train/optimizer.py); hash layers keep the (unused) bias.
            load_balance_coeff=args.load_balance_coeff,
        )
        super().__init__(moe_args, dim=args.dim, hidden_dim=args.moe_inter_dim)
        self.layer_id = layer_id
        self.hash_routed = hash_routed
        self.experts = ClampedGroupedExperts(
            args.dim, args.moe_inter_dim, args.n_routed_experts, args.swiglu_limit
        )
        self.router = V4Router(args, hash_routed)
        self.reorderer = V4TokenReorderer(num_experts=args.n_routed_experts, top_k=args.n_activated_experts)
        shared_limit = args.swiglu_limit if args.clamp_shared_experts else 0.0
        self.shared_experts = (
            ClampedFeedForward(args.dim, args.moe_inter_dim * args.n_shared_experts, shared_limit)
            if args.n_shared_experts > 0
            else None
        )
        self.seq_balance_loss_weight = args.seq_balance_loss_weight
        # Attached to the output's gradient, scaled per microbatch by the trainer (aux_loss.py).
        self.balance_loss = AuxLoss("balance_loss")

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, D], token_ids [B, S] (hash layers) -> [B, S, D]."""
        bs, slen, dim = x.shape
        x = x.view(-1, dim)
        top_k = self.router.top_k
        expert_bias = None if self.hash_routed else self.expert_bias
        top_scores, selected, num_tokens_per_expert, scores = self.router(x, expert_bias, token_ids)
        with torch.no_grad():
            self.tokens_per_expert.add_(num_tokens_per_expert.to(self.tokens_per_expert.dtype))

        _, token_indices_sorted, num_tokens_per_expert = self.reorderer(top_scores, selected)
        routed_output = self.experts(x[token_indices_sorted // top_k], num_tokens_per_expert)
        unsorted = torch.zeros((bs * slen * top_k, dim), dtype=routed_output.dtype, device=routed_output.device)
        unsorted[token_indices_sorted] = routed_output
        # Weighted sum over the k experts in the routing weights' precision (fp32, or fp64 for fp64).
        routed = unsorted.reshape(-1, top_k, dim).to(top_scores.dtype)
        out = torch.bmm(top_scores.reshape(-1, 1, top_k), routed).squeeze(1).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        out = out.view(bs, slen, dim)

        if self.training and self.seq_balance_loss_weight > 0 and not self.hash_routed:
            aux = sequence_balance_loss(scores.view(bs, slen, -1), selected.view(bs, slen, top_k), self.experts.num_experts)
            out = self.balance_loss(out, aux, self.seq_balance_loss_weight)
        return out

    def init_weights(self, init_std: float, buffer_device: torch.device | None):
        buffer_device = buffer_device or self.tokens_per_expert.device
        super().init_weights(init_std, buffer_device)
        self.balance_loss.reset(buffer_device)
        if self.hash_routed:
            self.router.init_hash_table(self.layer_id)


def moe_layers(model_parts: list[nn.Module]) -> list[V4MoE]:
    """Every V4 MoE layer (main layers and MTP blocks, through AC / compile wrappers), in module order."""
    return [m for part in model_parts for m in part.modules() if isinstance(m, V4MoE)]
