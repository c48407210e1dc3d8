"""torchtitan JobConfigs merged with titan_v4.config, as torchtitan's ConfigManager builds them."""

from torchtitan.config import ConfigManager


def job_config(*cli_args: str):
    """A JobConfig for the given command-line overrides (seq 32, batch 2 unless overridden)."""
    args = ["--job.custom_config_module", "titan_v4.config", "--training.seq_len", "32", "--training.local_batch_size", "2"]
    return ConfigManager().parse_args([*args, *cli_args])
