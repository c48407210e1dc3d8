"""What a compiled block runs, read from the recorded graphs (tools/graph_recorder.py).

For one block kind, summed over its dynamo graphs (one, unless a graph break or a recompile made
more), separately for the forward and the backward graph of one block call:

* custom ops (`v4::*`), collectives and host syncs: op nodes of the graph the backend lowers;
* GEMMs (mm, bmm, grouped mm, ...) with their input dtypes and shapes: the same op nodes, as
  Inductor receives them after its post-grad passes;
* Inductor's generated kernels and how often the generated code calls each, with the aten ops each
  one fuses, and its extern and fallback calls (`extern_kernels.mm`, `torch.ops.aten.topk`, custom
  and collective ops): read from the generated module.

Per step = (forward + backward) x the blocks of this kind (each block runs each graph once per
step; with activation checkpointing the recomputation is part of the backward graph).

Kernel names are Inductor's deterministic descriptive names (`cpp_fused_<aten ops>_<n>`,
`triton_<kind>_fused_<aten ops>_<n>`), so the inventory carries no addresses, paths or timings.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

from .graph_recorder import CompiledPart, DynamoGraph, OpCall

GEMM_OPS = frozenset(
    {"aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm", "aten._grouped_mm", "aten._scaled_mm",
     "aten._scaled_grouped_mm", "aten._int_mm", "aten.mv", "aten.addmv"}
)  # fmt: skip
# The GEMMs whose first input is the added term, not a matrix operand.
GEMMS_WITH_ADDEND = frozenset({"aten.addmm", "aten.baddbmm", "aten.addmv"})
COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "c10d")
HOST_SYNC_OPS = frozenset({"aten._local_scalar_dense"})
CUSTOM_NAMESPACE = "v4"
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}

_KERNEL_DEF = re.compile(r"^(\w+) = async_compile\.\w+\(", re.MULTILINE)
_TRIPLE_QUOTED = re.compile(r"'''.*?'''|\"\"\".*?\"\"\"", re.DOTALL)
_COMMENT = re.compile(r"#[^\n]*")
_EXTERN_CALL = re.compile(r"\bextern_kernels\.(\w+)\(")
_OP_CALL = re.compile(r"\btorch\.ops\.(\w+)\.(\w+)\.(\w+)\(")
_FUSED_NAME = re.compile(r".*?_fused_(.+)_\d+")


def _packet(target: str) -> str:
    """"aten.mm" for "aten.mm.default"."""
    return target.rsplit(".", 1)[0]


def short_dtype(dtype: str) -> str:
    return SHORT_DTYPES.get(dtype, dtype)


def gemm_operand_dtypes(op: OpCall) -> str:
    """'bf16 x bf16': the dtypes of a GEMM's two matrix operands."""
    first = 1 if _packet(op.target) in GEMMS_WITH_ADDEND else 0
    return " x ".join(short_dtype(d) for d in op.dtypes[first : first + 2])


@dataclass
class GeneratedCode:
    """The kernels and calls of one Inductor-generated module."""

    kernels: dict[str, int] = field(default_factory=dict)  # kernel name -> calls, in definition order
    extern_calls: collections.Counter = field(default_factory=collections.Counter)


def read_generated_code(code: str) -> GeneratedCode:
    """Kernel definitions (`name = async_compile.<how>(...)`) and the calls the wrapper code makes:
    `name(...)` (C++) or `name.run(...)` (Triton), `extern_kernels.<f>(...)`, `torch.ops.<ns>.<op>.<overload>(...)`."""
    names = _KERNEL_DEF.findall(code)
    # Calls only: drop the kernels' source text (triple-quoted) and the comments.
    calls = _COMMENT.sub("", _TRIPLE_QUOTED.sub("''", code))
    generated = GeneratedCode()
    for name in names:
        generated.kernels[name] = len(re.findall(rf"\b{name}(?:\.run)?\(", calls))
    generated.extern_calls.update(f"extern_kernels.{f}" for f in _EXTERN_CALL.findall(calls))
    generated.extern_calls.update(f"{ns}.{op}.{overload}" for ns, op, overload in _OP_CALL.findall(calls))
    return generated


def fused_ops(kernel_name: str, vocabulary: set[str]) -> str:
    """The aten ops a generated kernel fuses, decoded from its descriptive name
    (`<prefix>_fused_<sorted op names joined by _>_<n>`) against the op names of its graph;
    the raw name part where it does not decode, "-" for a kernel that is not a fusion."""
    match = _FUSED_NAME.fullmatch(kernel_name)
    if match is None:
        return "-"
    text = match.group(1)
    splits: dict[int, list[str] | None] = {len(text): []}

    def split_from(i: int) -> list[str] | None:
        if i not in splits:
            splits[i] = None
            for op in sorted(vocabulary, key=len, reverse=True):
                end = i + len(op)
                if text.startswith(op, i) and (end == len(text) or text[end] == "_"):
                    rest = split_from(min(end + 1, len(text)))
                    if rest is not None:
                        splits[i] = [op, *rest]
                        break
        return splits[i]

    ops = split_from(0)
    return ", ".join(ops) if ops else text


@dataclass
class PartInventory:
    """Forward or backward of one block call (summed over the kind's dynamo graphs)."""

    ops: list[OpCall] = field(default_factory=list)
    generated: GeneratedCode | None = None  # None for a backend without generated code

    def add(self, part: CompiledPart | None) -> None:
        if part is None:
            return
        self.ops.extend(part.lowered_ops)
        if part.output_code is not None:
            code = read_generated_code(part.output_code)
            self.generated = self.generated or GeneratedCode()
            for name, calls in code.kernels.items():
                self.generated.kernels[name] = self.generated.kernels.get(name, 0) + calls
            self.generated.extern_calls.update(code.extern_calls)

    def count(self, predicate) -> collections.Counter:
        return collections.Counter(op.target for op in self.ops if predicate(op.target))

    def kernel_calls(self) -> int:
        return sum(self.generated.kernels.values()) if self.generated else 0


def _is_custom(target: str) -> bool:
    return target.startswith(CUSTOM_NAMESPACE + ".")


def _is_collective(target: str) -> bool:
    return target.split(".", 1)[0] in COLLECTIVE_NAMESPACES


def _is_gemm(target: str) -> bool:
    return _packet(target) in GEMM_OPS


def _is_host_sync(target: str) -> bool:
    return _packet(target) in HOST_SYNC_OPS


@dataclass
class KindInventory:
    """Everything the dump says about one block kind."""

    kind: str
    blocks: list[str]
    backend: str
    graphs: int
    graph_breaks: collections.Counter
    recompiles: int  # dynamo graphs compiled for this kind after step 1
    forward: PartInventory
    backward: PartInventory
    fsdp_units_inside: list[str] = field(default_factory=list)  # each one a graph break

    @classmethod
    def build(
        cls, kind: str, blocks: list[str], backend: str, graphs: list[DynamoGraph], graph_breaks, fsdp_units_inside=()
    ) -> "KindInventory":
        forward, backward = PartInventory(), PartInventory()
        for graph in graphs:
            forward.add(graph.forward)
            backward.add(graph.backward)
        return cls(
            kind=kind, blocks=list(blocks), backend=backend, graphs=len(graphs),
            graph_breaks=collections.Counter(graph_breaks), recompiles=sum(g.step > 1 for g in graphs),
            forward=forward, backward=backward, fsdp_units_inside=list(fsdp_units_inside),
        )  # fmt: skip

    @property
    def per_step(self) -> int:
        return max(len(self.blocks), 1)

    def gemm_dtypes(self) -> collections.Counter:
        """'fp32 x fp32' (the matrix operands' dtypes) -> GEMM calls per step."""
        dtypes = collections.Counter()
        for part in (self.forward, self.backward):
            for op in part.ops:
                if _is_gemm(op.target):
                    dtypes[gemm_operand_dtypes(op)] += self.per_step
        return dtypes

    # -- text -----------------------------------------------------------------------------------

    def _fw_bw(self, predicate) -> list[tuple[str, int, int]]:
        fw, bw = self.forward.count(predicate), self.backward.count(predicate)
        return [(target, fw[target], bw[target]) for target in sorted(fw.keys() | bw.keys())]

    def summary(self) -> str:
        """A few lines that pin this kind's inventory: compile health, custom ops, kernel, extern
        and GEMM counts per block call (forward/backward), GEMM dtypes per step."""

        def counts(rows) -> str:
            return ", ".join(f"{name} {fw}/{bw}" for name, fw, bw in rows) or "none"

        lines = [
            f"{self.kind}: {len(self.blocks)} block(s) ({', '.join(self.blocks)})",
            f"  dynamo graphs {self.graphs}, graph breaks {sum(self.graph_breaks.values())}, "
            f"recompiles after step 1 {self.recompiles}",
            f"  custom ops per block (fw/bw): {counts(self._fw_bw(_is_custom))}",
        ]
        if self.forward.generated is not None or self.backward.generated is not None:
            fw, bw = self.forward.generated or GeneratedCode(), self.backward.generated or GeneratedCode()
            lines.append(
                f"  generated kernels per block (fw/bw): {len(fw.kernels)}/{len(bw.kernels)} kernels, "
                f"{self.forward.kernel_calls()}/{self.backward.kernel_calls()} calls"
            )
            externs = [(n, fw.extern_calls[n], bw.extern_calls[n]) for n in sorted(fw.extern_calls.keys() | bw.extern_calls.keys())]
            lines.append(f"  extern calls per block (fw/bw): {counts(externs)}")
        gemms = self._fw_bw(_is_gemm)
        gemm_fw, gemm_bw = sum(r[1] for r in gemms), sum(r[2] for r in gemms)
        dtypes = ", ".join(f"{d} {n}" for d, n in sorted(self.gemm_dtypes().items())) or "none"
        lines.append(f"  GEMMs per block (fw/bw): {gemm_fw}/{gemm_bw}; per step by input dtypes: {dtypes}")
        for title, predicate in (("collectives", _is_collective), ("host syncs", _is_host_sync)):
            rows = self._fw_bw(predicate)
            if rows:
                lines.append(f"  {title} per block (fw/bw): {counts(rows)}")
        if self.fsdp_units_inside:
            lines.append(
                f"  FSDP units inside the block (FSDP2's hooks are dynamo-disabled: a graph break at each): "
                f"{', '.join(self.fsdp_units_inside)}"
            )
        for reason, n in sorted(self.graph_breaks.items()):
            lines.append(f"  graph break x{n}: {reason}")
        return "\n".join(lines)

    def markdown(self) -> str:
        """kernels.md: the summary, then one table per category."""
        n = self.per_step
        out = [
            f"# Block kind `{self.kind}`",
            "",
            f"Backend `{self.backend}`. Counts are per block call for the forward (fw) and the backward "
            f"(bw) graph; per step = (fw + bw) x {n} block(s) of this kind.",
            "",
            "```",
            self.summary(),
            "```",
        ]

        def table(title: str, header: list[str], rows: list[list]) -> None:
            out.extend(["", f"## {title}", ""])
            if not rows:
                out.append("none")
                return
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)

        def fw_bw_rows(predicate) -> list[list]:
            return [[f"`{t}`", fw, bw, (fw + bw) * n] for t, fw, bw in self._fw_bw(predicate)]

        table("Custom ops (v4::)", ["op", "fw", "bw", "per step"], fw_bw_rows(_is_custom))
        fw_gen, bw_gen = self.forward.generated, self.backward.generated
        if fw_gen is not None or bw_gen is not None:
            fw_gen, bw_gen = fw_gen or GeneratedCode(), bw_gen or GeneratedCode()
            vocabulary = {op.original_aten for part in (self.forward, self.backward) for op in part.ops if op.original_aten}
            vocabulary |= {_packet(op.target).split(".", 1)[-1] for part in (self.forward, self.backward) for op in part.ops}
            rows = []
            for where, gen in (("fw", fw_gen), ("bw", bw_gen)):
                for name, calls in gen.kernels.items():
                    fw, bw = (calls, 0) if where == "fw" else (0, calls)
                    rows.append([f"`{name}` ({where})", fused_ops(name, vocabulary), fw, bw, calls * n])
            table("Generated kernels", ["kernel", "fuses (aten ops)", "fw", "bw", "per step"], rows)
            names = sorted(fw_gen.extern_calls.keys() | bw_gen.extern_calls.keys())
            rows = [[f"`{k}`", fw_gen.extern_calls[k], bw_gen.extern_calls[k], (fw_gen.extern_calls[k] + bw_gen.extern_calls[k]) * n] for k in names]
            table("Extern and fallback calls (generated code)", ["call", "fw", "bw", "per step"], rows)
        gemm_rows = collections.Counter()
        for where, part in (("fw", self.forward), ("bw", self.backward)):
            for op in part.ops:
                if _is_gemm(op.target):
                    shapes = " x ".join(f"[{', '.join(s)}]" for s in op.shapes)
                    gemm_rows[(op.target, " x ".join(map(short_dtype, op.dtypes)), shapes, op.source, where)] += 1
        rows = []
        for target, dtypes, shapes, source in sorted({k[:4] for k in gemm_rows}):
            fw, bw = (gemm_rows[(target, dtypes, shapes, source, where)] for where in ("fw", "bw"))
            rows.append([f"`{target}`", dtypes, shapes, source or "-", fw, bw, (fw + bw) * n])
        table(
            "GEMMs (inputs as the backend lowers them)",
            ["op", "input dtypes", "input shapes", "from (model line)", "fw", "bw", "per step"],
            rows,
        )
        table("Collectives", ["op", "fw", "bw", "per step"], fw_bw_rows(_is_collective))
        table("Host syncs (device-to-host reads)", ["op", "fw", "bw", "per step"], fw_bw_rows(_is_host_sync))
        table("Graph breaks", ["reason", "count"], [[reason, c] for reason, c in sorted(self.graph_breaks.items())])
        return "\n".join(out) + "\n"

    def index_row(self, link: str) -> str:
        """One row of index.md."""
        custom = collections.Counter()
        for t, fw, bw in self._fw_bw(_is_custom):
            custom[t.split(".")[1]] += (fw + bw) * self.per_step
        kernels = "-"
        if self.forward.generated is not None or self.backward.generated is not None:
            kernels = f"{self.forward.kernel_calls()}/{self.backward.kernel_calls()}"
        dtypes = ", ".join(f"{d}: {c}" for d, c in sorted(self.gemm_dtypes().items())) or "none"
        cells = [
            f"[{self.kind}]({link})", ", ".join(self.blocks), str(sum(self.graph_breaks.values())), str(self.recompiles),
            kernels, dtypes, ", ".join(f"{op} x{c}" for op, c in sorted(custom.items())) or "none",
        ]  # fmt: skip
        return "| " + " | ".join(cells) + " |"


INDEX_HEADER = (
    "| kind | blocks | graph breaks | recompiles after step 1 | kernel calls per block (fw/bw) "
    "| GEMMs per step by input dtypes | custom ops per step |\n|---|---|---|---|---|---|---|"
)
