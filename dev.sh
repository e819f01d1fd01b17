#!/usr/bin/env bash
# One entry point for a fresh machine. Each command first creates/updates .venv with what it needs (seconds when
# nothing changed).
#   ./dev.sh demo [main.py args]   train a small VMamba on the built-in digits dataset, print val accuracy
#   ./dev.sh test [pytest args]    run the test suite (installs the OpenMMLab stack first, once)
#   ./dev.sh setup [--mm]          only create/update the environment (--mm: with mmcv/mmdet/mmseg)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
cmd="${1:-}"
[ $# -gt 0 ] && shift
PY="${VENV:-$ROOT/.venv}/bin/python"

case "$cmd" in
  setup)
    bash scripts/setup_env.sh "$@" ;;
  demo)
    bash scripts/setup_env.sh
    exec "$PY" classification/main.py --cfg classification/configs/demo/vmamba_digits.yaml \
      --output "${DEMO_OUTPUT:-$ROOT/output/demo}" "$@" ;;
  test)
    bash scripts/setup_env.sh --mm
    set +e
    "$PY" -m pytest -q -rs "$@"
    rc=$?
    # pytest exits 5 when it collected nothing: that is a failure here, not a pass.
    [ $rc -eq 5 ] && echo "no tests were collected" >&2
    exit $rc ;;
  *)
    echo "usage: ./dev.sh {demo|test|setup [--mm]} [args]" >&2
    exit 2 ;;
esac
