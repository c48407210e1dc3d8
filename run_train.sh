#!/usr/bin/env bash
# Launch titan-v4 training with torchrun, in the style of torchtitan's run_train.sh.
#
# Environment overrides (all optional):
#   NGPU         processes on this host; default: the number of GPUs nvidia-smi lists, else 1
#                (a CPU-only machine then trains in one process; NGPU=2 runs two gloo processes)
#   CONFIG_FILE  TOML config; default: train_configs/debug.toml (used only when the arguments
#                carry no --job.config_file of their own)
#   LOG_RANK     local rank(s) whose output is shown, e.g. 0 or 0,1; default: 0
#   TRAIN_MODULE the module torchrun runs; default: titan_v4.train (dump_graphs.sh sets
#                titan_v4.tools.dump_graphs)
# Every argument is passed on to titan_v4.train, e.g.
#   ./run_train.sh --training.steps 10
#   NGPU=8 ./run_train.sh --job.config_file train_configs/flash.toml --training.steps 10
#
# The full log of rank 0 goes to <dump_folder>/logs/train.log. When the run fails, the error of
# the rank that failed first (whichever it is, shown or not) is printed as the last line.
set -euo pipefail

if [[ -z "${NGPU:-}" ]]; then
    NGPU=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        NGPU=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
    fi
    [[ "$NGPU" -gt 0 ]] || NGPU=1
fi
LOG_RANK=${LOG_RANK:-0}
CONFIG_FILE=${CONFIG_FILE:-"train_configs/debug.toml"}
TRAIN_MODULE=${TRAIN_MODULE:-"titan_v4.train"}

# torchtitan 0.2.2 loads the TOML named by the *first* --job.config_file, so add ours only when
# the caller gave none (a later one would change job.config_file but not the values loaded).
config_args=(--job.config_file "$CONFIG_FILE")
for arg in "$@"; do
    case "$arg" in
        --job.config_file|--job.config-file|--job.config_file=*|--job.config-file=*) config_args=() ;;
    esac
done

# torchrun's per-rank logs (needed for LOG_RANK) and the ranks' error lines live in a scratch
# folder that is removed at exit (without --log-dir torchrun leaves a /tmp/torchelastic_* behind).
scratch=$(mktemp -d "${TMPDIR:-/tmp}/titan_v4_run.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export TITAN_V4_ERROR_DIR="$scratch/errors"

cmd=(torchrun --nproc_per_node="$NGPU" --rdzv_backend c10d --rdzv_endpoint="localhost:0"
     --local-ranks-filter "$LOG_RANK" --role rank --tee 3 --log-dir "$scratch/torchrun"
     -m "$TRAIN_MODULE" "${config_args[@]}" "$@")
echo "+ ${cmd[*]}" >&2
status=0
PYTORCH_ALLOC_CONF="expandable_segments:True" "${cmd[@]}" || status=$?

if [[ $status -ne 0 ]]; then
    first=$(ls "$TITAN_V4_ERROR_DIR" 2>/dev/null | sort | head -n 1 || true)
    echo >&2
    if [[ "$first" == 0_* ]]; then
        echo "titan_v4: training failed (exit code $status), $(cat "$TITAN_V4_ERROR_DIR/$first")" >&2
    elif [[ -n "$first" ]]; then
        echo "titan_v4: training failed (exit code $status): a process ended without a Python error (killed or crashed, see torchrun's summary above); then $(cut -c1-300 "$TITAN_V4_ERROR_DIR/$first")" >&2
    else
        echo "titan_v4: training failed (exit code $status); a process ended without a Python error (killed or crashed), see above" >&2
    fi
fi
exit $status
