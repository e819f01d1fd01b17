#!/usr/bin/env bash
# One entry point for a fresh machine. Each command first creates/updates .venv (seconds when nothing changed).
#   ./dev.sh demo [main.py args]   train a small VMamba on the built-in digits dataset, print val accuracy
#   ./dev.sh test [pytest args]    run the test suite
#   ./dev.sh setup                 only create/update the environment
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
cmd="${1:-}"
[ $# -gt 0 ] && shift

bash scripts/setup_env.sh
PY="${VENV:-$ROOT/.venv}/bin/python"

case "$cmd" in
  setup) ;;
  demo)
    exec "$PY" classification/main.py --cfg classification/configs/demo/vmamba_digits.yaml \
      --output "${DEMO_OUTPUT:-$ROOT/output/demo}" "$@" ;;
  test)
    set +e
    "$PY" -m pytest -q -rs "$@"
    rc=$?
    # pytest exits 5 when it collected nothing: that is a failure here, not a pass.
    [ $rc -eq 5 ] && echo "no tests were collected" >&2
    exit $rc ;;
  *)
    echo "usage: ./dev.sh {demo|test|setup} [args]" >&2
    exit 2 ;;
esac
