"""The CMake build (CMakeLists.txt against libtorch) compiles the same sources into a working
_C library. CPU kernels only here, to keep CI short; scripts/gpu_run.sh --cmake builds the CUDA
kernels too on a GPU machine."""
import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _needed_libraries(path):
    """The DT_NEEDED entries of a shared library (readelf), or None where readelf is missing."""
    if shutil.which("readelf") is None:
        return None
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_a_working_library(tmp_path):
    """Also with a compiler that links libstdc++ statically (a wrapper adding -static-libstdc++,
    as a GPU machine's CXX=/opt/gcc/bin/g++ did): the library must still take torch's shared
    libstdc++, else every failed check segfaults or garbles its message."""
    build = tmp_path / "build"
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    wrapper = tmp_path / "static-libstdcxx-g++"
    wrapper.write_text(f'#!/bin/sh\nexec {cxx} "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    configure = [
        "cmake", "-S", ROOT, "-B", str(build), "-DLLMFAST_WITH_CUDA=OFF", f"-DCMAKE_CXX_COMPILER={wrapper}",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython3_EXECUTABLE={sys.executable}",
    ]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    libs = glob.glob(str(build / "llmfast" / "_C*.so"))
    assert libs, "CMake produced no _C library"

    # Load it in a fresh process (this one already registered the ops from llmfast._C) and run
    # an op against the reference.
    script = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({libs[0]!r})
        x = torch.randn(5, 33)
        w, b = torch.randn(33), torch.randn(33)
        out, _, _, _ = torch.ops.llmfast.norm_fwd(x, None, w, b, 1e-5, False)
        torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (33,), w, b))
        try:
            torch.ops.llmfast.norm_fwd(x, None, w[:32], None, 1e-5, False)
        except RuntimeError as e:
            assert "weight must have 33 elements, got 32" in str(e), str(e)
        else:
            raise AssertionError("a bad weight was accepted")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    needed = _needed_libraries(libs[0])
    if needed is not None:
        assert any(name.startswith("libstdc++") for name in needed), f"no shared libstdc++ in {needed}"


def test_extension_takes_the_shared_libstdcxx():
    """The in-place (setup.py) build of llmfast._C, as above."""
    import llmfast

    if llmfast._extension._C is None:
        pytest.skip("llmfast._C is not built here")
    needed = _needed_libraries(llmfast._extension._C.__file__)
    if needed is None:
        pytest.skip("readelf is not installed")
    assert any(name.startswith("libstdc++") for name in needed), f"no shared libstdc++ in {needed}"
