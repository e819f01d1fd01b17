# Sourced from the repository root on the GPU machine by device_check.sh, device_scan.sh and device_ss2d.sh, with
# $OUT set: records the GPU, installs the carried wheels (.whl/, staged by stage_device_wheels.sh) if there are
# any, builds the selective-scan extension for the card (TORCH_CUDA_ARCH_LIST from SCAN_ARCH_LIST, default 9.0;
# SELECTIVE_SCAN_NVCC_FLAGS passes through) unless a built one is carried in
# kernels/selective_scan/selective_scan/, and exports PYTHONPATH. The build always runs otherwise: on a warm
# machine ninja recompiles only what changed, and a stale build is never picked up.
export PYTHON=python3 PYTHONUNBUFFERED=1
SITE=/tmp/site
KERNEL_SITE=/tmp/selective_scan_site

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi
if ls kernels/selective_scan/selective_scan/_C*.so >/dev/null 2>&1; then
  export PYTHONPATH="$SITE:$PWD:$PWD/kernels/selective_scan"
else
  export PYTHONPATH="$KERNEL_SITE:$SITE:$PWD"
  start=$(date +%s)
  TORCH_CUDA_ARCH_LIST="${SCAN_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" python3 -m pip install \
      --no-build-isolation --no-deps --no-cache-dir --upgrade --target "$KERNEL_SITE" ./kernels/selective_scan \
      >"$OUT/build.log" 2>&1 \
    || { grep -E "error|Error" "$OUT/build.log" | head -40; echo "BUILD FAILED"; exit 1; }
  echo "kernel build: $(( $(date +%s) - start )) s"
fi
python3 -c "import selective_scan, torch; print(selective_scan.build_info(), '| torch', torch.__version__)"
