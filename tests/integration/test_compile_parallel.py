"""Whole-block compile under data and expert parallelism, with two gloo processes: the dump tool
(titan_v4.tools.dump_graphs, through run_train.sh as dump_graphs.sh runs it) reports, for every
block kind, zero graph breaks and no recompile on the second step (the blocks are compiled with
fullgraph=True, so a break would also fail the run). Under EP the token all-to-alls are collectives
inside the block graphs. aot_eager keeps the runs short: graph breaks and recompiles are decided
by dynamo, before any backend."""

import re

import pytest

from tests.helpers.train_runner import run_train

KINDS = ("swa-hash", "csa-learned", "hca-learned", "mtp", "loss")
GRAPHS = {"loss": 2}  # the compiled cross-entropy: one graph per head's logits shape (S and S - 1 rows)


def dump(tmp_path, *args: str):
    out = tmp_path / "dump"
    run_train(
        "--out", str(out), "--compile.backend", "aot_eager",
        "--experimental.custom_import", "tests.helpers.tiny_flavor_plugin", "--model.flavor", "tiny",
        "--training.seq_len", "32", "--training.local_batch_size", "2", "--job.dump_folder", str(tmp_path / "job"),
        *args, nproc=2, module="titan_v4.tools.dump_graphs",
    )  # fmt: skip
    return out


def index_rows(out) -> dict[str, list[str]]:
    """kind -> [blocks, graph breaks, recompiles, ...] from index.md's table."""
    rows = {}
    for line in (out / "index.md").read_text().splitlines():
        match = re.match(r"\| \[([\w-]+)\]\([^)]*\) \| (.*) \|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def assert_whole_blocks(out) -> None:
    rows = index_rows(out)
    assert sorted(rows) == sorted(KINDS)
    for kind, (blocks, breaks, recompiles, *_) in rows.items():
        assert (breaks, recompiles) == ("0", "0"), f"{kind}: {breaks} graph breaks, {recompiles} recompiles"
        graphs = GRAPHS.get(kind, 1)
        assert f"{kind}: {len(blocks.split(', '))} block(s) ({blocks})\n  dynamo graphs {graphs}," in (out / kind / "kernels.md").read_text()


@pytest.mark.slow
def test_fsdp2_with_selective_op_checkpointing(tmp_path):
    out = dump(
        tmp_path, "--parallelism.data_parallel_shard_degree", "2",
        "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op",
    )  # fmt: skip
    assert_whole_blocks(out)


@pytest.mark.slow
def test_expert_parallel_with_fsdp2_and_full_checkpointing(tmp_path):
    out = dump(
        tmp_path, "--parallelism.data_parallel_shard_degree", "2", "--parallelism.expert_parallel_degree", "2",
        "--activation_checkpoint.mode", "full",
    )  # fmt: skip
    assert_whole_blocks(out)
    for kind in ("swa-hash", "csa-learned", "hca-learned", "mtp"):  # every MoE, the MTP block's included
        text = (out / kind / "kernels.md").read_text()
        # dispatch: counts + rows, combine: rows; the backward's reverse all-to-alls and the recompute.
        assert "_c10d_functional.all_to_all_single.default 3/5" in text
