"""titan_v4.train.resume: the checkpoint a run resumes from is intact and fits, or the run is told
why (torchtitan 0.2.2: EOFError without a file name, a silent load into a smaller model, or
"Missing key ... dataloader.dp_rank_1")."""

import logging
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp

from titan_v4.train.resume import ResumeError, find_damage, plan_resume


def _model_state(layers=2, width=4):
    state = {f"layers.{i}.w": torch.full((width, width), float(i)) for i in range(layers)}
    state["out.w"] = torch.ones(3, width)
    return state


def _save(folder, step, *, layers=2, width=4, dp=1, model_only=False):
    state = dict(_model_state(layers, width))
    if not model_only:
        state["optimizer"] = {"state": {k: {"exp_avg": torch.zeros_like(v)} for k, v in _model_state(layers, width).items()}}
        state["dataloader"] = {**{f"dp_rank_{r}": b"position" for r in range(dp)}, "world_size": dp}
        state["train_state"] = {"step": step}
        state["lr_scheduler"] = {"last_epoch": step}
    path = os.path.join(folder, f"step-{step}")
    dcp.save(state, checkpoint_id=path)
    return path


class _Model:
    def __init__(self, state):
        self._state = state

    def state_dict(self):
        return self._state


def _checkpointer(folder, **model_kwargs):
    states = {name: object() for name in ("train_state", "optimizer", "dataloader", "lr_scheduler")}
    states["model"] = _Model(_model_state(**model_kwargs))
    return SimpleNamespace(enable=True, folder=str(folder), states=states, keep_latest_k=0)


def _job(load_step=-1, exclude=()):
    return SimpleNamespace(checkpoint=SimpleNamespace(load_step=load_step, exclude_from_loading=list(exclude)))


def _data_file(path):
    return os.path.join(path, next(f for f in os.listdir(path) if f.endswith(".distcp")))


def test_the_newest_intact_checkpoint_is_chosen(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    assert plan_resume(_checkpointer(tmp_path), _job(), dp_degree=1) == 4
    assert find_damage(str(tmp_path / "step-4")) is None


def test_a_truncated_newest_checkpoint_falls_back_with_a_warning_naming_the_file(tmp_path, caplog):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    data = _data_file(newest)
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with caplog.at_level(logging.WARNING):
        assert plan_resume(_checkpointer(tmp_path), _job(), dp_degree=1) == 2
    assert f"checkpoint {newest} is damaged: {data} is truncated" in caplog.text
    assert "falling back to the previous checkpoint" in caplog.text


def test_a_truncated_index_is_damage_too_and_an_explicit_damaged_step_is_an_error(tmp_path):
    newest = _save(tmp_path, 4)
    with open(os.path.join(newest, ".metadata"), "r+b") as f:
        f.truncate(10)
    assert "cannot be read" in find_damage(newest)
    with pytest.raises(ResumeError, match=f"checkpoint.load_step=4: checkpoint {newest} is damaged"):
        plan_resume(_checkpointer(tmp_path), _job(load_step=4), dp_degree=1)
    with pytest.raises(ResumeError, match="no intact checkpoint in"):
        plan_resume(_checkpointer(tmp_path), _job(), dp_degree=1)


def test_an_interrupted_save_is_ignored(tmp_path, caplog):
    _save(tmp_path, 2)
    os.remove(os.path.join(_save(tmp_path, 4), ".metadata"))
    with caplog.at_level(logging.WARNING):
        assert plan_resume(_checkpointer(tmp_path), _job(), dp_degree=1) == 2
    assert "step-4 is incomplete" in caplog.text


def test_a_checkpoint_of_another_model_shape_is_refused_by_name(tmp_path):
    _save(tmp_path, 2, layers=4)
    with pytest.raises(ResumeError, match=r"another shape: it holds 2 model tensors this model lacks \(layers.2.w, layers.3.w\)"):
        plan_resume(_checkpointer(tmp_path, layers=2), _job(), dp_degree=1)
    with pytest.raises(ResumeError, match=r"it lacks 2 tensors of this model"):
        plan_resume(_checkpointer(tmp_path, layers=6), _job(), dp_degree=1)
    with pytest.raises(ResumeError, match=r"5 tensor shapes differ \(layers.0.w is \[4, 4\] there and \[8, 8\] here"):
        plan_resume(_checkpointer(tmp_path, layers=4, width=8), _job(), dp_degree=1)


def test_a_change_of_data_parallel_degree_is_refused_with_the_ways_forward(tmp_path):
    _save(tmp_path, 2, dp=1)
    with pytest.raises(ResumeError, match=r"saved with data-parallel degree 1 and this run has 2.*exclude_from_loading dataloader.*new --job.dump_folder"):
        plan_resume(_checkpointer(tmp_path), _job(), dp_degree=2)
    # Restarting the data position is a choice the user can make explicitly.
    assert plan_resume(_checkpointer(tmp_path), _job(exclude=["dataloader"]), dp_degree=2) == 2


def test_a_model_only_checkpoint_cannot_be_resumed(tmp_path):
    _save(tmp_path, 2, model_only=True)
    with pytest.raises(ResumeError, match="holds only the model.*initial_load_path"):
        plan_resume(_checkpointer(tmp_path), _job(), dp_degree=1)


def test_nothing_to_resume(tmp_path):
    assert plan_resume(_checkpointer(tmp_path / "missing"), _job(), dp_degree=1) == -1
    assert plan_resume(_checkpointer(tmp_path), _job(), dp_degree=1) == -1


def test_a_seed_checkpoint_in_the_folder_is_loaded_as_the_model_only(tmp_path):
    """torchtitan's seed checkpoint (step-0, model only) starts a run in its folder with no flag; it
    must still fit the model."""
    _save(tmp_path, 0, model_only=True)
    assert plan_resume(_checkpointer(tmp_path), _job(), dp_degree=1) == 0
    assert plan_resume(_checkpointer(tmp_path), _job(), dp_degree=2) == 0  # no data position in it
    with pytest.raises(ResumeError, match="another shape"):
        plan_resume(_checkpointer(tmp_path, layers=3), _job(), dp_degree=1)


def _resume_as_one_pipeline_stage(rank: int, folder: str, init_file: str, layers: int, results) -> None:
    """One of two gloo ranks, each holding half of the model's layers (the last rank also `out.w`),
    like two pipeline stages; records what plan_resume answered."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        whole = _model_state(layers)
        mine = {k: v for k, v in whole.items() if (k.startswith("layers.") and int(k.split(".")[1]) % 2 == rank)
                or (k == "out.w" and rank == 1)}  # fmt: skip
        checkpointer = _checkpointer(folder)
        checkpointer.states["model"] = _Model(mine)
        try:
            results[rank] = plan_resume(checkpointer, _job(), dp_degree=1)
        except ResumeError as e:
            results[rank] = str(e)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("saved_layers, expected", [(4, 2), (6, "it holds 2 model tensors this model lacks")])
def test_pipeline_stages_are_checked_against_the_whole_model(tmp_path, saved_layers, expected):
    """Under pipeline parallelism each rank holds part of the model: a checkpoint of the whole model
    (saved with or without pipelining) fits, one of a bigger model does not."""
    import torch.multiprocessing as mp

    _save(tmp_path / "ckpt", 2, layers=saved_layers)
    results = mp.Manager().dict()
    mp.spawn(_resume_as_one_pipeline_stage, args=(str(tmp_path / "ckpt"), str(tmp_path / "init"), 4, results), nprocs=2)
    for rank in (0, 1):
        if isinstance(expected, int):
            assert results[rank] == expected
        else:
            assert expected in results[rank]


def test_a_newest_checkpoint_changed_in_place_falls_back_naming_the_file(tmp_path, caplog):
    """Same size, other bytes: only the checksums recorded at the save tell (titan_v4/checkpoint/checksums.py)."""
    from titan_v4.checkpoint.checksums import write_checksums

    for step in (2, 4):
        write_checksums(_save(tmp_path, step), 0, 1)
    newest = str(tmp_path / "step-4")
    data = _data_file(newest)
    size = os.path.getsize(data)
    with open(data, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\x00\xff" * 8)
    assert os.path.getsize(data) == size
    with caplog.at_level(logging.WARNING):
        assert plan_resume(_checkpointer(tmp_path), _job(), dp_degree=1) == 2
    assert f"checkpoint {newest} is damaged: {data} was changed after the save" in caplog.text
    with pytest.raises(ResumeError, match=f"checkpoint.load_step=4: checkpoint {newest} is damaged: {data} was changed"):
        plan_resume(_checkpointer(tmp_path), _job(load_step=4), dp_degree=1)
    # With the check off (v4.checkpoint_checksums = false) the newest is taken as before.
    assert plan_resume(_checkpointer(tmp_path), _job(), dp_degree=1, verify_checksums=False) == 4
