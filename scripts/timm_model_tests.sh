#!/usr/bin/env bash
# Runs timm's own model test-suite (tests/test_models.py from the sdist of the pinned timm) on the VMamba family,
# as a timm pull request adding it would: 'vmamba' is added to the file's FEAT_INTER_FILTERS list (the families
# with forward_intermediates and the feature-getter wrapper); nothing else in it is changed.
#
#   bash scripts/timm_model_tests.sh [pytest args]      e.g. -k "vmamba_tiny_s1l8 or test_vmamba"
#
# Environment: PYTHON (default .venv/bin/python), TIMM_TESTS_DIR (where the sdist is unpacked; default
# ~/.cache/vmamba/timm-tests). The tests select the VMamba models (-k vmamba); TorchScript tests are deselected
# (the family calls custom operators, which timm excludes from scripting for its own families as well), and so
# are the two that download every released checkpoint from GitHub unless VMAMBA_TIMM_TESTS_DOWNLOAD=1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
TIMM_VERSION=$("$PY" -c 'import timm; print(timm.__version__)')
DIR="${TIMM_TESTS_DIR:-$HOME/.cache/vmamba/timm-tests}/timm-$TIMM_VERSION"

if [ ! -f "$DIR/tests/test_models.py" ]; then
  mkdir -p "$DIR"
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "timm==$TIMM_VERSION"
  tar xzf "$tmp/timm-$TIMM_VERSION.tar.gz" -C "$tmp"
  cp -r "$tmp/timm-$TIMM_VERSION/tests" "$DIR/"
  rm -rf "$tmp"
fi

RUN="$DIR/run"
rm -rf "$RUN" && mkdir -p "$RUN"
# the one change: the family joins the forward_intermediates / feature-getter list
sed "s/^FEAT_INTER_FILTERS = \[/FEAT_INTER_FILTERS = ['vmamba', /" "$DIR/tests/test_models.py" > "$RUN/test_models.py"
grep -q "FEAT_INTER_FILTERS = \['vmamba', " "$RUN/test_models.py" || { echo "could not add 'vmamba' to FEAT_INTER_FILTERS" >&2; exit 1; }
# the models must be registered before test_models.py lists them at collection
printf 'import classification.models  # noqa: F401  (registers the VMamba family with timm)\n' > "$RUN/conftest.py"

SELECT="vmamba and not torchscript"
[ "${VMAMBA_TIMM_TESTS_DOWNLOAD:-0}" = 1 ] || SELECT="$SELECT and not load_pretrained and not features_pretrained"
cd "$RUN"
exec "$PY" -m pytest -q -p no:cacheprovider -W ignore::pytest.PytestUnknownMarkWarning test_models.py -k "$SELECT" "$@"
