#!/usr/bin/env bash
# bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py args, e.g. --tta]; multi-node through
# NNODES, NODE_RANK, MASTER_ADDR and PORT.
set -euo pipefail
if [ $# -lt 3 ]; then echo "usage: $0 CONFIG CHECKPOINT GPUS [args...]" >&2; exit 2; fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
exec bash "$(dirname "${BASH_SOURCE[0]}")/dist_run.sh" test.py "$GPUS" "$CONFIG" "$CHECKPOINT" "$@"
