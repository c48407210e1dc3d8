"""End to end on the CPU (./run_train.sh, the debug config): the indexer phases switch across
checkpoint resumes (frozen -> dense -> warmup -> sparse, the optimizer state restored every time; the
warmup step moves nothing but the indexers), and sparse-phase training moves the indexer's recall from
a random top-k's toward the best top-k's."""

import re

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torchtitan.components.tokenizer import HuggingFaceTokenizer

import custom_ops
from tests.helpers.train_runner import run_train
from titan_v4.data.dataset import ASSETS_DIR, PackedDocumentDataset, load_synthetic_documents
from titan_v4.flavors import deepseek_v4_args
from titan_v4.model.attention import Attention
from titan_v4.model.model import DeepSeekV4Model

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


def recall_against_best(model: DeepSeekV4Model, tokens: torch.Tensor) -> list[tuple[float, float, float]]:
    """Per CSA layer on ``tokens``: (the indexer's recall, the best top-k's recall, a random top-k's).

    All three are shares of the same teacher mass (the attention's head-summed mass over every visible
    entry, from its own lse): the indexer's selection, the k entries with the most mass (no selection of
    k entries can keep more), and ``min(1, k / visible)``; each averaged over the queries that see an entry.
    """
    rows = []

    @torch.no_grad()
    def measure(layer, out, queries, q, pool, lse, sink, topk, scale, doc_ids):
        log_mass, log_visible = custom_ops.indexer_teacher(q, pool, lse, sink, None, scale=scale, ratio=layer.ratio)
        k, has_entry = layer.indexer.topk, torch.isfinite(log_visible)
        picked = torch.where(topk >= 0, log_mass.gather(-1, topk.clamp_min(0)), float("-inf"))
        best = log_mass.topk(min(k, log_mass.shape[-1]), dim=-1).values
        shares = (
            (picked.logsumexp(-1) - log_visible).exp(),
            (best.logsumexp(-1) - log_visible).exp(),
            (k / torch.isfinite(log_mass).sum(-1).clamp_min(1)).clamp_max(1.0),
        )
        rows.append(tuple(float(share[has_entry].mean()) for share in shares))
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Attention, "_attach_indexer_loss", measure)  # called where the KL would be
        model(tokens)  # with gradients enabled: the attention computes its KL only when training
    return rows


def corpus_batch(seq_len: int, batch: int) -> torch.Tensor:
    """The first ``batch`` windows of the shipped corpus, as the debug run reads them."""
    windows = iter(PackedDocumentDataset(load_synthetic_documents(), HuggingFaceTokenizer(ASSETS_DIR), seq_len))
    return torch.stack([next(windows)[0]["input"] for _ in range(batch)])


@pytest.mark.slow
def test_sparse_training_raises_the_recall_toward_the_best_topk(tmp_path):
    """The indexer trained in the sparse phase keeps much more of the attention's mass than a random
    top-k, measured against the most any top-k could keep; a fresh indexer keeps no more than random."""
    seq_len, steps = 128, 60
    args = deepseek_v4_args["debugmodel"].replace(indexer_phase="sparse", max_seq_len=seq_len)
    run = run_train(
        "--training.seq_len", str(seq_len), "--training.steps", str(steps), "--checkpoint.interval", str(steps),
        "--v4.indexer_phase", "sparse", "--debug.seed", "0", "--job.dump_folder", str(tmp_path),
    )  # fmt: skip
    terms = loss_terms(run.log)
    assert sorted(terms) == list(range(1, steps + 1)), run.log[-3000:]
    assert terms[steps][1] < terms[1][1]  # the logged KL fell

    trained, fresh = DeepSeekV4Model(args), DeepSeekV4Model(args)
    trained.load_state_dict(model_weights(tmp_path / "checkpoint" / f"step-{steps}"))
    torch.manual_seed(0)
    fresh.init_weights()
    tokens = corpus_batch(seq_len, batch=8)
    rows = {"trained": recall_against_best(trained, tokens), "fresh": recall_against_best(fresh, tokens)}
    gap_closed = {}
    for name, layers in rows.items():
        mine, best, random = (sum(col) / len(col) for col in zip(*layers))
        gap_closed[name] = (mine - random) / (best - random)
        print(f"{name}: recall {mine:.3f}, best top-k {best:.3f}, random top-k {random:.3f}, gap closed {gap_closed[name]:.0%}")
    # Measured (CPU, this seed): trained recall 0.638, best 0.685, random 0.593 (49 % of the gap closed);
    # fresh about 0.59, best 0.72, random 0.593 (about -5 %). The logged recall rises from 0.588 to about 0.63.
    assert gap_closed["trained"] > 0.3, rows
    assert abs(gap_closed["fresh"]) < 0.15, rows  # an untrained indexer picks like a random one
