"""Dump what torch.compile makes of each DeepSeek-V4 block kind, for kernel inspection.

    python -m titan_v4.tools.dump_graphs --job.config_file CONFIG --out DIR [--section.field value ...]
    NGPU=2 ./dump_graphs.sh --job.config_file CONFIG --out DIR [...]       (several processes)

Builds the configured model with its parallelism exactly as training does (torchtitan's trainer with
V4Trainer, on this host's CPU or GPUs), and runs two training steps with every block compiled by
torch.compile through a recording backend (graph_recorder.py): step 1 compiles, step 2 shows
whether anything recompiles. The process of rank 0 then writes, for each block kind
(`<attention>-<routing>` such as `csa-learned`, and `mtp`; `loss` for the compiled cross-entropy
when `compile.components` has "loss"):

    DIR/<kind>/dynamo_graph.py        the graph dynamo captured (one per graph; _<i> when several)
    DIR/<kind>/aot_forward.py         AOTAutograd's forward and backward graphs, as the backend gets them
    DIR/<kind>/aot_backward.py
    DIR/<kind>/inductor_forward.py    Inductor's generated code (C++ kernels on a CPU, Triton on CUDA)
    DIR/<kind>/inductor_backward.py
    DIR/<kind>/kernels.md             the inventory (kernel_inventory.py): custom ops, generated kernels
                                      with the aten ops they fuse, extern calls, GEMM dtypes and shapes,
                                      collectives, host syncs, graph breaks; counts per block and per step
    DIR/index.md                      one line per kind, and the run's settings
    DIR/profile.txt                   the second step's ops and kernels by self time (timings vary)
    DIR/run/                          the run's torchtitan dump folder: logs/train.log, logs/metrics.jsonl

The dump forces what it needs and says so in the log and in index.md: `compile.enable`, "model" in
`compile.components`, `checkpoint.enable` off, `job.dump_folder` DIR/run (so that a dump never
writes into a training run's folder), and 2 training steps unless `--training.steps N` (N >= 2) is
on the command line (the later steps then time the compiled model, as in a training log).
`compile.backend` may be "inductor" (default) or "aot_eager" (graphs and op inventories without
generated kernels; fast). Run without torchrun, it is a single process (world size 1).

`--out` is checked before anything is built (a file or an unwritable path is refused with one
line); `--help` lists the tool's options, then every training setting.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path

import torch

from titan_v4.train.trainer import V4Trainer  # first: installs the CPU shim before torchtitan is imported

from torchtitan.config import ConfigManager  # noqa: E402
from torchtitan.tools.logging import init_logger, logger  # noqa: E402

from titan_v4.tools import graph_recorder  # noqa: E402
from titan_v4.tools.arguments import ToolArgumentError, prepare_out_dir  # noqa: E402
from titan_v4.tools.graph_recorder import OUTSIDE_BLOCKS, GraphRecorder  # noqa: E402
from titan_v4.tools.kernel_inventory import INDEX_HEADER, KindInventory  # noqa: E402
from titan_v4.train import run_log  # noqa: E402

MIN_STEPS = 2  # step 1 compiles; a compile in a later step is a recompile
PROFILED_STEP = 2
PROFILE_ROWS = 40
RUN_FOLDER = "run"  # DIR/run: the training run's own dump folder (logs, metrics.jsonl)


class DumpTrainer(V4Trainer):
    """V4Trainer whose compiled blocks report to a GraphRecorder, and whose step 2 is profiled."""

    def __init__(self, job_config, recorder: GraphRecorder):
        super().__init__(job_config)
        self.recorder = recorder
        self.profile_table = ""
        recorder.track_blocks(self.model_parts)
        recorder.track_loss(self.loss_fn)

    def train_step(self, data_iterator):
        self.recorder.step = self.step
        if self.step != PROFILED_STEP:
            return super().train_step(data_iterator)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profile:
            super().train_step(data_iterator)
        sort_by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        self.profile_table = profile.key_averages().table(sort_by=sort_by, row_limit=PROFILE_ROWS)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m titan_v4.tools.dump_graphs",
        usage="%(prog)s --out DIR [--job.config_file CONFIG] [--section.field value ...]",
        description="Runs two training steps of the configured model with every block compiled, and writes "
        "what torch.compile made of each block kind under DIR: graphs, generated code, kernels.md, index.md. "
        "Every other argument is a training setting, as for python -m titan_v4.train (listed below).",
        add_help=False,  # --help also lists the training settings (tyro's help, torchtitan's fields)
        allow_abbrev=False,  # --o... is never --out: such arguments go to the trainer
        exit_on_error=False,
    )
    parser.add_argument(
        "--out", metavar="DIR", help="the dump folder (required): created if missing, must be writable; "
        "an earlier dump's block kinds are replaced; the run's own logs go to DIR/run/logs/",
    )  # fmt: skip
    parser.add_argument("-h", "--help", action="store_true", help="show this help and the training settings, and exit")
    return parser


_CONFIG_OPTIONS = ("--job.config_file", "--job.config-file", "--job.custom_config_module", "--job.custom-config-module")


def _print_help_and_exit(parser: argparse.ArgumentParser, training_args: list[str]) -> None:
    print(parser.format_help(), flush=True)
    print("Training settings:", flush=True)
    if not any(arg.split("=")[0] in _CONFIG_OPTIONS for arg in training_args):
        # Without a config that names it, torchtitan's help would leave out the [v4] section.
        training_args = ["--job.custom_config_module", "titan_v4.config", *training_args]
    ConfigManager().parse_args([*training_args, "--help"])  # tyro prints the fields and exits with 0


def parse_arguments(argv: list[str]) -> tuple[Path, list[str]]:
    """(the `--out` folder, created and writable; the training arguments). `--help` prints the
    help and exits with 0; a missing or unusable `--out` raises ToolArgumentError."""
    parser = _parser()
    try:
        known, training_args = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:  # "--out" without a value
        raise ToolArgumentError(str(e)) from None
    if known.help:
        _print_help_and_exit(parser, training_args)
    if not known.out:
        raise ToolArgumentError("--out is required: the folder the dumps go to (--help lists the options)")
    return prepare_out_dir(known.out), training_args


def force_dump_settings(job_config, steps_on_command_line: bool, out: Path) -> list[str]:
    """Set what a dump into `out` needs; return a note for each setting that changed."""
    notes = []
    dump_folder = str(out / RUN_FOLDER)
    if job_config.job.dump_folder != dump_folder:
        notes.append(f"job.dump_folder={dump_folder} (was {job_config.job.dump_folder})")
        job_config.job.dump_folder = dump_folder
    steps = job_config.training.steps
    if not steps_on_command_line or steps < MIN_STEPS:
        job_config.training.steps = MIN_STEPS
        notes.append(f"training.steps={MIN_STEPS} (was {steps})")
    compile_config = job_config.compile
    if not compile_config.enable:
        compile_config.enable = True
        notes.append("compile.enable=True")
    if "model" not in compile_config.components:
        compile_config.components = [*compile_config.components, "model"]
        notes.append("'model' added to compile.components")
    if job_config.checkpoint.enable:
        job_config.checkpoint.enable = False
        notes.append("checkpoint.enable=False")
    return notes


def _single_process_env() -> None:
    """Outside torchrun: the environment torch.distributed's env:// rendezvous reads, world size 1."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="localhost", MASTER_PORT=str(port))


def _kinds_in_order(recorder: GraphRecorder) -> list[str]:
    kinds = list(recorder.blocks)
    if any(g.kind == OUTSIDE_BLOCKS for g in recorder.graphs):
        kinds.append(OUTSIDE_BLOCKS)
    return kinds


def write_dump(out: Path, recorder: GraphRecorder, job_config, trainer: DumpTrainer, notes: list[str], error: str = "") -> None:
    """Write every kind's graphs and kernels.md, then index.md and profile.txt, under `out`;
    `error`: why the run stopped early (index.md then shows it; the kinds hold what was compiled)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in _kinds_in_order(recorder):
        graphs = [g for g in recorder.graphs if g.kind == kind]
        kind_dir = out / kind
        shutil.rmtree(kind_dir, ignore_errors=True)  # no stale graphs from an earlier dump
        kind_dir.mkdir()
        for i, graph in enumerate(graphs):
            suffix = "" if len(graphs) == 1 else f"_{i}"
            files = {f"dynamo_graph{suffix}.py": graph.code}
            for which in ("forward", "backward"):
                part = getattr(graph, which)
                if part is not None:
                    files[f"aot_{which}{suffix}.py"] = part.aot_graph
                    if part.output_code is not None:
                        files[f"inductor_{which}{suffix}.py"] = part.output_code
            for name, text in files.items():
                (kind_dir / name).write_text(text)
        inventory = KindInventory.build(
            kind, recorder.blocks.get(kind, []), recorder.inner_backend, graphs, recorder.graph_breaks[kind],
            recorder.fsdp_units_inside.get(kind, []),
        )  # fmt: skip
        (kind_dir / "kernels.md").write_text(inventory.markdown())
        rows.append(inventory.index_row(f"{kind}/kernels.md"))

    pd = trainer.parallel_dims
    header = [
        f"# Compiled blocks of {job_config.model.name} / {job_config.model.flavor}",
        "",
        f"- config: `{job_config.job.config_file}`; arguments: `{' '.join(sys.argv[1:])}`",
        f"- device: {trainer.device.type}; world {pd.world_size} (dp_replicate {pd.dp_replicate}, dp_shard "
        f"{pd.dp_shard}, ep {pd.ep}, pp {pd.pp}); activation checkpointing: {job_config.activation_checkpoint.mode}; "
        f"training.mixed_precision_param: {job_config.training.mixed_precision_param}",
        f"- backend: {recorder.inner_backend}; torch {torch.__version__}",
        f"- {job_config.training.steps} training steps: step 1 compiles, later compiles count as recompiles",
        f"- forced for the dump: {', '.join(notes) or 'nothing'}",
        "",
        INDEX_HEADER,
        *rows,
        "",
        "Each kind's folder holds `dynamo_graph.py`, `aot_forward.py`, `aot_backward.py`, "
        "`inductor_forward.py`, `inductor_backward.py` (Inductor only) and `kernels.md`. "
        "`profile.txt` lists step 2's ops and kernels by self time; `run/logs/train.log` is the run's log.",
    ]
    if error:
        # e.g. a graph break under fullgraph=True: dynamo's message names the op and the source line.
        header += ["", "## The run stopped with an error", "", "```", error.strip(), "```"]
    (out / "index.md").write_text("\n".join(header) + "\n")
    (out / "profile.txt").write_text(trainer.profile_table)


def main(argv: list[str] | None = None) -> None:
    try:
        out, args = parse_arguments(list(sys.argv[1:] if argv is None else argv))
    except ToolArgumentError as e:
        run_log.record_failure(e)  # dump_graphs.sh (run_train.sh) prints it as its last line
        raise SystemExit(f"dump_graphs: {e}") from None
    _single_process_env()
    init_logger()
    job_config = ConfigManager().parse_args(args)
    steps_given = any(a == "--training.steps" or a.startswith("--training.steps=") for a in args)
    notes = force_dump_settings(job_config, steps_given, out)
    recorder = GraphRecorder(job_config.compile.backend)
    job_config.compile.backend = graph_recorder.activate(recorder)
    logger.info(f"dump_graphs: forcing {', '.join(notes) or 'nothing'}; writing to {out}")
    trainer = None
    try:
        trainer = DumpTrainer(job_config, recorder)
        try:
            trainer.train()
        except Exception as e:
            if torch.distributed.get_rank() == 0:
                write_dump(out, recorder, job_config, trainer, notes, error=f"{type(e).__name__}: {e}")
                logger.error(f"dump_graphs: the run failed; what was compiled and the error are in {out / 'index.md'}")
            raise
        if torch.distributed.get_rank() == 0:
            write_dump(out, recorder, job_config, trainer, notes)
            logger.info(f"dump_graphs: wrote {out / 'index.md'}")
    finally:
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
