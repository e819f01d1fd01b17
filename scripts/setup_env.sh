#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv in the repository root).
#
#   bash scripts/setup_env.sh        torch, timm, the kernel package and the project (requirements.txt)
#   bash scripts/setup_env.sh --mm   also the OpenMMLab stack for detection / segmentation (requirements-mm.txt,
#                                    mmengine, and mmcv 2.1.0 built once and cached as a wheel)
#
# Idempotent: every step writes a stamp keyed on what it installed from, so a second run that finds
# nothing changed finishes in seconds. Environment knobs:
#   VENV                   where the venv lives            (default: <repo>/.venv)
#   PYTHON                 interpreter used to create it   (default: python3.11, else python3)
#   VMAMBA_CACHE           built-wheel cache                (default: ~/.cache/vmamba)
#   TORCH_CUDA_ARCH_LIST   archs for the selective-scan CUDA kernels (default: the visible GPUs'; with none
#                          visible only the CPU kernels are built)
#   MAX_JOBS               parallel compile jobs            (default: nproc)
set -euo pipefail

WITH_MM=0
for arg in "$@"; do
  case "$arg" in
    --mm) WITH_MM=1 ;;
    *) echo "usage: bash scripts/setup_env.sh [--mm]" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
CACHE="${VMAMBA_CACHE:-$HOME/.cache/vmamba}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

now() { date +%s; }
step() { echo "[setup] $1 ($(( $(now) - $2 ))s)"; }
stamp_ok() { [ -f "$VENV/.stamp-$1" ] && [ "$(cat "$VENV/.stamp-$1")" = "$2" ]; }
stamp_set() { echo "$2" > "$VENV/.stamp-$1"; }
hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

T0=$(now)
if [ ! -x "$PY" ]; then
  BASE_PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  "$BASE_PY" -m venv "$VENV"
  step "created venv at $VENV with $("$PY" --version)" "$T0"
fi

# 1. pinned third-party packages
REQ_HASH=$(hash_of "$ROOT/requirements.txt")
if ! stamp_ok requirements "$REQ_HASH"; then
  t=$(now)
  "${PIP[@]}" install -r "$ROOT/requirements.txt"
  stamp_set requirements "$REQ_HASH"
  step "installed requirements.txt" "$t"
fi

# 2. the selective-scan package (its CPU kernels, and its CUDA kernels where a CUDA toolkit, CUDA torch and a GPU or
#    TORCH_CUDA_ARCH_LIST are there)
KERNEL_HASH=$(cd "$ROOT/kernels/selective_scan" && find . -type f \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' -o -name '*.toml' \) -not -path './build/*' | sort | xargs cat | sha256sum | cut -c1-16)
KERNEL_KEY="$KERNEL_HASH-${TORCH_CUDA_ARCH_LIST:-visible GPUs}"
if ! stamp_ok selective_scan "$KERNEL_KEY"; then
  t=$(now)
  "${PIP[@]}" install --no-build-isolation --no-deps "$ROOT/kernels/selective_scan"
  stamp_set selective_scan "$KERNEL_KEY"
  step "installed selective_scan ($("$PY" -c 'import selective_scan; print(selective_scan.build_info())'))" "$t"
fi

# 3. the project itself, editable (classification, detection, segmentation, analyze)
PROJ_HASH=$(hash_of "$ROOT/pyproject.toml")
if ! stamp_ok project "$PROJ_HASH"; then
  t=$(now)
  "${PIP[@]}" install --no-build-isolation --no-deps -e "$ROOT"
  stamp_set project "$PROJ_HASH"
  step "installed the project (editable)" "$t"
fi

# 4. with --mm: the OpenMMLab stack, and mmcv 2.1.0 with CPU ops, built once and cached as a wheel (the build takes
#    ~7 minutes on 2 cores)
if [ "$WITH_MM" = 1 ]; then
  MM_HASH=$(hash_of "$ROOT/requirements-mm.txt")
  if ! stamp_ok mm-requirements "$MM_HASH"; then
    t=$(now)
    "${PIP[@]}" install -r "$ROOT/requirements-mm.txt"
    "${PIP[@]}" install --no-deps mmengine==0.10.7
    stamp_set mm-requirements "$MM_HASH"
    step "installed requirements-mm.txt + mmengine" "$t"
  fi
  TORCH_V=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
  PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  MMCV_DIR="$CACHE/mmcv-2.1.0-torch$TORCH_V-$PY_TAG"
  if ! "$PY" -c 'import mmcv, mmcv.ops' >/dev/null 2>&1; then
    WHL=$(ls "$MMCV_DIR"/mmcv-2.1.0-*.whl 2>/dev/null | head -1 || true)
    if [ -z "$WHL" ]; then
      t=$(now)
      SRC=$(mktemp -d)
      "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation -d "$SRC" mmcv==2.1.0
      tar xzf "$SRC"/mmcv-2.1.0.tar.gz -C "$SRC"
      # torch >= 2.10 headers need C++20, and mmcv 2.1.0 hard-codes -std=c++17 after CFLAGS.
      sed -i "s/'-std=c++17'/'-std=c++20'/g" "$SRC"/mmcv-2.1.0/setup.py
      ( cd "$SRC"/mmcv-2.1.0 && FORCE_CUDA=0 MMCV_WITH_OPS=1 CFLAGS=-g0 \
          "$PY" -m pip --disable-pip-version-check -q wheel --no-deps --no-build-isolation -w "$SRC/out" . )
      mkdir -p "$MMCV_DIR"
      cp "$SRC"/out/mmcv-2.1.0-*.whl "$MMCV_DIR/"
      rm -rf "$SRC"
      WHL=$(ls "$MMCV_DIR"/mmcv-2.1.0-*.whl | head -1)
      step "built mmcv wheel into $MMCV_DIR" "$t"
    fi
    t=$(now)
    "${PIP[@]}" install --no-deps "$WHL"
    step "installed $(basename "$WHL")" "$t"
  fi
fi

step "environment ready: $VENV" "$T0"
