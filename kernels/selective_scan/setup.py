"""Builds the `selective_scan` package and its compiled extension `selective_scan._C`.

The extension always has the CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp: a C++ compiler is all they need). Its
CUDA part (csrc/*.cu and their bindings) is added when a CUDA toolkit and a CUDA build of torch are there, for the
architectures in TORCH_CUDA_ARCH_LIST or, when that is unset, those of the visible GPUs (restricted to what this
nvcc supports); with neither set nor visible it is skipped and one line says how to force it.
SELECTIVE_SCAN_SKIP_CUDA_BUILD=1 builds the CPU part only. Without a C++ compiler, or with torch not importable at
build time, only the Python package (the PyTorch implementation) is installed and one line says why.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup


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


def cxx_compiler():
    """The C++ compiler the build would run (CXX, else Python's configured one), or None if it is not found."""
    command = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    return shutil.which(command.split()[0])


def reason_to_skip_extension():
    """None when the extension (its CPU part at least) can be built, else the reason it cannot."""
    try:
        import torch.utils.cpp_extension  # noqa: F401
    except ImportError as error:
        return f"torch is not importable at build time ({error}); install with --no-build-isolation"
    if cxx_compiler() is None:
        return "no C++ compiler found (install g++ or set CXX)"
    return None


def visible_gpu_archs():
    """Compute capabilities (e.g. '9.0') of the GPUs torch sees, sorted; empty without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return []
    return sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def reason_to_skip_cuda():
    """None when the CUDA part can be built, else the reason it is not."""
    if os.environ.get("SELECTIVE_SCAN_SKIP_CUDA_BUILD", "0") == "1":
        return "SELECTIVE_SCAN_SKIP_CUDA_BUILD=1"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or not has_cuda_headers(CUDA_HOME):
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not visible_gpu_archs():
        return "no GPU visible and TORCH_CUDA_ARCH_LIST is unset; TORCH_CUDA_ARCH_LIST=9.0 (for example) builds it"
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
    archs = re.split(r"[;,\s]+", requested.strip()) if requested else visible_gpu_archs()
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


# the longest compile first: ninja starts them in this order
CPU_SOURCES = ["csrc/cpu/scan_cpu.cpp", "csrc/ops.cpp", "csrc/cpu/ss2d_cpu.cpp"]
CUDA_SOURCES = ["csrc/bindings.cpp", "csrc/scan_fwd.cu", "csrc/scan_bwd.cu", "csrc/ss2d_bindings.cpp",
                "csrc/ss2d_fused_fwd.cu", "csrc/ss2d_fused_bwd.cu", "csrc/ss2d_states_bwd.cu", "csrc/ss2d_states_fwd.cu",
                "csrc/ss2d_segments.cu", "csrc/layer_norm.cu"]


def cxx_flags(build_info: str):
    import torch

    flags = ["-O3", f'-DSELECTIVE_SCAN_BUILD_INFO="{build_info}"']
    if sys.platform.startswith("linux"):
        flags.append("-Wno-psabi")  # notes on how GCC passes 64-byte vectors; the kernels' vector code is inlined
        if torch.backends.openmp.is_available():
            # at::parallel_for runs on torch's OpenMP threads only when the caller is compiled with OpenMP
            flags.append("-fopenmp")
    return flags


def cpu_extension(skip_cuda_reason: str):
    from torch.utils.cpp_extension import CppExtension

    flags = cxx_flags(f"CUDA part not built: {skip_cuda_reason}")
    say(f"CPU kernels only: CUDA part not built ({skip_cuda_reason}); CUDA tensors will run the Triton kernels")
    return CppExtension(name="selective_scan._C", sources=CPU_SOURCES, extra_compile_args=flags,
                        extra_link_args=[f for f in flags if f == "-fopenmp"])


def cuda_extension():
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    archs = chosen_archs(CUDA_HOME)
    # torch's build helper reads the list from the environment; hand it the filtered one.
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    arch_names = ",".join("sm_" + a.replace(".", "").replace("+PTX", "") for a in archs)
    version = nvcc_version(CUDA_HOME)
    say(f"CPU kernels and CUDA kernels for {arch_names} with CUDA {version}")
    flags = cxx_flags(f"CUDA kernels for {arch_names} with CUDA {version}") + ["-DSELECTIVE_SCAN_WITH_CUDA"]
    return CUDAExtension(
        name="selective_scan._C",
        sources=CPU_SOURCES + CUDA_SOURCES,
        extra_compile_args={
            "cxx": flags,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                     # tuning knobs for experiments, e.g. "-DSCAN_BWD_MIN_BLOCKS_N1=2"
                     *os.environ.get("SELECTIVE_SCAN_NVCC_FLAGS", "").split()],
        },
        extra_link_args=[f for f in flags if f == "-fopenmp"],
    )


ext_modules, cmdclass = [], {}
point_cuda_home_at_a_toolkit()  # before torch.utils.cpp_extension reads CUDA_HOME at import
skip_reason = reason_to_skip_extension()
if skip_reason is None:
    from torch.utils.cpp_extension import BuildExtension

    skip_cuda_reason = reason_to_skip_cuda()
    ext_modules = [cuda_extension() if skip_cuda_reason is None else cpu_extension(skip_cuda_reason)]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
else:
    say(f"extension not built ({skip_reason}): CPU tensors will run the PyTorch path, CUDA tensors the Triton "
        "kernels")

setup(
    name="selective_scan",
    version="0.1.0",
    description="Selective scan (S6) for VMamba: CPU and CUDA kernels plus an exact chunked PyTorch path",
    packages=["selective_scan"],
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
