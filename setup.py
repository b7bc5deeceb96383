"""Build vita_ext._C: one extension holding every op's CPU and (when possible) CUDA kernels.

CUDA kernels are compiled when torch is a CUDA build and nvcc is found, unless
VITA_EXT_CPU_ONLY=1. With no GPU visible, TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0".
MAX_JOBS limits ninja's parallelism (torch.utils.cpp_extension reads it).
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_namespace_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _nvcc_version(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None, None
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return nvcc, None
    release = [line for line in out.splitlines() if "release" in line]
    return nvcc, (release[-1].split("release")[-1].split(",")[0].strip() if release else None)


def _want_cuda():
    if os.environ.get("VITA_EXT_CPU_ONLY", "0") not in ("", "0"):
        return False, "VITA_EXT_CPU_ONLY is set"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    nvcc, _ = _nvcc_version(cpp_extension.CUDA_HOME)
    if nvcc is None:
        return False, f"no nvcc under CUDA_HOME={cpp_extension.CUDA_HOME}"
    return True, ""


def _pip_cuda_include_dirs():
    """Headers torch's CUDA headers need (cuBLAS, cuSPARSE, cuSOLVER) that a bare toolkit may lack:
    the torch wheel brings them as nvidia-* pip packages."""
    dirs = []
    if os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cublas_v2.h")):
        return dirs
    for site in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(site, pattern))):
                if os.path.exists(os.path.join(d, "cublas_v2.h")) or os.path.exists(os.path.join(d, "cusparse.h")):
                    dirs.append(d)
    return list(dict.fromkeys(dirs))


def _cublas_link_args():
    """Link cuBLAS/cuBLASLt (the kernels call cublasGemmEx for fp32-output GEMMs). A bare toolkit may
    lack them; torch's wheel then brings them as nvidia-cublas, and at run time the copy torch already
    loaded (same soname) is the one used."""
    lib64 = os.path.join(cpp_extension.CUDA_HOME, "lib64")
    if os.path.exists(os.path.join(lib64, "libcublas.so")):
        return ["-L" + lib64, "-lcublas", "-lcublasLt"]
    for site in sys.path:
        for d in sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib"))):
            blas = sorted(glob.glob(os.path.join(d, "libcublas.so.*")))
            blas_lt = sorted(glob.glob(os.path.join(d, "libcublasLt.so.*")))
            if blas and blas_lt:
                return ["-L" + d, "-Wl,-rpath," + d, "-l:" + os.path.basename(blas[0]),
                        "-l:" + os.path.basename(blas_lt[0])]
    raise RuntimeError("vita_ext: cuBLAS not found (neither $CUDA_HOME/lib64/libcublas.so nor torch's nvidia-cublas "
                       "package); install the CUDA toolkit's cuBLAS or build CPU-only with VITA_EXT_CPU_ONLY=1")


def make_extension():
    with_cuda, why_not = _want_cuda()
    cpp_sources = ["csrc/vita_ext.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    arch_list = ""
    nvcc_version = None
    define_macros = [("VITA_EXT_TORCH_VERSION", f'"{torch.__version__}"')]
    # at::parallel_for only runs in parallel when the caller is compiled with OpenMP (ATen/Parallel-inl.h
    # checks _OPENMP); without it every CPU kernel would run on one core.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # -fno-trapping-math (as torch's own build): lets the compiler turn the kernels' float comparisons
    # (NaN-preserving clamps, selects) into vector blends; NaN/Inf values are unaffected, only FP
    # exception flags, which nothing here reads.
    cxx_flags = ["-O3", "-fno-trapping-math", "-fno-math-errno"] + openmp
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                  "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_OPERATORS__"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected from the visible GPU")
        _, nvcc_version = _nvcc_version(cpp_extension.CUDA_HOME)
        include_dirs += _pip_cuda_include_dirs()
        define_macros += [("VITA_EXT_WITH_CUDA", "1"), ("VITA_EXT_ARCH_LIST", f'"{arch_list}"'),
                          ("VITA_EXT_CUDA_VERSION", f'"{torch.version.cuda}"'),
                          ("VITA_EXT_NVCC_VERSION", f'"{nvcc_version}"')]
        ext_cls = cpp_extension.CUDAExtension
        sources = cpp_sources + cu_sources
        extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
        link_args = _cublas_link_args() + openmp
    else:
        ext_cls = cpp_extension.CppExtension
        sources = cpp_sources
        extra = {"cxx": cxx_flags}
        link_args = list(openmp)
    print("vita_ext build configuration:", flush=True)
    print(f"  torch           {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  kernels         {'CPU + CUDA' if with_cuda else 'CPU only (' + why_not + ')'}")
    if with_cuda:
        print(f"  nvcc            {nvcc_version} at {cpp_extension.CUDA_HOME}")
        print(f"  arch list       {arch_list}")
    print(f"  OpenMP          {'yes' if openmp else 'no (CPU kernels run single-threaded)'}")
    print(f"  MAX_JOBS        {os.environ.get('MAX_JOBS', 'unset (ninja default)')}")
    print(f"  sources         {len(sources)} files", flush=True)
    return ext_cls(name="vita_ext._C", sources=sources, include_dirs=include_dirs,
                   define_macros=define_macros, extra_compile_args=extra, extra_link_args=link_args)


setup(
    # namespace search: the asset folders (no __init__.py) are packages too, so their data ships
    packages=find_namespace_packages(include=["vita_ext", "vita_ext.*"], exclude=["*.__pycache__"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    include_package_data=True,
)
