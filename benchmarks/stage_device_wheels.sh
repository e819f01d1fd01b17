#!/usr/bin/env bash
# Stage the Python 3.12 wheels the GPU image lacks into .whl/ (git-ignored), for `carry: [".whl"]`:
# the shared set (mm*, fvcore, yacs, ...) plus what mmseg imports at start-up and the shared set misses.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/device/stage-wheels.sh
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl ftfy==6.3.1 regex==2026.11.15
echo "staged $(ls .whl | wc -l) wheels in .whl/"
