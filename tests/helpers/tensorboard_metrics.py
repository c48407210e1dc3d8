"""Per-step training metrics at full fp32 precision, read from the TensorBoard events torchtitan
writes (its console line rounds the grad norm to 4 decimals, too coarse for 1e-5 comparisons)."""

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# Extra run_train arguments: every rank writes its own events under <dump_folder>/tb/<time>/rank_<r>.
TENSORBOARD_ARGS = ("--metrics.enable_tensorboard", "--metrics.save_for_all_ranks", "--metrics.save_tb_folder", "tb")


def precise_metrics(dump_folder: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(loss, grad_norm) per step of a run made with TENSORBOARD_ARGS.

    The loss comes from a rank that logged a real one (not torchtitan's placeholder -1, which V4Trainer
    replaces with the last pipeline stage's loss on every rank). Every rank logs the same global grad norm.
    """
    loss: dict[int, float] = {}
    grad_norm: dict[int, float] = {}
    rank_dirs = sorted((Path(dump_folder) / "tb").glob("*/rank_*"))
    assert rank_dirs, f"no TensorBoard events under {dump_folder}/tb"
    for rank_dir in rank_dirs:
        events = EventAccumulator(str(rank_dir))
        events.Reload()
        rank_loss = {e.step: e.value for e in events.Scalars("loss_metrics/global_avg_loss")}
        if all(value != -1.0 for value in rank_loss.values()):
            loss = rank_loss
        grad_norm = {e.step: e.value for e in events.Scalars("grad_norm")}
    assert loss, f"no rank of {dump_folder} logged a loss"
    return loss, grad_norm
