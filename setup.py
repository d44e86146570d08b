"""Builds the llmfast._C extension.

The C++ CPU kernels are always compiled. The CUDA kernels are compiled too whenever torch is
a CUDA build and nvcc is found -- no GPU is needed to build. Environment variables:

  LLMFAST_CUDA_ARCHS   gencode targets, default "80;90a" (e.g. "90a" for a Hopper-only build)
  LLMFAST_NO_CUDA=1    build the CPU kernels only
  MAX_JOBS             parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _find_cuda_home():
    # /usr/local/bin/nvcc may be a wrapper script, so torch's guess (dirname(dirname(nvcc)))
    # would be /usr/local. Prefer an explicit CUDA_HOME, then the usual install prefix.
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


cuda_home = _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvidia_wheel_includes():
    """Headers (cusparse.h, cublas_v2.h...) that torch's CUDA headers include, shipped by the
    nvidia-* wheels under site-packages/nvidia/cu13/include rather than in the toolkit."""
    dirs = []
    for path in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            d = os.path.join(path, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def _gencode_flags():
    archs = os.environ.get("LLMFAST_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
    flags = []
    for arch in filter(None, (a.strip() for a in archs)):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _want_cuda():
    if os.environ.get("LLMFAST_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and cuda_home is not None


cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))

# torch picks the C++ standard its headers need (C++17 or C++20). ATen's at::parallel_for only
# runs on several threads in code compiled with OpenMP. -fno-trapping-math lets the compiler
# turn the CPU kernels' floating-point selects into SIMD blends (with the default
# -ftrapping-math, GCC keeps a branch per element and the loops stay scalar); llmfast never
# reads floating-point exception flags.
cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
link_flags = ["-fopenmp"]
# The C++ runtime must be the shared libstdc++ that torch uses. A compiler set up to link it
# statically (seen on a GPU machine: CXX=/opt/gcc/bin/g++, a wrapper that adds
# -static-libstdc++) gives an extension whose every C++ exception (each failed TORCH_CHECK)
# kills the process with a segmentation fault, or corrupts the error message. An explicit
# -lstdc++ among the objects binds the shared library whatever the driver adds later.
if sys.platform.startswith("linux"):
    link_flags.append("-lstdc++")
include_dirs = [os.path.join(ROOT, "csrc")]

if _want_cuda():
    include_dirs += _nvidia_wheel_includes()
    ext = CUDAExtension(
        name="llmfast._C",
        sources=cpp_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=[("LLMFAST_WITH_CUDA", "1")],
        extra_link_args=link_flags,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": [
                "-O3",
                "--use_fast_math",
                "--expt-relaxed-constexpr",
                "-lineinfo",
                "-U__CUDA_NO_HALF_OPERATORS__",
                "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            ]
            + _gencode_flags(),
        },
    )
else:
    ext = CppExtension(
        name="llmfast._C",
        sources=cpp_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

setup(
    name="llmfast",
    version="0.1.0",
    description="Fused GPU kernels (CUDA and Triton) for training transformer language models",
    packages=find_packages(include=["llmfast", "llmfast.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={"triton": ["triton>=3.2"], "bench": ["matplotlib", "pytest-benchmark"]},
)
