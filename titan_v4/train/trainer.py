"""V4Trainer and :func:`run`, what ``python -m titan_v4.train --job.config_file X.toml [--section.field
value ...]`` runs (titan_v4/train/__main__.py).

Normally started by ``./run_train.sh`` through torchrun. It is torchtitan's ``main`` with
:class:`V4Trainer`, plus the CPU shim on machines without CUDA (the shim must patch torchtitan
before its first import; ``import titan_v4`` installs it too, so the order holds however this
module is reached).

What ``V4Trainer`` adds to torchtitan 0.2.2's ``Trainer``:

* ``post_dataloading_process`` puts the token ids into ``extra_kwargs["token_ids"]``, and the
  dataloader's document layout (``doc_ids``, titan_v4/data/documents.py) into ``extra_kwargs`` too.
  Under pipeline parallelism ``extra_kwargs`` reach every stage (``extra_inputs`` only the first), so
  hash-routed MoE layers and the attention of any stage get them; integer ids cannot travel as stage
  activations (docs/design.md, "torchtitan 0.2.2 as the host"). The model's ``forward`` takes
  ``token_ids=None, doc_ids=None``. With ``v4.document_masking`` a dataloader that gives no
  ``doc_ids`` is refused before the first step.
* ``forward_backward_step`` fixes the pipeline-parallel gradient scale: 0.2.2 backpropagates the
  SUM loss of each microbatch and divides only the *reported* loss by the global token count, so
  PP gradients are ~#tokens times too large (measured 500-1000x). When the loss function has a
  settable ``denom`` (titan_v4's loss does), it is set to the global valid-token count for the
  step so the schedule backpropagates normalised losses; any other loss function runs unchanged.
* Under pipeline parallelism ``forward_backward_step`` returns the last stage's loss on every rank
  (0.2.2 returns -1 where the last stage does not live, and rank 0 logs it).
* ``forward_backward_step`` also sets the gradient scale of the auxiliary losses (the MoE
  sequence-wise balance loss and the indexer's KL, which each layer attaches to its own output's
  gradient) to this microbatch's share of the step's valid tokens, so it averages over gradient-accumulation microbatches, pipeline
  microbatches and data-parallel ranks exactly like the token-normalised LM loss.
* In the indexer's warmup phase ``forward_backward_step`` drops every non-indexer gradient after the
  backward (titan_v4/train/indexer_phase.py), so only the indexer trains.
* After torchtitan's step line, a line with each loss term (titan_v4/train/loss_terms.py): LM, MTP,
  balance and indexer losses and the indexer's recall.
* A check that the tokenizer's ids fit the model's vocabulary (on CUDA an out-of-range id is a
  device-side assert far from its cause).
* Progress logging: a summary line at start, the step a run resumes from (and a clear line when
  the checkpoint already reached ``training.steps``), a closing line; a log file in the dump
  folder and the failing rank's error as the last line (``titan_v4/train/run_log.py``).
* ``train_step`` folds gradient clipping into the fused AdamW step (``titan_v4/train/clip.py``):
  the same clipped update with one pass over the gradients fewer.
* Reliability (docs/reliability.md): the whole config is checked before anything is built
  (``titan_v4/train/checks.py``); the checkpoint to resume is checked and damaged ones are skipped
  (``titan_v4/train/resume.py``; checksums recorded after each save find files changed in place);
  a NaN/inf loss or gradient stops the run before it writes a
  checkpoint (``titan_v4/train/nonfinite.py``); ``keep_latest_k`` also applies to the final save.
"""

import os
import sys
import time

import torch
import torch.distributed as dist

from titan_v4.infra import cpu_shim

# Before torchtitan: on a machine without CUDA the shim must import torchtitan itself.
if not torch.cuda.is_available() and not cpu_shim.install():
    raise RuntimeError(
        "titan_v4.train: no CUDA device and the CPU shim could not be installed because torchtitan "
        "was imported first; import titan_v4 (or titan_v4.infra.cpu_shim.install()) before torchtitan"
    )

from torchtitan.components.loss import IGNORE_INDEX  # noqa: E402
from torchtitan.tools.logging import logger  # noqa: E402
from torchtitan.train import Trainer, main  # noqa: E402

from titan_v4.config import JobConfigError, v4_settings  # noqa: E402
from titan_v4.model.aux_loss import set_aux_loss_scale  # noqa: E402
from titan_v4.train import resume, run_log  # noqa: E402
from titan_v4.train.checks import check_job_config  # noqa: E402
from titan_v4.train.clip import FoldedClipping  # noqa: E402
from titan_v4.train.indexer_phase import backbone_frozen, drop_backbone_grads  # noqa: E402
from titan_v4.train.loss_terms import format_loss_terms, read_loss_terms  # noqa: E402
from titan_v4.train.mtp_weight import lr_decay_start, mtp_loss_weight_at  # noqa: E402
from titan_v4.train.nonfinite import NonFiniteGuard, ObserveLoss  # noqa: E402
from titan_v4.train.optimizer import init_optimizer_state  # noqa: E402

if not torch.cuda.is_available():
    run_log.quiet_cpu_noise()


class V4Trainer(ObserveLoss, Trainer):
    """torchtitan's Trainer with token ids for every PP stage, PP-correct gradient scaling, and the
    start-up, resume and divergence checks of docs/reliability.md."""

    def __init__(self, job_config) -> None:
        run_log.attach_log_file(job_config.job.dump_folder)
        # torchtitan passes the optimizer builder only this section; Muon's settings are in [v4].
        job_config.optimizer.v4 = v4_settings(job_config)
        super().__init__(job_config)
        if job_config.training.steps > 0:
            # Before any checkpoint is loaded, so that a checkpoint has a state for every parameter
            # (titan_v4/train/optimizer.py). A load-only run (steps 0) needs none, and a model that
            # fits only without optimizer state can still be loaded.
            init_optimizer_state(self.optimizers)
        if self.checkpointer.enable and v4_settings(job_config).checkpoint_checksums:
            resume.record_checksums(self.checkpointer)
        self._plan_mtp_loss_weight(job_config)
        self.folded_clipping = FoldedClipping(self.optimizers)
        logger.info(
            f"titan_v4: gradient clipping at training.max_norm={job_config.training.max_norm} "
            + ("inside the fused AdamW step" if self.folded_clipping.applies
               else "by torchtitan (the optimizer is not torch's fused Adam / AdamW)")
        )  # fmt: skip
        self.nonfinite_guard = NonFiniteGuard(
            self.optimizers, self.model_parts, self.device, v4_settings(job_config).max_nonfinite_steps,
            lambda: self.step, grad_norm_fn=lambda: self.folded_clipping.norm,
        )
        # Out-of-range ids would index past the embedding: fail before the first step instead.
        model_vocab = getattr(self.model_args, "vocab_size", None)
        if self.tokenizer is not None and model_vocab is not None:
            tokenizer_vocab = self.tokenizer.get_vocab_size()
            if tokenizer_vocab > model_vocab:
                raise ValueError(
                    f"the tokenizer has {tokenizer_vocab} tokens but model {job_config.model.name} "
                    f"{job_config.model.flavor} has vocab_size={model_vocab}: use a smaller tokenizer "
                    "(v4.tokenizer_path) or a flavor with a larger vocabulary"
                )
        pd = self.parallel_dims
        logger.info(
            f"titan_v4: {job_config.model.name}/{job_config.model.flavor} on {self.device.type} "
            f"(world {pd.world_size}: dp_shard={pd.dp_shard} dp_replicate={pd.dp_replicate} tp={pd.tp} "
            f"pp={pd.pp} cp={pd.cp} ep={pd.ep}), {job_config.training.steps} steps, "
            f"dump folder {job_config.job.dump_folder}"
        )

    def _plan_mtp_loss_weight(self, job_config) -> None:
        """Finds the step from which v4.mtp_loss_weight_in_lr_decay applies (train_step sets the
        loss's weight each step) and says it in the log."""
        v4 = v4_settings(job_config)
        self.mtp_decay_start = lr_decay_start(self.lr_schedulers)
        if v4.mtp_loss_weight_in_lr_decay < 0:
            return
        if self.mtp_decay_start is None or self.mtp_decay_start > job_config.training.steps:
            logger.warning(
                f"titan_v4: v4.mtp_loss_weight_in_lr_decay={v4.mtp_loss_weight_in_lr_decay} has no effect: the "
                f"learning rate does not decay within the {job_config.training.steps} steps ([lr_scheduler])"
            )
        else:
            logger.info(
                f"titan_v4: MTP loss weight {v4.mtp_loss_weight}, then {v4.mtp_loss_weight_in_lr_decay} from step "
                f"{self.mtp_decay_start} on (the first step with a decayed learning rate)"
            )

    def init_distributed(self):
        # First thing torchtitan does with the config: refuse a bad one before building anything.
        check_job_config(self.job_config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        return super().init_distributed()

    def post_dataloading_process(self, input_dict, labels):
        inputs, labels, extra_inputs, extra_kwargs = super().post_dataloading_process(input_dict, labels)
        # The ids the model sees (after any context-parallel sharding), for every PP stage.
        extra_kwargs["token_ids"] = inputs
        if "doc_ids" in extra_inputs:
            extra_kwargs["doc_ids"] = extra_inputs.pop("doc_ids")
        elif v4_settings(self.job_config).document_masking:
            raise JobConfigError(
                "v4.document_masking=true but the dataloader's batches carry no document layout (no 'doc_ids'): "
                "use titan_v4's dataloader (build_v4_dataloader) or set v4.document_masking=false"
            )
        return inputs, labels, extra_inputs, extra_kwargs

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        loss = self._scaled_forward_backward_step(
            input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
        )
        if backbone_frozen(self.model_parts):
            drop_backbone_grads(self.model_parts)  # indexer warmup: only the indexer's KL trains
        return loss

    def _scaled_forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        share = (labels != IGNORE_INDEX).sum() / global_valid_tokens
        if self.parallel_dims.pp_enabled:
            share = share / self.pp_schedule._n_microbatches  # one auxiliary loss per PP microbatch
        set_aux_loss_scale(self.model_parts, share)
        if not self.parallel_dims.pp_enabled:
            return super().forward_backward_step(
                input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
            )
        if not hasattr(self.loss_fn, "denom"):
            loss = super().forward_backward_step(
                input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
            )
            return self._last_stage_loss(loss)
        # Each microbatch loss is now already divided by the step's token count, so the gradients
        # the schedule computes are normalised like the non-PP path's.
        self.loss_fn.denom = global_valid_tokens
        try:
            loss = super().forward_backward_step(
                input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
            )
        finally:
            self.loss_fn.denom = None
        # The base class divides the summed microbatch losses by global_valid_tokens again for
        # reporting; undo that on the last stage (other stages hold the placeholder -1).
        return self._last_stage_loss(loss * global_valid_tokens if self.pp_has_last_stage else loss)

    def _last_stage_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss of the last pipeline stage, on every rank of the pipeline.

        torchtitan 0.2.2 returns the real loss only where the last stage lives (the last PP rank, or
        PP rank 0 for the V-shaped schedules) and -1 elsewhere, and logs rank 0's value: the console
        and metrics.jsonl showed -1 under PP. One scalar all-reduce over the PP group, in which
        exactly one rank holds the last stage, gives every rank the real value.
        """
        mine = loss.detach().reshape(()) if self.pp_has_last_stage else torch.zeros((), device=self.device)
        mine = mine.to(torch.float32)
        dist.all_reduce(mine, group=self.parallel_dims.get_mesh("pp").get_group())
        return mine

    def train_step(self, data_iterator):
        if hasattr(self.loss_fn, "mtp_loss_weight"):  # V4Loss (a test plug-in's loss has none)
            v4 = v4_settings(self.job_config)
            self.loss_fn.mtp_loss_weight = mtp_loss_weight_at(
                self.step, v4.mtp_loss_weight, v4.mtp_loss_weight_in_lr_decay, self.mtp_decay_start
            )
        with self.folded_clipping.during_step():  # the clip's scaling done by the fused AdamW
            super().train_step(data_iterator)
        if self.metrics_processor.should_log(self.step):
            terms = read_loss_terms(self.model_parts, self.loss_fn, self.device)
            if terms:
                logger.info(format_loss_terms(self.step, terms))
                self.metrics_processor.logger.log({f"loss_terms/{k}": v for k, v in terms.items()}, self.step)

    def load_state_dict(self, state_dict) -> None:
        # Called by the checkpointer with the saved train state when a run resumes.
        super().load_state_dict(state_dict)
        steps = self.job_config.training.steps
        if self.step >= steps:
            logger.warning(
                f"titan_v4: the checkpoint in {self.checkpointer.folder} is at step {self.step} and "
                f"training.steps is {steps}: this job is finished, nothing to train. Raise --training.steps "
                "to train on, or use a new --job.dump_folder to start afresh"
            )
        else:
            logger.info(f"titan_v4: resuming from the checkpoint of step {self.step}; next step is {self.step + 1}")

    def train(self) -> None:
        start = time.perf_counter()
        dp_degree = getattr(self.dataloader, "dp_world_size", 1)
        verify = v4_settings(self.job_config).checkpoint_checksums
        self.job_config.checkpoint.load_step = resume.plan_resume(
            self.checkpointer, self.job_config, dp_degree, verify_checksums=verify
        )
        super().train()
        resume.purge_after_final_save(self.checkpointer)
        logger.info(f"titan_v4: training stopped at step {self.step} after {time.perf_counter() - start:.1f} s")


def run() -> None:
    """torchtitan's ``main`` with V4Trainer; a failure is also summarised for run_train.sh."""
    stderr = sys.stderr = run_log.StderrRecorder(sys.stderr)  # to summarise argument errors
    try:
        main(V4Trainer)
    except SystemExit as e:
        if e.code not in (0, None):  # an argument error: the parser has printed its message
            run_log.record_parser_exit(stderr.text)
        raise
    except BaseException as e:
        run_log.record_failure(e)
        raise

