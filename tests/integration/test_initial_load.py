"""torchtitan's own initial-load path (`[checkpoint] initial_load_path` + `initial_load_in_hf`) on 2
CPU processes: an official-layout FP8 / FP4 checkpoint loads under FSDP2 and under EP into the
same weights as a single process.

Each run loads, trains one step at learning rate 0 (weights unchanged; the learned layers' expert
bias moves by at most 2 x the bias-update speed, the same way in both runs) and saves the model."""

import re

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.helpers.initial_load import load_like_torchtitan
from tests.helpers.official_checkpoint import official_weights, write_official
from tests.helpers.train_runner import run_train
from titan_v4.checkpoint.hf_config import hf_config_from_args
from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.model import DeepSeekV4Model

ARGS = deepseek_v4_args["debugmodel"].replace(max_seq_len=64)
LOAD = ("--checkpoint.initial_load_in_hf", "--checkpoint.initial_load_model_only", "--checkpoint.last_save_model_only")
RUN = ("--training.steps", "1", "--training.seq_len", "64", "--training.local_batch_size", "2", "--optimizer.lr", "0",
       "--checkpoint.interval", "1", "--debug.seed", "0")  # fmt: skip


def saved_model(folder) -> dict[str, torch.Tensor]:
    state = DeepSeekV4Model(ARGS).state_dict()
    dcp.load(state, checkpoint_id=str(folder / "checkpoint" / "step-1"), no_dist=True)
    return state


@pytest.mark.slow
def test_official_checkpoint_loads_the_same_under_fsdp2_and_ep(tmp_path):
    official = tmp_path / "official"
    write_official(official, ARGS, official_weights(ARGS, seed=3), config=hf_config_from_args(ARGS))
    torch.manual_seed(0)
    reference = DeepSeekV4Model(ARGS)
    reference.init_weights()
    load_like_torchtitan(reference, official)
    expected = reference.state_dict()
    model_bytes = sum(v.numel() * v.element_size() for v in expected.values())

    saved = {}
    for name, layout in {"fsdp2": ("--parallelism.data_parallel_shard_degree", "2"), "ep2": ("--parallelism.expert_parallel_degree", "2")}.items():
        run = run_train(*RUN, *LOAD, *layout, "--checkpoint.initial_load_path", str(official), "--job.dump_folder", str(tmp_path / name), nproc=2)
        assert f"checkpoint {official}: official layout" in run.log, run.log[-3000:]
        # Rank 0 reads only what it owns: about half of the model.
        loaded = float(re.search(r"checkpoint: loaded \d+ tensor slices \(([\d.]+) GiB", run.log).group(1)) * 2**30
        assert 0.3 * model_bytes < loaded < 0.6 * model_bytes, (name, loaded, model_bytes)
        saved[name] = saved_model(tmp_path / name)

    coeff = ARGS.load_balance_coeff
    learned_bias = {f"layers.{i}.moe.expert_bias" for i in range(ARGS.n_hash_layers, ARGS.n_layers)} | {"mtp.0.moe.expert_bias"}
    for name, state in saved.items():
        assert sorted(state) == sorted(expected)
        for key, value in expected.items():
            if key in learned_bias:
                assert (state[key] - value).abs().max() <= 2 * coeff + 1e-7, (name, key)
                assert torch.equal(state[key], saved["fsdp2"][key]), (name, key)
            else:
                assert torch.equal(state[key], value), (name, key)
