#!/usr/bin/env bash
# On the GPU machine: build the selective-scan extension for the card, run its CUDA and CPU tests, then
# benchmark it. Logs and JSON go to $OUT (or ./device_scan_out); the benchmark table is printed last.
#   bash benchmarks/device_scan.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_scan_out}"
mkdir -p "$OUT"
source benchmarks/device_setup.sh

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
    python3 -m pip install --no-build-isolation --no-deps --no-cache-dir --upgrade --target "$KERNEL_SITE-variant" \
    ./kernels/selective_scan >"$OUT/build_variant.log" 2>&1 && echo "variant build: $(( $(date +%s) - start )) s" &&
    PYTHONPATH="$KERNEL_SITE-variant:$PWD" python3 benchmarks/bench_scan.py >"$OUT/bench_variant.log" 2>&1
  echo "## variant $SCAN_VARIANT_FLAGS"
  tail -11 "$OUT/bench_variant.log"
fi

python3 benchmarks/bench_scan.py --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
bench_rc=$?
python3 benchmarks/bench_scan.py --calls 10 --json "$OUT/bench_b2b.json" >"$OUT/bench_b2b.log" 2>&1

# Optional Nsight Compute profile of the fp16 kernels at the stages in SCAN_NCU (e.g. "0 1"): full report
# in $OUT/ncu.txt, the headline metrics printed.
for stage in ${SCAN_NCU:-}; do
  command -v ncu >/dev/null || break
  echo "## ncu, stage $stage"
  timeout 200 ncu --set full -k regex:scan_ -c 2 python3 benchmarks/bench_scan.py --profile "$stage" >>"$OUT/ncu.txt" 2>&1
done
if [ -n "${SCAN_NCU:-}" ]; then
  grep -E "scan_(fwd|bwd)_kernel|^ +(Duration|DRAM Throughput|L2 Cache Throughput|Issue Slots Busy|Executed Instructions|Registers Per Thread|Achieved Occupancy|Local Memory Spilling Requests) " "$OUT/ncu.txt" | cut -c1-110
fi

echo "## default build, back-to-back calls"
tail -9 "$OUT/bench_b2b.log"
echo "## default build"
cat "$OUT/bench.log"
echo "tests rc=$tests_rc bench rc=$bench_rc"
