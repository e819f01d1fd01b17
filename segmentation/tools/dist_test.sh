#!/usr/bin/env bash
# Same launcher as detection/tools/dist_test.sh, running segmentation/tools/test.py.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOOLS_DIR=$HERE exec bash "$HERE/../../detection/tools/dist_test.sh" "$@"
