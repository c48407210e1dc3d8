"""Training runs of one config in several parallel layouts, all started from one seed checkpoint.

torchtitan initialises each pipeline stage (and each layout) from the same seed, yet a split model
starts from other weights than the whole one; loading one seed checkpoint makes the starts equal.
"""

from pathlib import Path

import pytest

from tests.helpers.tensorboard_metrics import precise_metrics
from tests.helpers.train_runner import run_train


class Runs:
    """Training runs by name, each made once (tests share them through a module-scoped fixture);
    ``train_args`` go to every run but the one that writes the seed checkpoint."""

    def __init__(self, root: Path, train_args: tuple[str, ...]):
        self.root = root
        self.seed = root / "seed"
        self.train_args = train_args
        run_train("--checkpoint.enable", "--checkpoint.create_seed_checkpoint", "--training.steps", "1",
                  "--debug.seed", "0", "--job.dump_folder", str(self.seed))  # fmt: skip
        self.made: dict[str, tuple] = {}

    def get(self, name: str, *args: str, nproc: int = 1):
        """(TrainRun, loss, grad_norm) of the run `name`, made on first use. The runs must write
        TensorBoard events (tests.helpers.tensorboard_metrics.TENSORBOARD_ARGS in train_args)."""
        if name not in self.made:
            folder = self.root / name
            seed = ("--checkpoint.initial_load_path", str(self.seed / "checkpoint" / "step-0"))
            run = run_train(*self.train_args, *seed, *args, "--job.dump_folder", str(folder), nproc=nproc,
                            log_rank=",".join(map(str, range(nproc))))  # fmt: skip
            self.made[name] = (run, *precise_metrics(folder))
        return self.made[name]


def assert_same_curves(actual, expected, steps, rel: float) -> None:
    """Two runs' (TrainRun, loss, grad_norm) agree at every step of ``steps``, within ``rel``."""
    (_, loss, grad_norm), (_, ref_loss, ref_grad_norm) = actual, expected
    for name, values, ref in (("loss", loss, ref_loss), ("grad_norm", grad_norm, ref_grad_norm)):
        assert sorted(values) == list(steps), (name, values)
        for step in steps:
            assert values[step] == pytest.approx(ref[step], rel=rel), (name, step, values, ref)
