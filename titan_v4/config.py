"""titan-v4's extension of torchtitan's JobConfig: the ``[v4]`` section.

Enable it with ``[job] custom_config_module = "titan_v4.config"`` in the TOML (or
``--job.custom_config_module titan_v4.config``). torchtitan's ``ConfigManager`` merges the
``JobConfig`` dataclass below into its own before parsing, so every field is settable from the
TOML ``[v4]`` table and from the command line as ``--v4.<field>``.

Data settings live here, not in ``[training]``: titan-v4's dataloader does not read torchtitan's
``training.dataset`` / ``training.dataset_path`` / ``model.tokenizer_path``, and refuses them when
set (titan_v4/train/checks.py) so they are never silently ignored.
"""

# No `from __future__ import annotations`: torchtitan's ConfigManager rebuilds these dataclasses with
# make_dataclass in its own module, where tyro could not resolve string annotations such as "V4".
from dataclasses import dataclass, field

#: Accepted values of ``v4.dataset``.
DATASETS = ("synthetic", "local", "hub")

#: Accepted values of ``v4.indexer_phase`` (docs/deepseek_v4.md, "How the lightning indexer is trained").
FROZEN, DENSE, WARMUP, SPARSE = "frozen", "dense", "warmup", "sparse"
INDEXER_PHASES = (FROZEN, DENSE, WARMUP, SPARSE)


class V4ConfigError(ValueError):
    """A bad ``[v4]`` setting; the message names the field, the value and what is allowed."""


class JobConfigError(ValueError):
    """A bad setting of any section (titan_v4/train/checks.py, the parallel layout's checks in
    titan_v4/infra/); the message names the setting, the value and what is allowed."""


def _is_number(value) -> bool:
    """An int or float from the TOML / CLI (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class V4:
    """DeepSeek-V4 run settings (TOML ``[v4]``, CLI ``--v4.<field>``)."""

    mtp_loss_weight: float = 0.3
    """Weight of the multi-token-prediction loss added to the main next-token loss (>= 0)."""

    mtp_loss_weight_in_lr_decay: float = -1.0
    """The MTP loss weight from the first step whose learning rate the schedule decays (torchtitan's
    warm-up / stable / decay schedule, ``[lr_scheduler]``) to the end of training (>= 0); -1 keeps
    mtp_loss_weight throughout. DeepSeek-V4 trained with 0.3, then 0.1 once the lr decay starts."""

    seq_balance_loss_weight: float = 1e-4
    """Weight of the sequence-wise expert balance loss (>= 0)."""

    indexer_phase: str = "frozen"
    """How CSA layers attend and whether the lightning indexer trains (docs/deepseek_v4.md):
    "frozen" = top-k attention, the indexer gets no gradient (it stays as loaded or initialised);
    "dense" = every visible compressed entry attended, the indexer trained by its KL loss on the
    dense target, everything else by the LM loss; "warmup" = dense attention, only the indexer
    trains (every other parameter gets no gradient, the expert biases do not move); "sparse" = top-k
    attention, everything trains, the indexer's KL over its selected entries. The paper's schedule is
    dense, then a short warmup, then sparse (see train_configs/flash.toml)."""

    indexer_loss_weight: float = 1.0
    """Weight of the indexer's KL loss (>= 0). The indexer's graph is separate from the model's, so the
    weight scales only the indexer's gradient."""

    document_masking: bool = True
    """Packed documents attend only within themselves: the dataloader labels each token with its
    document (a document begins at its BOS token) and the model keeps the sliding window, the
    compressed entries, the indexer and MTP inside it; a next-token target in the following document
    is ignored by the loss (docs/long_context.md). false = a packed sequence is one text."""

    dataset: str = "synthetic"
    """Training data: "synthetic" = the small templated corpus shipped in titan_v4/data/assets
    (no download); "local" = text files at dataset_path (.jsonl/.json, .txt or .parquet, a file
    or a directory of them); "hub" = a Hugging Face Hub dataset named by dataset_path, streamed."""

    dataset_path: str = ""
    """"local": a file or directory; "hub": a dataset name such as "allenai/c4". Unused for
    "synthetic"."""

    dataset_subset: str = ""
    """"hub" only: the dataset's configuration/subset name (e.g. "en" for allenai/c4); empty = none."""

    dataset_split: str = "train"
    """"hub" only: the split to read (local files are one "train" split)."""

    text_column: str = "text"
    """"local" and "hub": the column that holds the document text (.txt files: always "text")."""

    tokenizer_path: str = ""
    """A tokenizer.json file (or a directory that holds one). A tokenizer_config.json next to it
    names the BOS/EOS tokens. Empty = the 2048-token tokenizer shipped in titan_v4/data/assets."""

    max_nonfinite_steps: int = 0
    """Steps with a NaN/inf loss or gradient norm whose update is skipped before the run stops
    (per process start). 0 = stop at the first, before that step's checkpoint is written."""

    checkpoint_checksums: bool = True
    """Record a crc32 of every checkpoint file after each save (``step-N/checksums/``) and check them
    before a resume: a file changed in place (same size) is named and the run falls back to the
    previous intact checkpoint. Costs one read of each saved file after its save and one of the
    checkpoint a run resumes from, spread over the ranks (about 3 GB/s per process)."""

    muon_momentum: float = 0.95
    """``optimizer.name = "Muon"`` only (titan_v4/train/muon.py): the momentum mu of Muon's
    matrices, in [0, 1). Muon's lr and weight decay are ``optimizer.lr`` and ``optimizer.weight_decay``."""

    muon_nesterov: bool = True
    """Muon only: orthogonalise the Nesterov look-ahead ``mu * M_t + G_t`` (True) or ``M_t`` (False)."""

    muon_ns_steps: int = 8
    """Muon only: Newton-Schulz steps with the fast coefficients (3.4445, -4.7750, 2.0315) (>= 0)."""

    muon_ns_cleanup_steps: int = 2
    """Muon only: Newton-Schulz steps with (2, -1.5, 0.5) after the fast ones, which settle the
    singular values at 1 (>= 0; at least one step in all)."""

    muon_update_rms: float = 0.18
    """Muon only: the RMS of a matrix's update before the lr (the orthogonalised matrix times
    sqrt(max(rows, cols)) times this), so that AdamW's lr and schedule carry over (> 0)."""

    def __post_init__(self) -> None:
        # Runs for the TOML values and again for the final CLI-merged values.
        self._check_muon()
        for name in ("mtp_loss_weight", "seq_balance_loss_weight", "indexer_loss_weight"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise V4ConfigError(f"v4.{name}={value!r} is invalid: allowed values are numbers >= 0")
        value = self.mtp_loss_weight_in_lr_decay
        if not _is_number(value) or (value < 0 and value != -1):
            raise V4ConfigError(
                f"v4.mtp_loss_weight_in_lr_decay={value!r} is invalid: allowed values are numbers >= 0, or -1 "
                "(keep v4.mtp_loss_weight)"
            )
        if not isinstance(self.document_masking, bool):
            raise V4ConfigError(f"v4.document_masking={self.document_masking!r} is invalid: allowed values are true, false")
        value = self.max_nonfinite_steps
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise V4ConfigError(f"v4.max_nonfinite_steps={value!r} is invalid: allowed values are integers >= 0")
        if self.indexer_phase not in INDEXER_PHASES:
            raise V4ConfigError(
                f"v4.indexer_phase={self.indexer_phase!r} is invalid: allowed values are "
                f"{', '.join(map(repr, INDEXER_PHASES))}"
            )
        if self.dataset not in DATASETS:
            raise V4ConfigError(
                f"v4.dataset={self.dataset!r} is invalid: allowed values are {', '.join(map(repr, DATASETS))}"
            )
        if self.dataset != "synthetic" and not self.dataset_path:
            raise V4ConfigError(
                f"v4.dataset_path={self.dataset_path!r} is invalid with v4.dataset={self.dataset!r}: "
                "allowed values are a non-empty file/directory path (local) or dataset name (hub)"
            )
        if self.dataset != "synthetic" and not self.text_column:
            raise V4ConfigError(
                f"v4.text_column={self.text_column!r} is invalid: allowed values are a non-empty column name"
            )

    def _check_muon(self) -> None:
        if not _is_number(self.muon_momentum) or not 0 <= self.muon_momentum < 1:
            raise V4ConfigError(f"v4.muon_momentum={self.muon_momentum!r} is invalid: allowed values are numbers in [0, 1)")
        if not isinstance(self.muon_nesterov, bool):
            raise V4ConfigError(f"v4.muon_nesterov={self.muon_nesterov!r} is invalid: allowed values are true, false")
        for name in ("muon_ns_steps", "muon_ns_cleanup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise V4ConfigError(f"v4.{name}={value!r} is invalid: allowed values are integers >= 0")
        if self.muon_ns_steps + self.muon_ns_cleanup_steps < 1:
            raise V4ConfigError(
                f"v4.muon_ns_steps={self.muon_ns_steps!r} with v4.muon_ns_cleanup_steps="
                f"{self.muon_ns_cleanup_steps!r} is invalid: allowed are at least one Newton-Schulz step in all"
            )
        if not _is_number(self.muon_update_rms) or not self.muon_update_rms > 0:
            raise V4ConfigError(f"v4.muon_update_rms={self.muon_update_rms!r} is invalid: allowed values are numbers > 0")


def v4_settings(job_config) -> V4:
    """The job's ``[v4]`` section, or its defaults when ``custom_config_module`` is not set (then no
    ``[v4]`` value can have been given: the TOML / CLI parser would have rejected it)."""
    return getattr(job_config, "v4", None) or V4()


@dataclass
class JobConfig:
    """Merged into torchtitan's JobConfig by ConfigManager (adds the ``v4`` section)."""

    v4: V4 = field(default_factory=V4)
