"""Start-up checks of the whole job config (torchtitan's sections and ``[v4]``).

torchtitan 0.2.2 takes most settings as given: a string-typed TOML number reaches a comparison
(``TypeError``), ``checkpoint.interval = 0`` divides by zero after step 1, negative steps trip an
assertion in the LR scheduler, an expert-parallel degree larger than the world builds a mesh of
size 0, and settings that titan_v4 does not read (``training.dataset``, ``model.tokenizer_path``)
are silently ignored. :func:`check_job_config` runs before anything is built (V4Trainer calls it
first thing in ``init_distributed``) and raises :class:`JobConfigError` with one message that
names the setting, the value and what is allowed.

The model-dependent check (an expert-parallel degree must divide the routed experts) is
``check_model_parallelism`` in titan_v4/infra/parallelize.py, run before anything is sharded.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from titan_v4.config import JobConfigError

#: torchtitan 0.2.2's ``training.dataset`` default; any other value would be ignored by titan_v4.
_TORCHTITAN_DEFAULT_DATASET = "c4_test"


def check_job_config(job_config, world_size: int) -> None:
    """Every start-up check that needs only the config and the number of processes."""
    check_types(job_config)
    _check_training(job_config)
    _check_checkpoint(job_config)
    _check_unused_settings(job_config)
    _check_parallelism(job_config, world_size)


# --- value types --------------------------------------------------------------------------------


def check_types(job_config) -> None:
    """Each field's value has its declared type (TOML ``lr = "1e-3"`` is a string, not a number)."""
    for section in dataclasses.fields(job_config):
        _check_dataclass_types(getattr(job_config, section.name), section.name)


def _check_dataclass_types(obj: Any, prefix: str) -> None:
    if not dataclasses.is_dataclass(obj):
        return
    try:
        hints = typing.get_type_hints(type(obj))
    except Exception:  # an annotation this Python cannot resolve: nothing to check against
        return
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            _check_dataclass_types(value, name)
            continue
        hint = hints.get(f.name)
        if hint is None or _fits(value, hint) is not False:
            continue
        hint_text = _describe(hint)
        message = f"{name}={value!r} is invalid: it is a {type(value).__name__}; allowed values are {hint_text}"
        if isinstance(value, str) and _is_number(value):
            message += f" (write it without quotes: {f.name} = {value})"
        raise JobConfigError(message)


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` has type ``hint``; None where the hint is too complex to judge."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        verdicts = [_fits(value, arg) for arg in typing.get_args(hint)]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    return None


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "integers", float: "numbers", str: "strings", type(None): "none"}
    if hint in names:
        return names[hint]
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return ", ".join(map(repr, typing.get_args(hint)))
    if origin in (list, tuple):
        return "lists"
    return str(hint)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- values -------------------------------------------------------------------------------------


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise JobConfigError(f"{name}={value!r} is invalid: allowed values are {allowed}")


def _check_training(job_config) -> None:
    t = job_config.training
    # 0 builds the model, loads any initial checkpoint and stops (benchmarks/checkpoint_load.py).
    _require(t.steps >= 0, "training.steps", t.steps, "integers >= 0 (0: build, load the checkpoint, stop)")
    _require(t.local_batch_size >= 1, "training.local_batch_size", t.local_batch_size, "integers >= 1")
    _require(t.seq_len >= 1, "training.seq_len", t.seq_len, "integers >= 1")
    gbs = t.global_batch_size
    _require(
        gbs == -1 or gbs >= 1, "training.global_batch_size", gbs, "-1 (= local batch x data-parallel degree) or >= 1"
    )
    _require(math.isfinite(t.max_norm) and t.max_norm > 0, "training.max_norm", t.max_norm, "finite numbers > 0")
    lr = job_config.optimizer.lr
    _require(math.isfinite(lr) and lr >= 0, "optimizer.lr", lr, "finite numbers >= 0")
    warmup = job_config.lr_scheduler.warmup_steps
    _require(warmup >= 0, "lr_scheduler.warmup_steps", warmup, "integers >= 0")
    _require(job_config.metrics.log_freq >= 1, "metrics.log_freq", job_config.metrics.log_freq, "integers >= 1")


def _check_checkpoint(job_config) -> None:
    c = job_config.checkpoint
    if not c.enable:
        return
    _require(c.interval >= 1, "checkpoint.interval", c.interval, "integers >= 1 (steps between checkpoints)")
    _require(
        c.keep_latest_k == 0 or c.keep_latest_k >= 2,
        "checkpoint.keep_latest_k",
        c.keep_latest_k,
        "0 (keep all) or integers >= 2 (the newest may still be being written)",
    )
    _require(c.load_step >= -1, "checkpoint.load_step", c.load_step, "-1 (the newest) or a saved step >= 0")


def _check_unused_settings(job_config) -> None:
    """torchtitan settings that titan_v4 does not read are refused rather than ignored."""
    t, m = job_config.training, job_config.model
    if t.dataset != _TORCHTITAN_DEFAULT_DATASET:
        raise JobConfigError(
            f"training.dataset={t.dataset!r} is not used by titan_v4: set v4.dataset "
            "('synthetic', 'local' or 'hub') and v4.dataset_path instead"
        )
    if t.dataset_path:
        raise JobConfigError(
            f"training.dataset_path={t.dataset_path!r} is not used by titan_v4: set v4.dataset and "
            "v4.dataset_path instead"
        )
    if m.tokenizer_path:
        raise JobConfigError(
            f"model.tokenizer_path={m.tokenizer_path!r} is not used by titan_v4 (torchtitan's deprecated "
            "name): set v4.tokenizer_path, or put the tokenizer.json in model.hf_assets_path"
        )
    if job_config.validation.enable:
        raise JobConfigError("validation.enable=True is not supported by titan_v4 yet: allowed value is false")
    unknown = sorted(set(job_config.compile.components) - {"model", "loss"})
    if unknown:
        raise JobConfigError(
            f"compile.components={job_config.compile.components!r} is invalid: {unknown} would be ignored; "
            "allowed entries are 'model' (each block) and 'loss' (each head's cross-entropy)"
        )


def _check_parallelism(job_config, world_size: int) -> None:
    p = job_config.parallelism
    degrees = {
        "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "context_parallel_degree": p.context_parallel_degree,
        "tensor_parallel_degree": p.tensor_parallel_degree,
        "pipeline_parallel_degree": p.pipeline_parallel_degree,
        "expert_parallel_degree": p.expert_parallel_degree,
        "expert_tensor_parallel_degree": p.expert_tensor_parallel_degree,
    }
    for name, degree in degrees.items():
        _require(degree >= 1, f"parallelism.{name}", degree, "integers >= 1")
    _require(
        p.context_parallel_degree == 1,
        "parallelism.context_parallel_degree",
        p.context_parallel_degree,
        "1: context parallelism is not implemented for DeepSeek-V4 yet (docs/long_context.md); "
        "a long sequence runs on one GPU per sequence, with full activation checkpointing",
    )
    shard = p.data_parallel_shard_degree
    _require(shard == -1 or shard >= 1, "parallelism.data_parallel_shard_degree", shard, "-1 (the rest) or >= 1")
    others = p.data_parallel_replicate_degree * p.context_parallel_degree
    others *= p.tensor_parallel_degree * p.pipeline_parallel_degree
    if shard == -1:
        if world_size % others:
            raise JobConfigError(
                f"parallelism: data_parallel_replicate_degree x context_parallel_degree x tensor_parallel_degree "
                f"x pipeline_parallel_degree = {others} does not divide the {world_size} processes: allowed "
                f"products are divisors of {world_size}"
            )
        shard = world_size // others
    elif shard * others != world_size:
        raise JobConfigError(
            f"parallelism.data_parallel_shard_degree={shard} is invalid: with the other degrees (product {others}) "
            f"it covers {shard * others} processes, but {world_size} are running; allowed values are "
            f"{world_size // others if world_size % others == 0 else 'none (change the other degrees)'} or -1"
        )
    ep = p.expert_parallel_degree
    ep_room = shard * p.context_parallel_degree * p.tensor_parallel_degree
    if ep > 1 and ep_room % ep:
        raise JobConfigError(
            f"parallelism.expert_parallel_degree={ep} is invalid: experts are spread over the data-parallel "
            f"shard x context x tensor ranks ({ep_room} here, of {world_size} processes); allowed values are "
            f"the divisors of {ep_room}"
        )
