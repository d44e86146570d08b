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


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_a_working_library(tmp_path):
    build = tmp_path / "build"
    configure = [
        "cmake", "-S", ROOT, "-B", str(build), "-DLLMFAST_WITH_CUDA=OFF",
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
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
