"""End to end on the CPU (./run_train.sh, the debug config): the indexer phases switch across
checkpoint resumes (frozen -> dense -> warmup -> sparse, the optimizer state restored every time; the
warmup step moves nothing but the indexers), and in the sparse phase the logged indexer recall rises
above what a random top-k gets."""

import re

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.helpers.train_runner import run_train
from titan_v4.flavors import deepseek_v4_args

# Small and fast: 2 x 64 tokens per step, a checkpoint after every step.
SMALL = ("--training.seq_len", "64", "--training.local_batch_size", "2", "--checkpoint.interval", "1",
         "--checkpoint.keep_latest_k", "0", "--lr_scheduler.warmup_steps", "1", "--debug.seed", "0")  # fmt: skip
_TERMS = re.compile(r"step:\s*(\d+)\s+lm_loss: ([\d.]+).*?indexer_loss: ([\d.]+)\s+indexer_recall: ([\d.]+)")


def loss_terms(log: str) -> dict[int, tuple[float, float, float]]:
    """step -> (lm_loss, indexer_loss, indexer_recall) from the loss-term lines."""
    return {int(s): (float(lm), float(kl), float(r)) for s, lm, kl, r in _TERMS.findall(log)}


def model_weights(checkpoint) -> dict[str, torch.Tensor]:
    out = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, out)
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v) and not k.startswith(("optimizer", "lr_scheduler"))}


@pytest.mark.slow
def test_phases_switch_across_resumes(tmp_path):
    folder = ("--job.dump_folder", str(tmp_path))
    for step, phase in enumerate(["frozen", "dense", "warmup", "sparse"], start=1):
        run = run_train(*SMALL, *folder, "--training.steps", str(step), "--v4.indexer_phase", phase)
        assert sorted(run.loss) == [step], run.log[-3000:]
        if step > 1:
            assert f"resuming from the checkpoint of step {step - 1}" in run.log
        terms = loss_terms(run.log)
        assert (step in terms) == (phase != "frozen"), run.log[-3000:]  # frozen: no indexer terms

    ckpt = tmp_path / "checkpoint"
    before, after = model_weights(ckpt / "step-2"), model_weights(ckpt / "step-3")  # the warmup step
    indexer = [k for k in before if ".indexer." in k]
    assert indexer and set(before) == set(after)
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == (name in indexer), name
    frozen_start, dense_end = model_weights(ckpt / "step-1"), before
    assert all(not torch.equal(frozen_start[k], dense_end[k]) for k in indexer)  # the dense step trains it


def random_topk_recall(seq_len: int, ratio: int, k: int) -> float:
    """Expected recall of k entries picked at random: min(1, k / visible) per query with a visible entry."""
    shares = [min(1.0, k / ((t + 1) // ratio)) for t in range(seq_len) if (t + 1) // ratio]
    return sum(shares) / len(shares)


@pytest.mark.slow
def test_sparse_training_raises_the_recall_above_random(tmp_path):
    args = deepseek_v4_args["debugmodel"]
    seq_len, steps = 128, 60
    run = run_train(
        "--training.seq_len", str(seq_len), "--training.steps", str(steps), "--checkpoint.no-enable",
        "--v4.indexer_phase", "sparse", "--debug.seed", "0", "--job.dump_folder", str(tmp_path),
    )  # fmt: skip
    terms = loss_terms(run.log)
    assert sorted(terms) == list(range(1, steps + 1)), run.log[-3000:]
    random = random_topk_recall(seq_len, args.csa_ratio, args.index_topk)
    first = terms[1][2]
    last = sum(terms[s][2] for s in range(steps - 4, steps + 1)) / 5
    print(f"random top-k recall {random:.3f}; logged recall step 1 {first:.3f}, mean of the last 5 steps {last:.3f}")
    # Measured (CPU, this seed): random 0.593, step 1 0.588, last five steps 0.632. The margin is
    # small because the target itself is nearly uniform this early (KL ~0.04): an attention that has
    # barely learned to prefer some compressed entries leaves little to rank.
    assert abs(first - random) < 0.02  # an untrained indexer picks like a random one
    assert last > random + 0.03 and last > first + 0.03, {s: t[2] for s, t in terms.items()}
    assert terms[steps][1] < terms[1][1]  # the KL fell
