"""run_train.sh's argument handling, with stand-ins for torchrun and nvidia-smi (no training)."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def launch(tmp_path):
    """Run run_train.sh with a fake torchrun that prints its arguments; returns them as a list."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "torchrun"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)

    def run(*args, gpus=None, **env_overrides):
        if gpus is not None:
            smi = bin_dir / "nvidia-smi"
            smi.write_text("#!/usr/bin/env bash\n" + "".join(f'echo "GPU {i}: H100 (UUID: x)"\n' for i in range(gpus)))
            smi.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k not in ("NGPU", "CONFIG_FILE", "LOG_RANK")}
        # Only the fakes and the basic tools: a real nvidia-smi must not leak in.
        env["PATH"] = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"
        env.update(env_overrides)
        proc = subprocess.run([str(REPO / "run_train.sh"), *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split("\n")[:-1]

    return run


def test_defaults_one_process_debug_config(launch):
    argv = launch()
    assert "--nproc_per_node=1" in argv and argv[argv.index("--local-ranks-filter") + 1] == "0"
    assert argv[-3:] == ["titan_v4.train", "--job.config_file", "train_configs/debug.toml"]


def test_ngpu_defaults_to_the_gpus_nvidia_smi_lists(launch):
    assert "--nproc_per_node=4" in launch(gpus=4)
    assert "--nproc_per_node=2" in launch(gpus=4, NGPU="2")


def test_arguments_pass_through_and_a_given_config_file_replaces_the_default(launch):
    argv = launch("--job.config_file", "train_configs/flash.toml", "--training.steps", "10")
    assert argv[argv.index("titan_v4.train") :] == [
        "titan_v4.train", "--job.config_file", "train_configs/flash.toml", "--training.steps", "10"
    ]  # fmt: skip
    argv = launch("--job.config-file=x.toml")
    assert argv[argv.index("titan_v4.train") :] == ["titan_v4.train", "--job.config-file=x.toml"]


def test_config_file_and_log_rank_from_the_environment(launch):
    argv = launch("--training.steps", "3", CONFIG_FILE="train_configs/pro.toml", LOG_RANK="0,1", NGPU="2")
    assert argv[argv.index("--local-ranks-filter") + 1] == "0,1"
    assert argv[argv.index("titan_v4.train") :] == [
        "titan_v4.train", "--job.config_file", "train_configs/pro.toml", "--training.steps", "3"
    ]  # fmt: skip
