"""titan_v4.train.checks: a wrong setting stops the run at start-up with one message naming the setting,
the value and what is allowed (each case failed late, unclearly or not at all on torchtitan 0.2.2)."""

import pytest

import titan_v4  # noqa: F401  (registers the train spec; CPU shim)
from tests.helpers.job_config import job_config
from titan_v4.config import JobConfigError
from titan_v4.infra.parallelize import check_model_parallelism
from titan_v4.train.checks import check_job_config


def _check(*args, world_size=1):
    check_job_config(job_config("--job.config_file", "train_configs/debug.toml", *args), world_size=world_size)


def test_the_shipped_configs_pass():
    for name in ("debug", "flash_proxy", "long_proxy"):
        check_job_config(job_config("--job.config_file", f"train_configs/{name}.toml"), world_size=1)
    for name in ("flash", "pro"):
        check_job_config(job_config("--job.config_file", f"train_configs/{name}.toml"), world_size=64)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--training.steps", "-5"), r"training.steps=-5 is invalid: allowed values are integers >= 0"),
        (("--training.steps", "-1"), r"training.steps=-1 is invalid"),
        (("--checkpoint.interval", "0"), r"checkpoint.interval=0 is invalid: allowed values are integers >= 1"),
        (("--checkpoint.keep_latest_k", "1"), r"checkpoint.keep_latest_k=1 is invalid"),
        (("--optimizer.lr", "-1"), r"optimizer.lr=-1.0 is invalid: allowed values are finite numbers >= 0"),
        (("--training.max_norm", "0"), r"training.max_norm=0.0 is invalid"),
        (("--metrics.log_freq", "0"), r"metrics.log_freq=0 is invalid"),
        (("--training.dataset", "c4"), r"training.dataset='c4' is not used by titan_v4: set v4.dataset"),
        (("--training.dataset_path", "/data"), r"training.dataset_path='/data' is not used by titan_v4"),
        (("--model.tokenizer_path", "/tok"), r"model.tokenizer_path='/tok' is not used by titan_v4.*v4.tokenizer_path"),
        (("--validation.enable",), r"validation.enable=True is not supported"),
        (("--compile.components", "model,los"), r"compile.components=\['model', 'los'\] is invalid: \['los'\] would be ignored"),
    ],
)
def test_bad_values_are_refused_by_name(args, message):
    with pytest.raises(JobConfigError, match=message):
        _check(*args)


def test_a_string_typed_toml_number_is_refused_by_name(tmp_path):
    toml = (tmp_path / "c.toml")
    text = open("train_configs/debug.toml").read().replace("lr = 1e-3", 'lr = "1e-3"')
    assert 'lr = "1e-3"' in text
    toml.write_text(text)
    cfg = job_config("--job.config_file", str(toml))
    with pytest.raises(JobConfigError, match=r"optimizer.lr='1e-3' is invalid: it is a str; allowed values are numbers \(write it without quotes: lr = 1e-3\)"):
        check_job_config(cfg, world_size=1)


@pytest.mark.parametrize(
    "args, world, message",
    [
        (("--parallelism.expert_parallel_degree", "4"), 2, r"parallelism.expert_parallel_degree=4 is invalid.*divisors of 2"),
        (("--parallelism.expert_parallel_degree", "0"), 1, r"parallelism.expert_parallel_degree=0 is invalid"),
        (("--parallelism.data_parallel_shard_degree", "4"), 2, r"parallelism.data_parallel_shard_degree=4 is invalid.*2 are running"),
        (("--parallelism.data_parallel_replicate_degree", "3"), 2, r"does not divide the 2 processes"),
        (("--parallelism.context_parallel_degree", "2"), 2, r"parallelism.context_parallel_degree=2 is invalid: allowed values are 1: context parallelism is not implemented"),
    ],
)
def test_parallel_degrees_that_do_not_fit_the_world_are_refused(args, world, message):
    with pytest.raises(JobConfigError, match=message):
        _check(*args, world_size=world)


def test_expert_parallel_degree_must_divide_the_experts():
    check_model_parallelism(8, 2)
    with pytest.raises(JobConfigError, match=r"expert_parallel_degree=3 is invalid: the model has 8 routed experts; allowed values are their divisors \[1, 2, 4, 8\]"):
        check_model_parallelism(8, 3)


def test_v4_max_nonfinite_steps_must_be_a_count():
    from titan_v4.config import V4, V4ConfigError

    assert job_config("--v4.max_nonfinite_steps", "2").v4.max_nonfinite_steps == 2
    with pytest.raises(V4ConfigError, match="v4.max_nonfinite_steps=-1 is invalid"):
        V4(max_nonfinite_steps=-1)
