"""titan_v4.config: the [v4] section merged into torchtitan's JobConfig, and its validation."""

import pytest

from tests.helpers.job_config import job_config
from titan_v4.config import V4, V4ConfigError


def test_v4_section_is_merged_with_defaults_and_cli_overrides():
    cfg = job_config("--v4.mtp_loss_weight", "0.1")
    assert cfg.v4 == V4(mtp_loss_weight=0.1)
    assert (cfg.v4.dataset, cfg.v4.seq_balance_loss_weight) == ("synthetic", 1e-4)


def test_muon_defaults_are_the_papers():
    v4 = job_config("--v4.muon_ns_steps", "6").v4
    assert (v4.muon_momentum, v4.muon_nesterov, v4.muon_ns_cleanup_steps, v4.muon_update_rms) == (0.95, True, 2, 0.18)
    assert V4().muon_ns_steps == 8 and v4.muon_ns_steps == 6


def test_indexer_phase_reaches_the_model_args():
    from titan_v4.flavors import deepseek_v4_args

    args = deepseek_v4_args["debugmodel"].replace()  # a copy: update_from_config mutates
    args.update_from_config(job_config("--v4.indexer_phase", "warmup", "--v4.indexer_loss_weight", "0.5"))
    assert (args.indexer_phase, args.indexer_loss_weight) == ("warmup", 0.5)


def test_v4_section_from_toml(tmp_path):
    toml = tmp_path / "x.toml"
    toml.write_text('[job]\ncustom_config_module = "titan_v4.config"\n[v4]\ndataset = "hub"\ndataset_path = "allenai/c4"\n')
    cfg = job_config("--job.config_file", str(toml))
    assert (cfg.v4.dataset, cfg.v4.dataset_path) == ("hub", "allenai/c4")


@pytest.mark.parametrize(
    "fields, message",
    [
        pytest.param(dict(dataset="c4"), "v4.dataset='c4' is invalid: allowed values are 'synthetic', 'local', 'hub'", id="dataset"),
        pytest.param(dict(mtp_loss_weight=-0.5), "v4.mtp_loss_weight=-0.5 is invalid", id="mtp-weight"),
        pytest.param(dict(seq_balance_loss_weight=-1.0), "v4.seq_balance_loss_weight=-1.0 is invalid", id="balance-weight"),
        pytest.param(dict(dataset="local"), "v4.dataset_path='' is invalid with v4.dataset='local'", id="no-path"),
        pytest.param(
            dict(indexer_phase="sparse_attention"),
            "v4.indexer_phase='sparse_attention' is invalid: allowed values are 'frozen', 'dense', 'warmup', 'sparse'",
            id="indexer-phase",
        ),
        pytest.param(dict(indexer_loss_weight=-1.0), "v4.indexer_loss_weight=-1.0 is invalid", id="indexer-weight"),
        pytest.param(dict(dataset="hub", dataset_path="x", text_column=""), "v4.text_column='' is invalid", id="no-column"),
        pytest.param(dict(muon_momentum=1.0), "v4.muon_momentum=1.0 is invalid: allowed values are numbers in [0, 1)",
                     id="muon-momentum"),
        pytest.param(dict(muon_nesterov=1), "v4.muon_nesterov=1 is invalid: allowed values are true, false",
                     id="muon-nesterov"),
        pytest.param(dict(muon_ns_steps=-1), "v4.muon_ns_steps=-1 is invalid: allowed values are integers >= 0",
                     id="muon-ns-steps"),
        pytest.param(dict(muon_ns_steps=0, muon_ns_cleanup_steps=0),
                     "v4.muon_ns_steps=0 with v4.muon_ns_cleanup_steps=0 is invalid", id="muon-no-ns-step"),
        pytest.param(dict(muon_update_rms=0.0), "v4.muon_update_rms=0.0 is invalid: allowed values are numbers > 0",
                     id="muon-rms"),
    ],
)
def test_v4_validation_names_field_value_and_allowed(fields, message):
    with pytest.raises(V4ConfigError) as err:
        V4(**fields)
    assert message in str(err.value)


def test_bad_cli_value_is_reported_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        job_config("--v4.dataset", "nope")
    assert "v4.dataset='nope' is invalid" in " ".join(capsys.readouterr().err.split()).replace("│ ", "")


@pytest.mark.parametrize("name", ["debug", "flash_proxy", "long_proxy", "flash", "pro"])
def test_shipped_configs_set_a_seed(name):
    """Without debug.seed every run starts from new random weights (step-1 losses 10.48-10.56 on the
    debug config); tests/integration/test_train_cpu.py checks that two runs then agree."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "train_configs" / f"{name}.toml"
    assert isinstance(job_config("--job.config_file", str(path)).debug.seed, int)


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_released_configs_use_the_papers_optimizer(name):
    """The paper's recipe (docs/deepseek_v4.md, "Muon"): Muon with Nesterov momentum 0.95, 8 + 2
    Newton-Schulz steps, update RMS 0.18; AdamW betas (0.9, 0.95), eps 1e-20, weight decay 0.1; cosine
    decay to 0.1x; MTP weight 0.3, then 0.1 in the decay."""
    from pathlib import Path

    config = job_config("--job.config_file", str(Path(__file__).resolve().parents[1] / "train_configs" / f"{name}.toml"))
    optimizer, v4, schedule = config.optimizer, config.v4, config.lr_scheduler
    assert optimizer.name == "Muon"
    assert (optimizer.beta1, optimizer.beta2, optimizer.eps, optimizer.weight_decay) == (0.9, 0.95, 1e-20, 0.1)
    assert (v4.muon_momentum, v4.muon_nesterov, v4.muon_ns_steps, v4.muon_ns_cleanup_steps, v4.muon_update_rms) == (0.95, True, 8, 2, 0.18)
    assert (schedule.decay_type, schedule.min_lr_factor) == ("cosine", 0.1)
    assert (v4.mtp_loss_weight, v4.mtp_loss_weight_in_lr_decay) == (0.3, 0.1)
