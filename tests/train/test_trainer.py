"""titan_v4.train.trainer.V4Trainer's pipeline-parallel glue, checked on torchtitan's llama3 debug model
(tests/helpers/llama3_ids_plugin.py) with two CPU processes: token ids reach both stages, and PP
gradients are token-normalised."""

import pytest

from tests.helpers.train_runner import run_train

TOKENS_PER_STEP = 2 * 128  # local_batch_size x seq_len below; one data-parallel rank


def _pp_run(tmp_path, model_name):
    return run_train(
        "--experimental.custom_import", "tests.helpers.llama3_ids_plugin",
        "--model.name", model_name,
        "--parallelism.pipeline_parallel_degree", "2",
        "--training.steps", "1", "--training.local_batch_size", "2", "--training.seq_len", "128",
        "--checkpoint.no-enable", "--debug.seed", "0", "--job.dump_folder", str(tmp_path / model_name),
        nproc=2, log_rank=1,  # rank 1 holds the last stage, which logs the loss
    )  # fmt: skip


@pytest.mark.slow
def test_pp_gradients_are_normalised_by_the_token_count(tmp_path):
    # The plug-in's forward raises unless token_ids reach both stages, so training at all shows
    # that post_dataloading_process put them into extra_kwargs.
    fixed = _pp_run(tmp_path, "llama3_ids")  # loss with `denom`: V4Trainer normalises
    plain = _pp_run(tmp_path, "llama3_ids_plain")  # torchtitan 0.2.2 behaviour
    assert fixed.loss[1] == pytest.approx(plain.loss[1], rel=1e-5)  # reported loss unchanged
    assert 7.0 < fixed.loss[1] < 9.0  # about ln(2048): a mean per-token loss, not a sum
    # Same seed, same data: without the fix the gradients are TOKENS_PER_STEP times larger.
    assert plain.grad_norm[1] / fixed.grad_norm[1] == pytest.approx(TOKENS_PER_STEP, rel=1e-2)
    assert fixed.grad_norm[1] < 20
