#!/usr/bin/env bash
# bash tools/dist_train.sh CONFIG GPUS [train.py args]: this folder's train.py on GPUS processes per
# node; multi-node through NNODES, NODE_RANK, MASTER_ADDR and PORT (see vmamba_mm/tools/dist_run.sh).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$HERE/../../vmamba_mm/tools/dist_run.sh" "$HERE" train "$@"
