#!/usr/bin/env bash
# Dump the compiled graphs and kernel inventories of every block kind (titan_v4/tools/dump_graphs.py)
# through torchrun, with run_train.sh's settings (NGPU, CONFIG_FILE, LOG_RANK), e.g.
#   ./dump_graphs.sh --job.config_file train_configs/flash_proxy.toml --out dumps/flash_proxy
#   NGPU=2 ./dump_graphs.sh --out dumps/ep2 --parallelism.expert_parallel_degree 2
set -euo pipefail
TRAIN_MODULE=titan_v4.tools.dump_graphs exec "$(dirname "$0")/run_train.sh" "$@"
