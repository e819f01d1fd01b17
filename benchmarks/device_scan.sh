#!/usr/bin/env bash
# On the GPU machine: build the selective-scan extension for the card, run its CUDA and CPU tests, then
# benchmark it. Logs and JSON go to $OUT (or ./device_scan_out); the benchmark table is printed last.
#   bash benchmarks/device_scan.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_scan_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/selective_scan_site

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
start=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST="${SCAN_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" python3 -m pip install \
    --no-build-isolation --no-deps --no-cache-dir --upgrade --target "$SITE" ./kernels/selective_scan \
    >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
export PYTHONPATH="$SITE:$PWD"
python3 -c "import selective_scan; print(selective_scan.build_info())"

python3 -m pytest -q -p no:cacheprovider --tb=short --maxfail=15 \
  tests/test_selective_scan_cuda.py tests/test_selective_scan.py >"$OUT/tests.log" 2>&1
tests_rc=$?
grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/tests.log" | head -40
tail -3 "$OUT/tests.log"

# Optional second build with other tuning flags (e.g. SCAN_VARIANT_FLAGS="-DSCAN_BWD_MIN_BLOCKS_N1=2"),
# benchmarked after the default one.
if [ -n "${SCAN_VARIANT_FLAGS:-}" ]; then
  start=$(date +%s)
  TORCH_CUDA_ARCH_LIST="${SCAN_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" SELECTIVE_SCAN_NVCC_FLAGS="$SCAN_VARIANT_FLAGS" \
    python3 -m pip install --no-build-isolation --no-deps --no-cache-dir --upgrade --target "$SITE-variant" \
    ./kernels/selective_scan >"$OUT/build_variant.log" 2>&1 && echo "variant build: $(( $(date +%s) - start )) s" &&
    PYTHONPATH="$SITE-variant:$PWD" python3 benchmarks/bench_scan.py >"$OUT/bench_variant.log" 2>&1
  echo "## variant $SCAN_VARIANT_FLAGS"
  tail -9 "$OUT/bench_variant.log"
fi

python3 benchmarks/bench_scan.py --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
bench_rc=$?
echo "## default build"
cat "$OUT/bench.log"
echo "tests rc=$tests_rc bench rc=$bench_rc"
