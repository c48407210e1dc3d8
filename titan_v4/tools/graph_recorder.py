"""Record what torch.compile makes of each compiled DeepSeek-V4 block (for tools/dump_graphs.py).

`GraphRecorder` is a dynamo backend. Training compiles each block with
`torch.compile(block, backend=job_config.compile.backend)` (infra/parallelize.py); the dump tool
registers the recorder under `RECORDER_BACKEND` and puts that name into the config, so the blocks
are compiled exactly as in training, through the recorder. For every dynamo graph it keeps:

* the dynamo graph (readable FX code);
* for the AOT forward and backward graphs: the graph AOTAutograd hands to the backend, the ops of
  the graph the backend finally lowers (for Inductor: after its post-grad passes, through the
  `post_grad_custom_post_pass` hook; for aot_eager: the AOT graph itself) with their input dtypes
  and shapes, and Inductor's generated module (`CompiledFxGraph.source_code`).

Which block a graph belongs to is known from forward hooks on the compiled block wrappers, which
run outside the compiled code: the pre-hook names the block kind being called, and a compile that
happens meanwhile belongs to it. A backward graph compiled lazily (at the first backward) is still
attributed right, because each dynamo graph gets its own recording callbacks. The same hooks count
dynamo's graph breaks (`torch._dynamo.utils.counters["graph_break"]`) per kind, and the recorder
lists the submodules that have their own FSDP unit inside a compiled block: FSDP2's hooks are
dynamo-disabled, so each one is a graph break (infra/fsdp.py says when that happens).

Compile caches are switched off while recording: a cache hit would skip the compile and so the
recording.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import re
import sys
from dataclasses import dataclass, field

import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._inductor.compile_fx import compile_fx, compile_fx_inner
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.distributed.fsdp import FSDPModule
from torch.utils import _pytree as pytree

from titan_v4.model.block import TransformerBlock
from titan_v4.model.mtp import MTPBlock

#: The name the recorder is registered under with dynamo (`compile.backend` of a dump run).
RECORDER_BACKEND = "titan_v4_recorder"
#: The backends the recorder can wrap.
INNER_BACKENDS = ("inductor", "aot_eager")
#: Where a graph compiled outside any tracked block is filed.
OUTSIDE_BLOCKS = "outside-blocks"
#: Where the loss's compiled cross-entropy is filed (compile.components "loss", model/loss.py).
LOSS = "loss"


def block_kind(block: nn.Module) -> str:
    """`<attention>-<routing>` of a V4 layer ("swa-hash", "csa-learned", "hca-learned", ...), or
    "mtp" for a multi-token-prediction block (sliding window, learned routing, its own inputs)."""
    if isinstance(block, MTPBlock):
        return "mtp"
    return f"{block.attn_type}-{'hash' if block.moe.hash_routed else 'learned'}"


@dataclass(frozen=True)
class OpCall:
    """One op node of a lowered graph: its target and the dtypes and shapes of its tensor inputs."""

    target: str  # e.g. "aten.mm.default", "v4.sparse_attention.default"
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[str, ...], ...]
    original_aten: str  # the op before decompositions (what Inductor names fused kernels after)
    source: str = ""  # the model line it comes from, "titan_v4/model/mhc.py:79 in collapse"


@dataclass
class CompiledPart:
    """The forward or the backward graph of one dynamo graph, as handed to and lowered by the backend."""

    aot_graph: str
    lowered_ops: list[OpCall] = field(default_factory=list)
    output_code: str | None = None  # Inductor's generated module; None for aot_eager


@dataclass
class DynamoGraph:
    """One graph dynamo captured: the block kind it belongs to, the step it was compiled in."""

    kind: str
    step: int
    code: str
    forward: CompiledPart | None = None
    backward: CompiledPart | None = None


def relative_paths(text: str) -> str:
    """`text` with source paths made relative to the sys.path entry they lie under."""
    # Longest prefix first, so a virtualenv's site-packages wins over the repository root above it.
    for prefix in sorted({os.path.join(os.path.abspath(p), "") for p in sys.path if p}, key=len, reverse=True):
        text = text.replace(prefix, "")
    return text


def readable(gm: torch.fx.GraphModule) -> str:
    """The graph as Python with shapes and dtypes."""
    return relative_paths(gm.print_readable(print_output=False, include_stride=True, include_device=True))


def break_reason(reason: str) -> str:
    """Dynamo's graph-break reason on one line: its headline and explanation, paths relative."""
    lines = [line.strip() for line in relative_paths(reason).splitlines() if line.strip()]
    return " ".join(line for i, line in enumerate(lines) if i == 0 or line.startswith("Explanation:"))


def _tensor_inputs(node: torch.fx.Node) -> list[torch.Tensor]:
    """The (fake) tensors a node takes, in argument order."""
    vals = []
    for arg in pytree.tree_leaves((node.args, node.kwargs)):
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        for v in val if isinstance(val, (list, tuple)) else (val,):
            if isinstance(v, torch.Tensor):
                vals.append(v)
    return vals


def _op_name(target) -> str:
    """"aten.mm.default" for torch.ops.aten.mm.default; a higher-order op's name."""
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name()
    return str(target)


def op_calls(graph: torch.fx.Graph) -> list[OpCall]:
    """The op (call_function) nodes of `graph`, in graph order."""
    calls = []
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
            continue
        inputs = _tensor_inputs(node)
        original = node.meta.get("original_aten")
        original_name = original._overloadpacket.__name__ if isinstance(original, torch._ops.OpOverload) else ""
        calls.append(
            OpCall(
                target=_op_name(node.target),
                dtypes=tuple(str(t.dtype).removeprefix("torch.") for t in inputs),
                shapes=tuple(tuple(str(s) for s in t.shape) for t in inputs),
                original_aten=original_name,
                source=_source_line(node),
            )
        )
    return calls


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)')


def _source_line(node: torch.fx.Node) -> str:
    """The innermost user frame of the node's stack trace (backward nodes carry their forward
    op's), as "path:line in function" with the path relative to sys.path."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    path, line, function = frames[-1]
    return f"{relative_paths(path)}:{line} in {function}"


class _RecordLoweredOps(CustomGraphPass):
    """Inductor's `post_grad_custom_post_pass`: keeps the ops of the graph Inductor is about to
    lower (after its own post-grad passes), then runs any pass that was configured before."""

    def __init__(self, previous):
        self.previous = previous
        self.ops: list[OpCall] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.previous is not None:
            self.previous(graph)
        self.ops = op_calls(graph)

    def uuid(self):
        return None  # never cached (the recorder switches the caches off anyway)


@contextlib.contextmanager
def _no_compile_caches():
    """Inductor's FX-graph cache and AOTAutograd's cache off: a hit would bypass the recording."""
    with inductor_config.patch(fx_graph_cache=False, fx_graph_remote_cache=False):
        with functorch_config.patch(enable_autograd_cache=False, enable_remote_autograd_cache=False):
            yield


class GraphRecorder:
    """A dynamo backend that compiles with `inner_backend` ("inductor" or "aot_eager") and keeps
    every graph it sees, filed under the block kind being called (see the module docstring)."""

    def __init__(self, inner_backend: str):
        if inner_backend not in INNER_BACKENDS:
            raise ValueError(f"compile.backend={inner_backend!r}: the graph dump supports {INNER_BACKENDS}")
        self.inner_backend = inner_backend
        self.graphs: list[DynamoGraph] = []
        self.blocks: dict[str, list[str]] = collections.defaultdict(list)  # kind -> block names
        self.graph_breaks: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        # kind -> submodules with their own FSDP unit inside the compiled block (dynamo-disabled hooks)
        self.fsdp_units_inside: dict[str, list[str]] = {}
        self.step = 0  # the training step being run; set by the caller
        self._kind: str | None = None
        self._breaks_before: collections.Counter = collections.Counter()

    # -- which block is running ---------------------------------------------------------------

    def track_blocks(self, model_parts: list[nn.Module]) -> None:
        """Hook every compiled block (`layers.*`, `mtp.*`) of the model parts. Raises if a block is
        not compiled (the dump needs `compile.enable` with "model" in `compile.components`)."""
        for part in model_parts:
            for container_name in ("layers", "mtp"):
                container = getattr(part, container_name, None)
                for name, wrapper in (container or {}).items():
                    if not isinstance(wrapper, torch._dynamo.eval_frame.OptimizedModule):
                        raise ValueError(f"{container_name}.{name} is not compiled: the dump needs compile.enable")
                    block = next(m for m in wrapper.modules() if isinstance(m, TransformerBlock))
                    kind = block_kind(block)
                    self.blocks[kind].append(f"{container_name}.{name}")
                    self.fsdp_units_inside[kind] = [
                        n.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
                        for n, m in wrapper.named_modules() if n and isinstance(m, FSDPModule)
                    ]  # fmt: skip
                    # On the wrapper, so the hooks run outside the compiled code.
                    wrapper.register_forward_pre_hook(functools.partial(self._enter, kind))
                    wrapper.register_forward_hook(self._exit)
        if not self.blocks:
            raise ValueError("no transformer block found in the model parts")

    def track_loss(self, loss_fn) -> None:
        """File the graphs of the loss's compiled cross-entropy (`V4Loss.cross_entropy`, one graph per
        head's logits shape) under LOSS; an eager loss has none to file."""
        compiled = getattr(loss_fn, "cross_entropy", None)
        if not hasattr(compiled, "_torchdynamo_orig_callable"):
            return
        self.blocks[LOSS].append("cross_entropy")

        @functools.wraps(compiled)
        def tracked(*args, **kwargs):
            self._enter(LOSS, None, args)
            try:
                return compiled(*args, **kwargs)
            finally:
                self._exit(None, args, None)

        loss_fn.cross_entropy = tracked

    def _enter(self, kind: str, module, args) -> None:
        self._kind = kind
        self._breaks_before = collections.Counter(counters["graph_break"])

    def _exit(self, module, args, output) -> None:
        new = collections.Counter(counters["graph_break"]) - self._breaks_before
        self.graph_breaks[self._kind] += collections.Counter({break_reason(r): n for r, n in new.items()})
        self._kind = None

    # -- the backend ----------------------------------------------------------------------------

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        graph = DynamoGraph(kind=self._kind or OUTSIDE_BLOCKS, step=self.step, code=readable(gm))
        self.graphs.append(graph)
        with _no_compile_caches():
            if self.inner_backend == "aot_eager":
                record = functools.partial(self._record_aot_eager, graph)
                return aot_autograd(
                    fw_compiler=functools.partial(record, "forward"), bw_compiler=functools.partial(record, "backward")
                )(gm, example_inputs)
            return compile_fx(gm, example_inputs, inner_compile=functools.partial(self._record_inductor, graph))

    @staticmethod
    def _record_aot_eager(graph: DynamoGraph, which: str, gm: torch.fx.GraphModule, example_inputs):
        setattr(graph, which, CompiledPart(aot_graph=readable(gm), lowered_ops=op_calls(gm.graph)))
        return make_boxed_func(gm.forward)

    @staticmethod
    def _record_inductor(graph: DynamoGraph, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        part = CompiledPart(aot_graph=readable(gm))  # before Inductor's passes rewrite gm in place
        recorder = _RecordLoweredOps(inductor_config.post_grad_custom_post_pass)
        with _no_compile_caches(), inductor_config.patch(post_grad_custom_post_pass=recorder):
            compiled = compile_fx_inner(gm, example_inputs, **kwargs)
        part.lowered_ops = recorder.ops
        part.output_code = compiled.source_code
        setattr(graph, "backward" if kwargs.get("is_backward") else "forward", part)
        return compiled


_active: GraphRecorder | None = None


def _recorder_backend(gm: torch.fx.GraphModule, example_inputs):
    if _active is None:
        raise RuntimeError(f"compile.backend={RECORDER_BACKEND!r} is only for titan_v4.tools.dump_graphs")
    return _active(gm, example_inputs)


torch._dynamo.register_backend(_recorder_backend, name=RECORDER_BACKEND)


def activate(recorder: GraphRecorder) -> str:
    """Make `recorder` the backend named RECORDER_BACKEND and return that name (for
    `job_config.compile.backend`)."""
    global _active
    _active = recorder
    return RECORDER_BACKEND
