"""Activation memory of one rank, by running the model's own modules on fake tensors.

Each distinct piece of the model (one block per kind: attention type x hash routing x activation
checkpointing wrapper; the tail: embedding, HyperHead, head, MTP blocks and the loss) runs forward
and backward once under ``FakeTensorMode``, at the rank's micro-batch shape, with the job's
activation checkpointing applied by torchtitan's ``apply_ac`` exactly as parallelize does. A
dispatch mode (:class:`LiveBytes`) follows the bytes of every tensor storage created meanwhile and
freed when its last reference goes, which is what the CUDA caching allocator sees as allocated.
Fake tensors cost no memory and no compute, so a Pro block at 64K tokens runs in a second.

The parameters of the simulated modules are fake tensors of the compute dtype
(``training.mixed_precision_param``), what FSDP2's mixed precision hands the forward, and the
routed experts are the rank's share under EP (:class:`Experts`); the model takes its GPU code paths
(the routed experts' grouped GEMM, V4's ``v4::`` ops with their fake kernels) as on an SM90 GPU. A
compiled block (``compile.enable``) keeps what AOTAutograd's min-cut partitioner (the one inductor
uses) chooses to save: :func:`partitioned` traces the block's joint graph on the fake tensors and
runs its partitioned forward and backward, so the saved set is the compiled block's (the memory
inside a graph, which inductor's fusions shrink further, is that of the unfused graph).

plan.py then walks one step in the order the trainer runs it, from these pieces.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from typing import Callable, Iterator

import torch
import torchtitan.models.moe.utils as moe_utils
from torch import nn
from torch._functorch.aot_autograd import aot_function, make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from torchtitan.components.loss import cross_entropy_loss
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed.activation_checkpoint import apply_ac

import titan_v4.model.moe as moe_module
from titan_v4.config import v4_settings
from titan_v4.infra.parallelize import OP_SAC_SAVE_LIST
from titan_v4.model.args import DeepSeekV4ModelArgs
from titan_v4.model.loss import V4Loss
from titan_v4.model.model import DeepSeekV4Model


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages created under it that are still referenced, and
    the peak of that count (``reset_peak`` starts a new peak from the current value). The storages
    of `existing` (parameters, buffers, inputs) and views of them are not counted."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for t in existing:
            self._seen[t.untyped_storage()] = 0

    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen[storage] = nbytes
                    self.live += nbytes
                    weakref.finalize(storage, self._free, nbytes)
        self.peak = max(self.peak, self.live)
        return out


@dataclasses.dataclass(frozen=True)
class PieceMemory:
    """Bytes of one piece of the model for one micro-batch.

    saved: held from the end of its forward until its backward (its output excluded);
    forward_peak: the most held during its forward above the start (its input excluded);
    backward_peak: the most held during its backward above the start of its backward (the
    incoming gradient excluded; its parameters' gradients, in the compute dtype, included).
    """

    saved: int
    forward_peak: int
    backward_peak: int


@contextlib.contextmanager
def gpu_code_paths() -> Iterator[None]:
    """The routed experts take their SM90 path (grouped GEMM, torchtitan's padded permutation)
    on the planner's fake CPU tensors. The permutation's CPU implementation reads the counts
    (data-dependent), so it is replaced by tensors of the shapes the GPU kernel returns."""

    def permute_indices_shapes(counts, experts_per_rank, num_ranks, max_len, alignment):
        sizes = torch.empty(experts_per_rank, dtype=torch.int32, device=counts.device)
        return torch.empty(max_len, dtype=torch.int64, device=counts.device), sizes, sizes

    saved = moe_module.grouped_mm_applies, moe_utils.generate_permute_indices
    moe_module.grouped_mm_applies = lambda x: True
    moe_utils.generate_permute_indices = permute_indices_shapes
    try:
        yield
    finally:
        moe_module.grouped_mm_applies, moe_utils.generate_permute_indices = saved


@dataclasses.dataclass(frozen=True)
class Experts:
    """The routed experts as one rank holds them in the forward: `local` of them (n_routed / EP),
    parameters in `dtype` (None: the compute dtype)."""

    local: int | None = None
    dtype: torch.dtype | None = None


def _fake_parameters_(module: nn.Module, dtype: torch.dtype, experts: Experts = Experts()) -> None:
    """Replace `module`'s meta parameters and buffers by fake tensors (the current FakeTensorMode);
    floating parameters take `dtype`, the routed experts' are shaped and typed as `experts` says
    (the grouped GEMM then sees this rank's experts and the same number of routed rows)."""
    for sub in module.modules():
        is_experts = isinstance(sub, moe_module.ClampedGroupedExperts)
        own = experts.dtype if is_experts and experts.dtype is not None else dtype
        for name, p in list(sub._parameters.items()):
            if p is not None:
                p_dtype = own if p.dtype.is_floating_point else p.dtype
                shape = (experts.local, *p.shape[1:]) if is_experts and experts.local is not None else p.shape
                sub._parameters[name] = nn.Parameter(torch.empty(shape, dtype=p_dtype), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def partitioned(target: Callable | nn.Module) -> Callable:
    """A function (or a module's forward) as its compiled graph runs and saves for its backward:
    AOTAutograd's joint graph split by the min-cut partitioner, both halves run as traced (no code
    generation). A module's parameters and buffers become graph inputs, as under torch.compile."""
    names, tensors = [], []
    if isinstance(target, nn.Module):
        module = target
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            names.append(name)
            tensors.append(t)

        def call(*flat):
            return torch.func.functional_call(module, dict(zip(names, flat[: len(names)])), flat[len(names) :])

    else:
        call = target
    traced_by_shape: dict = {}  # one static graph per input shapes, as torch.compile(dynamic=False)

    def run(*args):
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        if key not in traced_by_shape:
            traced_by_shape[key] = aot_function(call, fw_compiler=_as_traced, bw_compiler=_as_traced,
                                                partition_fn=min_cut_rematerialization_partition)  # fmt: skip
        return traced_by_shape[key](*tensors, *args)

    return run


def compiled_run(block: nn.Module, op_sac: bool) -> Callable:
    """How torch.compile runs `block`: its min-cut partition (:func:`partitioned`). A block wrapped for
    activation checkpointing that recomputes the whole block (full AC, or layer-selective AC; not
    `op_sac`, op-level selective AC) keeps only its inputs and reruns its compiled forward in the
    backward, as a compiled checkpointed region does."""
    inner = getattr(block, "_checkpoint_wrapped_module", None)
    if inner is None or op_sac:
        return partitioned(block)
    run = partitioned(inner)
    return lambda *args: torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def _as_traced(graph_module, example_inputs):
    return make_boxed_func(graph_module)


class _Partitioned(nn.Module):
    """A block whose call runs :func:`compiled_run` of it; its parameters stay registered and its
    submodules reachable (the model reads an MTP block's norm and HyperHead after calling it)."""

    def __init__(self, block: nn.Module, op_sac: bool) -> None:
        super().__init__()
        self.block = block
        self._run = compiled_run(block, op_sac)

    def forward(self, *args):
        return self._run(*args)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


def checkpointed_model(model_args: DeepSeekV4ModelArgs, job_config: JobConfig) -> DeepSeekV4Model:
    """The whole model on the meta device with the job's activation checkpointing, applied as
    parallelize_deepseek_v4 applies it (blocks, then the MTP blocks)."""
    with torch.device("meta"):
        model = DeepSeekV4Model(model_args)
    if job_config.activation_checkpoint.mode != "none":
        ac_args = dict(model_compile_enabled=False, op_sac_save_list=OP_SAC_SAVE_LIST, base_folder=job_config.job.dump_folder)
        apply_ac(model, job_config.activation_checkpoint, **ac_args)
        if len(model.mtp):
            holder = nn.Module()
            holder.layers = model.mtp
            apply_ac(holder, job_config.activation_checkpoint, **ac_args)
    return model


def block_signature(model: DeepSeekV4Model, layer_id: str) -> tuple:
    """What decides a block's activations: its attention type, hash routing and AC wrapper."""
    block = model.layers[layer_id]
    inner = getattr(block, "_checkpoint_wrapped_module", block)
    return inner.attn_type, inner.moe.router.hash_routed, type(block).__name__


def simulate_block(model: DeepSeekV4Model, layer_id: str, batch: int, seq_len: int, dtype: torch.dtype,
                   experts: Experts = Experts(), compiled: bool = False, op_sac: bool = False) -> PieceMemory:  # fmt: skip
    """Forward + backward of block `layer_id` of `model` (see :func:`checkpointed_model`) on fake
    tensors of a [batch, seq_len] micro-batch, with the rank's `experts` (under EP: its share of
    them, and outside FSDP their training dtype, cast per use). `compiled`: as a compiled block
    (:func:`compiled_run`; `op_sac`: the job's AC is op-level selective)."""
    args = model.model_args
    block = copy.deepcopy(model.layers[layer_id])
    with FakeTensorMode(), gpu_code_paths():
        _fake_parameters_(block, dtype, experts)
        cos = torch.empty(seq_len, args.rope_head_dim // 2)
        sin = torch.empty(seq_len, args.rope_head_dim // 2)
        token_ids = torch.zeros(batch, seq_len, dtype=torch.int64)
        h = torch.empty(batch, seq_len, args.hc_mult, args.dim, dtype=dtype, requires_grad=True)
        run = compiled_run(block, op_sac) if compiled else block
        with LiveBytes([*block.parameters(), *block.buffers(), cos, sin, token_ids, h]) as tracker:
            out = run(h, cos, sin, token_ids)
            forward_peak = tracker.peak - _nbytes(out)
            saved = tracker.live - _nbytes(out)
            grad_out = torch.empty_like(out)
            tracker.reset_peak()
            start = tracker.live
            out.backward(grad_out)
            backward_peak = tracker.peak - start
    return PieceMemory(saved=saved, forward_peak=forward_peak, backward_peak=backward_peak)


def simulate_tail(model: DeepSeekV4Model, job_config: JobConfig, batch: int, seq_len: int, dtype: torch.dtype,
                  experts: Experts = Experts()) -> PieceMemory:  # fmt: skip
    """Forward + backward of everything but the blocks (embedding, HyperHead, norm, head, MTP blocks,
    loss) on a [batch, seq_len] micro-batch: `model` with its blocks removed. The MTP blocks and the
    cross-entropy run as compiled (:func:`partitioned`) where the job compiles them."""
    compile_cfg = job_config.compile
    compiled_blocks = compile_cfg.enable and "model" in compile_cfg.components
    compiled_loss = compile_cfg.enable and "loss" in compile_cfg.components
    layers, model.layers = model.layers, nn.ModuleDict()
    try:
        tail = copy.deepcopy(model)
    finally:
        model.layers = layers
    with FakeTensorMode(), gpu_code_paths():
        _fake_parameters_(tail, dtype, experts)
        if compiled_blocks:
            for name, block in list(tail.mtp.named_children()):
                tail.mtp.register_module(name, _Partitioned(block, op_level_sac(job_config)))
        tokens = torch.zeros(batch, seq_len, dtype=torch.int64)
        loss_fn = V4Loss(float(v4_settings(job_config).mtp_loss_weight))
        if compiled_loss:
            loss_fn.cross_entropy = partitioned(cross_entropy_loss)
        with LiveBytes([*tail.parameters(), *tail.buffers(), tokens]) as tracker:
            loss = loss_fn(tail(tokens), tokens)
            forward_peak = tracker.peak
            saved = tracker.live
            tracker.reset_peak()
            start = tracker.live
            loss.backward()
            backward_peak = tracker.peak - start
    return PieceMemory(saved=saved, forward_peak=forward_peak, backward_peak=backward_peak)


def op_level_sac(job_config: JobConfig) -> bool:
    """Whether the job's activation checkpointing is op-level selective (it keeps some of a block's
    results rather than recomputing the whole block)."""
    ac = job_config.activation_checkpoint
    return ac.mode == "selective" and ac.selective_ac_option == "op"


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def compute_dtype(job_config: JobConfig) -> torch.dtype:
    """The dtype the forward runs in: training.mixed_precision_param (FSDP2's or autocast's)."""
    return TORCH_DTYPE_MAP[job_config.training.mixed_precision_param]
