#!/usr/bin/env bash
# bash tools/dist_train.sh CONFIG GPUS [train.py args]; multi-node through NNODES, NODE_RANK,
# MASTER_ADDR and PORT. Uses the train.py beside the script that was called (TOOLS_DIR).
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 CONFIG GPUS [args...]" >&2; exit 2; fi
CONFIG=$1
GPUS=$2
shift 2
TOOLS_DIR=${TOOLS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
exec "${PYTHON:-python}" -m torch.distributed.launch \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --nproc_per_node="$GPUS" \
    --master_port="${PORT:-29500}" \
    "$TOOLS_DIR/train.py" "$CONFIG" --launcher pytorch "$@"
