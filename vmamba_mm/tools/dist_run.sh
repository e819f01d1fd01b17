#!/usr/bin/env bash
# The common part of every dist_train.sh / dist_test.sh:
#   bash dist_run.sh TOOLS_DIR train CONFIG GPUS [train.py args]
#   bash dist_run.sh TOOLS_DIR test CONFIG CHECKPOINT GPUS [test.py args]
# runs TOOLS_DIR/{train,test}.py on GPUS processes per node with `--launcher pytorch`, through the
# legacy launcher as OpenMMLab's scripts do; multi-node through NNODES, NODE_RANK, MASTER_ADDR and PORT.
# On one node without PORT the launcher runs standalone: it picks a free port, so several jobs can share
# a machine. Without CUDA the processes run on the CPU over gloo (vmamba_mm/launch.py).
set -euo pipefail
TOOLS_DIR=$1
ACTION=$2
shift 2
case "$ACTION" in
  train) USAGE="CONFIG GPUS" ;;
  test) USAGE="CONFIG CHECKPOINT GPUS" ;;
  *) echo "$0: unknown action '$ACTION' (train or test)" >&2; exit 2 ;;
esac
NUM_POSITIONAL=$(wc -w <<< "$USAGE")
if [ $# -lt "$NUM_POSITIONAL" ]; then
  echo "usage: $TOOLS_DIR/dist_$ACTION.sh $USAGE [args...]" >&2
  exit 2
fi
# the tool's positional arguments (CONFIG [CHECKPOINT]) come before GPUS, which goes to the launcher
POSITIONAL=("${@:1:NUM_POSITIONAL-1}")
GPUS=${!NUM_POSITIONAL}
shift "$NUM_POSITIONAL"
if [ "${NNODES:-1}" = 1 ] && [ -z "${PORT:-}" ]; then
  RENDEZVOUS=(--standalone)
else
  RENDEZVOUS=(--nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}"
              --master_port="${PORT:-29500}")
fi
exec "${PYTHON:-python}" -m torch.distributed.launch "${RENDEZVOUS[@]}" --nproc_per_node="$GPUS" \
    "$TOOLS_DIR/$ACTION.py" "${POSITIONAL[@]}" "$@" --launcher pytorch
