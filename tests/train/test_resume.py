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
