#!/usr/bin/env bash
# Same launcher as detection/tools/dist_train.sh, running segmentation/tools/train.py.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOOLS_DIR=$HERE exec bash "$HERE/../../detection/tools/dist_train.sh" "$@"
