#!/usr/bin/env bash
# bash tools/dist_train.sh CONFIG GPUS [train.py args]; multi-node through NNODES, NODE_RANK,
# MASTER_ADDR and PORT.
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 CONFIG GPUS [args...]" >&2; exit 2; fi
CONFIG=$1
GPUS=$2
shift 2
exec bash "$(dirname "${BASH_SOURCE[0]}")/dist_run.sh" train.py "$GPUS" "$CONFIG" "$@"
