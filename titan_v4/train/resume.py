"""Which checkpoint a run resumes from, and whether it fits this run: checked before loading.

torchtitan 0.2.2 loads the newest ``step-N`` folder of ``checkpoint.folder`` that has a
``.metadata`` file and lets DCP find out the rest:

* a truncated data file makes every restart fail with ``CheckpointException ... EOFError``, no
  file named and no fallback; so does a file overwritten in place (same size);
* a checkpoint of a bigger model (more layers) loads into a smaller one without a word (DCP loads
  only the keys it is asked for);
* a change of data-parallel degree fails with ``Missing key ... dataloader.dp_rank_1`` or
  ``dataloader resharding is not supported yet``.

:func:`plan_resume` (called by V4Trainer before torchtitan's load) picks the newest *intact*
checkpoint: every data file the index points into must exist and be long enough, and every file
must match the checksums recorded when it was saved (:func:`record_checksums`,
titan_v4/checkpoint/checksums.py; ``v4.checkpoint_checksums``). A damaged one is
skipped with a warning that names the file; an explicit ``checkpoint.load_step`` that is damaged is
an error. The chosen checkpoint must then fit: the same tensors and shapes as the whole model (under
pipeline parallelism every rank's stages together, so a checkpoint written with or without
pipelining, with any degree or schedule, resumes), a full (not model-only) checkpoint, and the same
data-parallel degree, unless ``dataloader`` is in ``checkpoint.exclude_from_loading`` (then the data
restarts from its beginning). torchtitan's seed checkpoint (``step-0``, written by
``--checkpoint.create_seed_checkpoint``) is the exception: torchtitan loads step 0 as the model only,
so it starts a run of any layout in its folder. Each refusal says how to go on. Global rank 0
decides and broadcasts, so all ranks load the same step.
"""

from __future__ import annotations

import functools
import os
import re
from concurrent.futures import Future

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torchtitan.tools.logging import logger

from titan_v4.checkpoint import checksums

_STEP_DIR = re.compile(r"^step-(\d+)$")


class ResumeError(RuntimeError):
    """The checkpoint to resume from is damaged or does not fit this run; the message says how to go on."""


def find_damage(path: str) -> str | None:
    """Why the DCP checkpoint at ``path`` cannot be read (naming the file), or None if it looks intact.

    Reads only the index (``.metadata``) and the data files' sizes, not their contents.
    """
    meta = os.path.join(path, ".metadata")
    if not os.path.isfile(meta):
        return f"{meta} is missing (the save was interrupted)"
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # truncated or overwritten pickle
        return f"{meta} cannot be read ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for relative, size in sorted(needed.items()):
        file = os.path.join(path, relative)
        if not os.path.isfile(file):
            return f"{file} is missing"
        actual = os.path.getsize(file)
        if actual < size:
            return f"{file} is truncated ({actual} bytes; the index needs {size})"
    return None


def _steps(folder: str) -> list[int]:
    """Every step-N folder, newest first."""
    if not os.path.isdir(folder):
        return []
    found = [int(m.group(1)) for name in os.listdir(folder) if (m := _STEP_DIR.match(name))]
    return sorted(found, reverse=True)


def _fit_problems(
    path: str, step: int, model_shapes: dict[str, tuple[int, ...]], other_states: set[str], dp_degree: int,
    exclude: list[str],
) -> list[str]:
    """Why the checkpoint ``step`` at ``path`` does not fit this run (empty if it does).

    model_shapes: every tensor of the whole model (all pipeline stages) -> its global shape.
    """
    saved = FileSystemReader(path).read_metadata().state_dict_metadata
    prefixes = tuple(f"{name}." for name in other_states)
    saved_model = {k: v for k, v in saved.items() if not k.startswith(prefixes)}
    problems = []

    extra = sorted(set(saved_model) - set(model_shapes))
    missing = sorted(set(model_shapes) - set(saved_model))
    shapes = [
        f"{k} is {list(saved_model[k].size)} there and {list(model_shapes[k])} here"
        for k in sorted(set(saved_model) & set(model_shapes))
        if isinstance(saved_model[k], TensorStorageMetadata) and tuple(saved_model[k].size) != model_shapes[k]
    ]
    if extra:
        problems.append(f"it holds {len(extra)} model tensors this model lacks ({_some(extra)})")
    if missing:
        problems.append(f"it lacks {len(missing)} tensors of this model ({_some(missing)})")
    if shapes:
        problems.append(f"{len(shapes)} tensor shapes differ ({_some(shapes)})")
    if problems:
        problems = [
            "it was saved from a model of another shape: " + "; ".join(problems) + ". Resume with the "
            "--model.flavor (and model settings) that saved it, or start afresh in a new --job.dump_folder"
        ]
        return problems
    if step == 0:
        return []  # a seed checkpoint: torchtitan loads step 0 as the model only

    if (
        "optimizer" in other_states
        and "optimizer" not in exclude
        and not any(k.startswith("optimizer.") for k in saved)
    ):
        return [
            "it holds only the model (checkpoint.last_save_model_only), not the optimizer and data "
            "position a resume needs. To train from its weights, start in a new --job.dump_folder with "
            f"--checkpoint.initial_load_path {path} --checkpoint.initial_load_model_only"
        ]

    saved_dp = sum(1 for k in saved if k.startswith("dataloader.dp_rank_"))
    if "dataloader" not in exclude and saved_dp and saved_dp != dp_degree:
        problems.append(
            f"it was saved with data-parallel degree {saved_dp} and this run has {dp_degree}: the data "
            "position is kept per data-parallel rank and cannot be resharded. Resume with data-parallel "
            f"degree {saved_dp}; or keep the model and optimizer and restart the data from its beginning "
            "with --checkpoint.exclude_from_loading dataloader; or start afresh in a new --job.dump_folder"
        )
    return problems


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _decide(
    checkpointer, model_shapes: dict[str, tuple[int, ...]], load_step: int, dp_degree: int, exclude: list[str],
    corrupted: dict[int, str],
) -> tuple[int, list[str], str | None]:
    """(step to load or -1, warnings, error) for global rank 0; ``corrupted``: step -> why its files
    do not match their checksums."""
    folder = checkpointer.folder
    steps = _steps(folder)
    if load_step != -1:
        steps = [load_step] if load_step in steps else []
        if not steps:
            return (
                -1,
                [],
                f"checkpoint.load_step={load_step}: {os.path.join(folder, f'step-{load_step}')} does not exist",
            )
    warnings, damaged = [], []
    other_states = {name for name in checkpointer.states if name != "model"}
    for step in steps:
        path = os.path.join(folder, f"step-{step}")
        damage = find_damage(path) or corrupted.get(step)
        if damage is not None and damage.endswith("(the save was interrupted)") and load_step == -1:
            warnings.append(f"titan_v4: {path} is incomplete ({damage}); it is ignored")
            continue
        if damage is not None:
            if load_step != -1:
                return -1, warnings, f"checkpoint.load_step={load_step}: checkpoint {path} is damaged: {damage}"
            damaged.append(path)
            warnings.append(
                f"titan_v4: checkpoint {path} is damaged: {damage}; falling back to the previous checkpoint"
            )
            continue
        problems = _fit_problems(path, step, model_shapes, other_states, dp_degree, exclude)
        if problems:
            return -1, warnings, f"checkpoint {path} cannot be resumed by this run: " + " ".join(problems)
        return step, warnings, None
    if damaged:
        return (
            -1,
            warnings,
            (
                f"no intact checkpoint in {folder} (damaged: {', '.join(damaged)}): move the damaged folders "
                "away, or start afresh in a new --job.dump_folder"
            ),
        )
    return -1, warnings, None


def _whole_model_shapes(model) -> dict[str, tuple[int, ...]]:
    """Every tensor of the whole model -> its global shape, on every rank.

    Under pipeline parallelism a rank holds its stages' tensors only (FSDP / EP shards report their
    global shapes), so each rank's names and shapes are gathered from every rank.
    """
    state = model.state_dict()  # on every rank: may be collective
    shapes = {name: tuple(value.shape) for name, value in state.items() if isinstance(value, torch.Tensor)}
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, shapes)
        shapes = {name: shape for rank_shapes in gathered for name, shape in rank_shapes.items()}
    return shapes


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _corrupted_checkpoints(folder: str, load_step: int) -> dict[int, str]:
    """step -> why its files do not match the checksums recorded at its save, for the checkpoints a
    resume would try: newest first (or ``load_step`` alone), up to the first that matches. Every rank
    reads its share of each checkpoint's files and all ranks get the same answer."""
    rank, world_size = _rank_and_world()
    found = {}
    for step in _steps(folder) if load_step == -1 else [load_step]:
        path = os.path.join(folder, f"step-{step}")
        if not os.path.isdir(path) or find_damage(path) is not None:
            continue  # missing, incomplete or truncated: _decide says so
        mine = checksums.find_corruption(path, rank, world_size)
        problems = [mine]
        if world_size > 1:
            problems = [None] * world_size
            dist.all_gather_object(problems, mine)
        problem = next((p for p in problems if p is not None), None)
        if problem is None:
            break
        found[step] = problem
    return found


def plan_resume(checkpointer, job_config, dp_degree: int, verify_checksums: bool = True) -> int:
    """The ``step`` to pass to ``checkpointer.load`` (-1: nothing to resume); raises ResumeError.
    With ``verify_checksums``, files that no longer match the checksums recorded at their save
    (titan_v4/checkpoint/checksums.py) make their checkpoint damaged."""
    c = job_config.checkpoint
    if not checkpointer.enable or not os.path.isdir(getattr(checkpointer, "folder", "")):
        return c.load_step
    if c.load_step == 0:
        return 0  # a seed checkpoint: model only, torchtitan's own path
    decision = [None]
    model_shapes = _whole_model_shapes(checkpointer.states["model"])
    corrupted = _corrupted_checkpoints(checkpointer.folder, c.load_step) if verify_checksums else {}
    if not dist.is_initialized() or dist.get_rank() == 0:
        exclude = list(c.exclude_from_loading)
        decision = [_decide(checkpointer, model_shapes, c.load_step, dp_degree, exclude, corrupted)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    step, warnings, error = decision[0]
    for warning in warnings:
        logger.warning(warning)
    if error is not None:
        raise ResumeError(error)
    return step


def record_checksums(checkpointer) -> None:
    """After each checkpoint save of ``checkpointer`` (torchtitan's CheckpointManager) completes,
    this rank records the checksums of its share of the checkpoint's files (an asynchronous save:
    when its upload completes). Saves in HF safetensors (``last_save_in_hf``) are exports, not
    checkpoints a run resumes from, and get none."""
    save = checkpointer.dcp_save

    @functools.wraps(save)
    def save_and_record(state_dict, checkpoint_id, *args, **kwargs):
        result = save(state_dict, checkpoint_id, *args, **kwargs)
        to_hf = kwargs.get("to_hf", args[2] if len(args) > 2 else False)
        if to_hf or os.path.dirname(os.path.normpath(checkpoint_id)) != os.path.normpath(checkpointer.folder):
            return result
        write = functools.partial(checksums.write_checksums, checkpoint_id, *_rank_and_world())
        upload = getattr(result, "upload_completion", result)  # async: an AsyncSaveResponse or a Future
        if isinstance(upload, Future):
            upload.add_done_callback(lambda done: write() if done.exception() is None else None)
        else:  # a synchronous save has completed (it returns the checkpoint's Metadata)
            write()
        return result

    checkpointer.dcp_save = save_and_record


def purge_after_final_save(checkpointer) -> None:
    """Apply ``checkpoint.keep_latest_k`` after the last step's save too (torchtitan 0.2.2 does not)."""
    if getattr(checkpointer, "enable", False) and getattr(checkpointer, "keep_latest_k", 0) > 0:
        checkpointer._purge_stale_checkpoints()
