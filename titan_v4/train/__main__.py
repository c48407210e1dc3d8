"""``python -m titan_v4.train --job.config_file X.toml [--section.field value ...]``: torchtitan's
training loop with :class:`titan_v4.train.trainer.V4Trainer` (``./run_train.sh`` starts it through
torchrun)."""

from titan_v4.train.trainer import run

run()
