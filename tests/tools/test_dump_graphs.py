"""titan_v4.tools.dump_graphs: its command line (fast: refused or answered before any model is
built), and (slow) a dump on the CPU with Inductor: the files of every block kind, the run's own
logs under --out, and each kind's inventory pinned as expected text (graph breaks and recompiles 0,
custom ops, generated kernel, extern call and GEMM counts, GEMM dtypes). A change in what a block
compiles to shows up as a diff of that text; after a deliberate change, re-accept it with
``EXPECTTEST_ACCEPT=1 python -m pytest tests/tools/test_dump_graphs.py``.

One dump for the whole module: Inductor's C++ compile of the four block kinds takes minutes on two
cores.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from expecttest import assert_expected_inline

from tests.helpers.train_runner import run_train
from tests.helpers.unwritable import unwritable_folder

REPO = Path(__file__).resolve().parents[2]
KINDS = ("swa-hash", "csa-learned", "hca-learned", "mtp")
FILES = ("dynamo_graph.py", "aot_forward.py", "aot_backward.py", "inductor_forward.py", "inductor_backward.py", "kernels.md")
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
# A quick dump of the tiny model: what the command-line tests would run if the tool did not stop first.
TINY_MODEL = ("--experimental.custom_import", "tests.helpers.tiny_flavor_plugin", "--model.flavor", "tiny",
              "--training.seq_len", "32", "--training.local_batch_size", "2", "--compile.backend", "aot_eager")  # fmt: skip
TINY = ("--job.config_file", str(REPO / "train_configs" / "debug.toml"), *TINY_MODEL)


def dump_graphs(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m titan_v4.tools.dump_graphs *args`` on the CPU; stdout and stderr together."""
    return subprocess.run(
        [sys.executable, "-m", "titan_v4.tools.dump_graphs", *args],
        cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize("args", [["--help"], ["--out", "x", "--help"]], ids=["help", "out-and-help"])
def test_help_lists_the_tools_own_options_first_then_the_training_settings(tmp_path, args):
    proc = dump_graphs(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    text = proc.stdout
    assert text.startswith("usage: python -m titan_v4.tools.dump_graphs"), text[:2000]
    assert -1 < text.index("--out DIR") < text.index("--job.config-file") < text.index("--v4.dataset "), text[:4000]
    assert list(tmp_path.iterdir()) == []  # the help creates nothing


def test_an_out_that_is_a_file_is_refused_before_anything_is_built(tmp_path):
    a_file = tmp_path / "README.md"
    a_file.write_text("not a folder\n")
    proc = dump_graphs("--out", str(a_file), *TINY, "--job.dump_folder", str(tmp_path / "job"), timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout, proc.stdout[-4000:]
    assert proc.stdout.rstrip().splitlines()[-1] == (
        f"dump_graphs: --out={str(a_file)!r} is invalid: it is a file; allowed values are a folder that exists "
        "or can be created, and that this user can write to"
    )
    assert a_file.read_text() == "not a folder\n" and not (tmp_path / "job").exists()  # nothing started


def test_an_out_that_cannot_be_written_is_refused_before_anything_is_built(tmp_path):
    out, reason = unwritable_folder(tmp_path)
    problem = "cannot be written to" if out.exists() else "cannot be created"
    proc = dump_graphs("--out", str(out), *TINY, "--job.dump_folder", str(tmp_path / "job"), timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout, proc.stdout[-4000:]
    assert proc.stdout.rstrip().splitlines()[-1] == (
        f"dump_graphs: --out={str(out)!r} is invalid: the folder {problem} ({reason}); allowed values are a folder "
        "that exists or can be created, and that this user can write to"
    )
    assert not (tmp_path / "job").exists()


def test_a_bad_out_is_the_last_line_of_dump_graphs_sh(tmp_path):
    a_file = tmp_path / "README.md"
    a_file.write_text("")
    run = run_train("--out", str(a_file), *TINY, "--job.dump_folder", str(tmp_path / "job"),
                    module="titan_v4.tools.dump_graphs", check=False, timeout=300)  # fmt: skip
    assert run.returncode != 0
    assert run.last_line == (
        f"titan_v4: training failed (exit code 1), rank 0: ToolArgumentError: --out={str(a_file)!r} is invalid: it is a "
        "file; allowed values are a folder that exists or can be created, and that this user can write to"
    )


TRAINING_RUN_FILES = {"logs/train.log": "the training run's log\n", "logs/metrics.jsonl": '{"step": 1, "loss": 10.5}\n'}


def make_training_folder(folder: Path) -> Path:
    """The dump folder of a training run, with the logs that run left there (TRAINING_RUN_FILES)."""
    for name, text in TRAINING_RUN_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def files_in(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}


def config_naming(training_folder: Path, config: Path) -> Path:
    """A copy of train_configs/debug.toml at `config` whose job.dump_folder is `training_folder`."""
    toml = (REPO / "train_configs" / "debug.toml").read_text()
    config.write_text(toml.replace('dump_folder = "./outputs/debug"', f'dump_folder = "{training_folder}"'))
    assert str(training_folder) in config.read_text()
    return config


def test_a_dump_that_fails_at_start_up_logs_under_out_not_into_the_configs_training_folder(tmp_path):
    training_folder = make_training_folder(tmp_path / "training_run")
    config = config_naming(training_folder, tmp_path / "debug.toml")
    # A negative learning rate is refused at start-up: the log file is open by then, the model not built.
    out = tmp_path / "dump"
    proc = dump_graphs("--out", str(out), "--job.config_file", str(config), *TINY_MODEL, "--optimizer.lr", "-1")
    assert proc.returncode != 0 and "optimizer.lr=-1.0 is invalid" in proc.stdout, proc.stdout[-4000:]
    assert files_in(training_folder) == TRAINING_RUN_FILES
    assert f"titan_v4: logging to {out / 'run' / 'logs' / 'train.log'}" in proc.stdout
    assert "Starting job: DeepSeek-V4 debug model" in (out / "run" / "logs" / "train.log").read_text()


@pytest.fixture(scope="module")
def training_folder(tmp_path_factory) -> Path:
    """A training run's dump folder, named as job.dump_folder by the dump's config."""
    return make_training_folder(tmp_path_factory.mktemp("training_run"))


@pytest.fixture(scope="module")
def dump(tmp_path_factory, training_folder) -> Path:
    out = tmp_path_factory.mktemp("dump")
    config = config_naming(training_folder, tmp_path_factory.mktemp("config") / "debug.toml")
    args = [
        "--out", str(out), "--job.config_file", str(config), "--experimental.custom_import", "tests.helpers.tiny_flavor_plugin",
        "--model.flavor", "tiny", "--training.seq_len", "32", "--training.local_batch_size", "2",
        "--debug.seed", "0", "--metrics.disable_color_printing",
    ]  # fmt: skip
    proc = dump_graphs(*args, timeout=3000)
    if proc.returncode != 0:
        pytest.fail(f"dump_graphs exited with {proc.returncode}:\n{proc.stdout[-8000:]}")
    return out


def summary(dump: Path, kind: str) -> str:
    """The inventory summary at the top of kind's kernels.md."""
    return re.search(r"```\n(.*?)\n```", (dump / kind / "kernels.md").read_text(), re.DOTALL).group(1)


@pytest.mark.slow
def test_the_configs_training_folder_gets_nothing_and_the_runs_logs_go_under_out(dump, training_folder):
    assert files_in(training_folder) == TRAINING_RUN_FILES
    assert re.search(r"step:\s+2/2\s+loss", (dump / "run" / "logs" / "train.log").read_text())
    assert len((dump / "run" / "logs" / "metrics.jsonl").read_text().splitlines()) == 2  # one record per step
    assert f"job.dump_folder={dump / 'run'} (was {training_folder})" in (dump / "index.md").read_text()


@pytest.mark.slow
def test_every_block_kind_gets_its_graphs_generated_code_and_inventory(dump):
    index = (dump / "index.md").read_text()
    for kind in KINDS:
        assert f"[{kind}]({kind}/kernels.md)" in index
        for name in FILES:
            assert (dump / kind / name).stat().st_size > 0, f"{kind}/{name}"
        # C++ kernels on the CPU, called from the generated code.
        assert re.search(r"^cpp_fused_\w+ = async_compile\.cpp", (dump / kind / "inductor_forward.py").read_text(), re.M)
    # The compiled cross-entropy (compile.components "loss"): one graph per head's logits shape.
    for name in FILES[:-1]:
        for graph in (0, 1):
            assert (dump / "loss" / name.replace(".py", f"_{graph}.py")).stat().st_size > 0, f"loss/{name} {graph}"
    assert "[loss](loss/kernels.md)" in index
    assert sorted(p.name for p in dump.iterdir() if p.is_dir() and p.name != "run") == sorted([*KINDS, "loss"])
    assert "aten::" in (dump / "profile.txt").read_text()


@pytest.mark.slow
def test_inventory_loss(dump):
    assert_expected_inline(summary(dump, "loss"), """\
loss: 1 block(s) (cross_entropy)
  dynamo graphs 2, graph breaks 0, recompiles after step 1 0
  custom ops per block (fw/bw): none
  generated kernels per block (fw/bw): 2/2 kernels, 2/2 calls
  extern calls per block (fw/bw): none
  GEMMs per block (fw/bw): 0/0; per step by input dtypes: none""")


@pytest.mark.slow
def test_inventory_swa_hash(dump):
    assert_expected_inline(summary(dump, "swa-hash"), """\
swa-hash: 1 block(s) (layers.0)
  dynamo graphs 1, graph breaks 0, recompiles after step 1 0
  custom ops per block (fw/bw): v4.mhc_collapse.default 2/0, v4.mhc_collapse_bwd.default 0/2, v4.mhc_expand.default 2/0, v4.mhc_expand_bwd.default 0/2, v4.sparse_attention.default 1/0, v4.sparse_attention_bwd.default 0/1
  generated kernels per block (fw/bw): 12/11 kernels, 14/12 calls
  extern calls per block (fw/bw): aten.cumsum.default 1/0, aten.searchsorted.Tensor 1/0, aten.sort.stable 1/0, extern_kernels.addmm 1/5, extern_kernels.bmm 1/2, extern_kernels.mm 13/23, v4.mhc_collapse.default 2/0, v4.mhc_collapse_bwd.default 0/2, v4.mhc_expand.default 2/0, v4.mhc_expand_bwd.default 0/2, v4.sparse_attention.default 1/0, v4.sparse_attention_bwd.default 0/1
  GEMMs per block (fw/bw): 15/30; per step by input dtypes: fp32 x fp32 45""")


@pytest.mark.slow
def test_inventory_csa_learned(dump):
    assert_expected_inline(summary(dump, "csa-learned"), """\
csa-learned: 2 block(s) (layers.1, layers.3)
  dynamo graphs 1, graph breaks 0, recompiles after step 1 0
  custom ops per block (fw/bw): v4.indexer_scores.default 1/0, v4.indexer_scores_bwd.default 1/0, v4.indexer_teacher.default 1/0, v4.indexer_topk.default 1/0, v4.mhc_collapse.default 2/0, v4.mhc_collapse_bwd.default 0/2, v4.mhc_expand.default 2/0, v4.mhc_expand_bwd.default 0/2, v4.sparse_attention.default 1/0, v4.sparse_attention_bwd.default 0/1
  generated kernels per block (fw/bw): 24/13 kernels, 26/14 calls
  extern calls per block (fw/bw): aten.cumsum.default 1/0, aten.searchsorted.Tensor 1/0, aten.sort.stable 1/0, aten.topk.default 1/0, extern_kernels.addmm 1/5, extern_kernels.bmm 1/2, extern_kernels.mm 23/27, v4.indexer_scores.default 1/0, v4.indexer_scores_bwd.default 1/0, v4.indexer_teacher.default 1/0, v4.indexer_topk.default 1/0, v4.mhc_collapse.default 2/0, v4.mhc_collapse_bwd.default 0/2, v4.mhc_expand.default 2/0, v4.mhc_expand_bwd.default 0/2, v4.sparse_attention.default 1/0, v4.sparse_attention_bwd.default 0/1
  GEMMs per block (fw/bw): 25/34; per step by input dtypes: fp32 x fp32 118""")


@pytest.mark.slow
def test_inventory_hca_learned(dump):
    assert_expected_inline(summary(dump, "hca-learned"), """\
hca-learned: 1 block(s) (layers.2)
  dynamo graphs 1, graph breaks 0, recompiles after step 1 0
  custom ops per block (fw/bw): v4.mhc_collapse.default 2/0, v4.mhc_collapse_bwd.default 0/2, v4.mhc_expand.default 2/0, v4.mhc_expand_bwd.default 0/2, v4.sparse_attention.default 1/0, v4.sparse_attention_bwd.default 0/1
  generated kernels per block (fw/bw): 14/12 kernels, 16/13 calls
  extern calls per block (fw/bw): aten.cumsum.default 1/0, aten.searchsorted.Tensor 1/0, aten.sort.stable 1/0, aten.topk.default 1/0, extern_kernels.addmm 1/5, extern_kernels.bmm 1/2, extern_kernels.mm 15/27, v4.mhc_collapse.default 2/0, v4.mhc_collapse_bwd.default 0/2, v4.mhc_expand.default 2/0, v4.mhc_expand_bwd.default 0/2, v4.sparse_attention.default 1/0, v4.sparse_attention_bwd.default 0/1
  GEMMs per block (fw/bw): 17/34; per step by input dtypes: fp32 x fp32 51""")


@pytest.mark.slow
def test_inventory_mtp(dump):
    assert_expected_inline(summary(dump, "mtp"), """\
mtp: 1 block(s) (mtp.0)
  dynamo graphs 1, graph breaks 0, recompiles after step 1 0
  custom ops per block (fw/bw): v4.mhc_collapse.default 2/0, v4.mhc_collapse_bwd.default 0/2, v4.mhc_expand.default 2/0, v4.mhc_expand_bwd.default 0/2, v4.sparse_attention.default 1/0, v4.sparse_attention_bwd.default 0/1
  generated kernels per block (fw/bw): 15/13 kernels, 17/13 calls
  extern calls per block (fw/bw): aten.cumsum.default 1/0, aten.searchsorted.Tensor 1/0, aten.sort.stable 1/0, aten.topk.default 1/0, extern_kernels.addmm 1/5, extern_kernels.bmm 1/2, extern_kernels.mm 15/27, v4.mhc_collapse.default 2/0, v4.mhc_collapse_bwd.default 0/2, v4.mhc_expand.default 2/0, v4.mhc_expand_bwd.default 0/2, v4.sparse_attention.default 1/0, v4.sparse_attention_bwd.default 0/1
  GEMMs per block (fw/bw): 17/34; per step by input dtypes: fp32 x fp32 51""")
