"""Builds the `selective_scan` package and, when possible, its CUDA extension `selective_scan._C`.

The extension is compiled for the architectures in TORCH_CUDA_ARCH_LIST (default: 8.0;8.6;8.9;9.0,
restricted to what this nvcc supports) and needs no GPU at build time. Without a CUDA toolkit, with a
CPU-only torch, or with SELECTIVE_SCAN_SKIP_CUDA_BUILD=1, only the Python package (the torch path) is
installed and one message says why.
"""

import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

DEFAULT_ARCHS = ["8.0", "8.6", "8.9", "9.0"]
HERE = os.path.dirname(os.path.abspath(__file__))


def say(message: str) -> None:
    print(f"[selective_scan] {message}", file=sys.stderr, flush=True)


def has_cuda_headers(root) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h"))


def point_cuda_home_at_a_toolkit() -> None:
    """torch guesses CUDA_HOME as the parent of the directory holding `nvcc`; when that `nvcc` is a
    wrapper script (e.g. /usr/local/bin/nvcc) the guess has no headers. Find the real toolkit first."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
                       os.path.dirname(os.path.dirname(nvcc))]
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if has_cuda_headers(root):
            os.environ["CUDA_HOME"] = root
            return


def reason_to_skip_cuda():
    """Returns None when the extension can be built, else the reason it cannot."""
    if os.environ.get("SELECTIVE_SCAN_SKIP_CUDA_BUILD", "0") == "1":
        return "SELECTIVE_SCAN_SKIP_CUDA_BUILD=1"
    point_cuda_home_at_a_toolkit()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as error:
        return f"torch is not importable at build time ({error}); install with --no-build-isolation"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or not has_cuda_headers(CUDA_HOME):
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return None


def nvcc_supported_archs(cuda_home: str):
    """Compute capabilities (e.g. '9.0') this nvcc can compile for; None if it cannot be asked."""
    try:
        listing = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
                                 capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {f"{int(m[:-1])}.{m[-1]}" for m in re.findall(r"compute_(\d+)", listing)}


def nvcc_version(cuda_home: str) -> str:
    try:
        text = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                              capture_output=True, text=True, check=True).stdout
        return re.search(r"release (\d+\.\d+)", text).group(1)
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return "unknown"


def chosen_archs(cuda_home: str):
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST")
    archs = re.split(r"[;,\s]+", requested.strip()) if requested else DEFAULT_ARCHS
    archs = [a for a in archs if a]
    supported = nvcc_supported_archs(cuda_home)
    if supported is not None:
        # "9.0a" / "8.6+PTX" are variants of a base architecture that --list-gpu-arch names as compute_90.
        dropped = [a for a in archs if re.sub(r"[a-z]$", "", a.replace("+PTX", "")) not in supported]
        if dropped:
            say(f"nvcc does not support {', '.join(dropped)}; skipping them")
        archs = [a for a in archs if a not in dropped]
    if not archs:
        raise RuntimeError("no CUDA architecture left to build for; check TORCH_CUDA_ARCH_LIST")
    return archs


def cuda_extension():
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    archs = chosen_archs(CUDA_HOME)
    # torch's build helper reads the list from the environment; hand it the filtered one.
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    arch_names = ",".join("sm_" + a.replace(".", "").replace("+PTX", "") for a in archs)
    version = nvcc_version(CUDA_HOME)
    say(f"CUDA extension built for {arch_names} with CUDA {version}")
    info_define = f'-DSELECTIVE_SCAN_BUILD_INFO="CUDA extension built for {arch_names} with CUDA {version}"'
    sources = [os.path.join("csrc", name) for name in (
        "bindings.cpp", "scan_fwd.cu", "scan_bwd.cu", "ss2d_bindings.cpp", "ss2d_fused_fwd.cu", "ss2d_fused_bwd.cu",
        "ss2d_segments.cu", "layer_norm.cu")]
    return CUDAExtension(
        name="selective_scan._C",
        sources=sources,
        extra_compile_args={
            "cxx": ["-O3", info_define],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                     # tuning knobs for experiments, e.g. "-DSCAN_BWD_MIN_BLOCKS_N1=2"
                     *os.environ.get("SELECTIVE_SCAN_NVCC_FLAGS", "").split()],
        },
    )


ext_modules, cmdclass = [], {}
skip_reason = reason_to_skip_cuda()
if skip_reason is None:
    from torch.utils.cpp_extension import BuildExtension

    ext_modules = [cuda_extension()]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
else:
    say(f"torch path only: CUDA extension not built ({skip_reason})")

setup(
    name="selective_scan",
    version="0.1.0",
    description="Selective scan (S6) for VMamba: CUDA extension plus an exact chunked PyTorch path",
    packages=["selective_scan"],
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
