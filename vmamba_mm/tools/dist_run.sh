#!/usr/bin/env bash
# bash dist_run.sh TOOL GPUS [TOOL args]: run TOOL (train.py or test.py, found in TOOLS_DIR, default
# this folder) on GPUS processes per node with `--launcher pytorch`, through the legacy launcher as
# OpenMMLab's scripts do; multi-node through NNODES, NODE_RANK, MASTER_ADDR and PORT.
set -euo pipefail
TOOL=$1
GPUS=$2
shift 2
TOOLS_DIR=${TOOLS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
exec "${PYTHON:-python}" -m torch.distributed.launch \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --nproc_per_node="$GPUS" \
    --master_port="${PORT:-29500}" \
    "$TOOLS_DIR/$TOOL" "$@" --launcher pytorch
