"""The CUDA attention kernels, run on the CPU through the SIMT emulator.

csrc/attention/attention_cuda_launch.h (launchers) and attention_cuda.cuh (kernels) are compiled
as plain C++ with LLMFAST_SIMT_EMULATION (csrc/common/simt_emulator.h: every CUDA thread a
fiber, barriers, warp shuffles and the tensor-core mma.m16n8k16 modelled from PTX's fragment
layout) into a small extension, tests/emulation/attention_emulated.cpp. The attention tests'
own checks (test_attention._check: values and gradients of q, k, v and an additive mask against
a float64 reference by the FlashAttention rule, fully masked rows, lse) then run with those
kernels in place of the 'cpu' backend's. This tests the kernels' logic -- indexing, fragment
layouts, online softmax, masks, band, GQA, dropout, every element written -- on machines
without a GPU; a GPU run (tests/test_attention.py with the 'cuda' backend) tests the rest.

Emulated fp32 runs the kernels' shuffle-based fp32 product, thousands of fiber switches per
tile, so fp32 gets the small cases only.
"""
import os
import shutil
import zlib

import pytest
import torch

import llmfast
import llmfast.functional as LF
from llmfast.ops import attention as attention_ops

import test_attention as ta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_include():
    """A CUDA toolkit include directory with the fp16/bf16 headers (host-usable)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, candidates):
        inc = os.path.join(home, "include")
        if os.path.exists(os.path.join(inc, "cuda_fp16.h")) and os.path.exists(os.path.join(inc, "crt", "host_defines.h")):
            return inc
    return None


def build_emulated(name, source, needs):
    """Compiles tests/emulation/<source> (CUDA launchers built for the SIMT emulator) into the
    extension `name` under build/emulation/<name>, or skips the test when the CUDA headers or
    llmfast._C (`needs`: what the test uses it for) are missing."""
    inc = _cuda_include()
    if inc is None:
        pytest.skip("no CUDA toolkit headers (cuda_fp16.h) to compile the emulated kernels against")
    if not llmfast._extension.has_extension:
        pytest.skip(f"llmfast._C is not built ({needs})")
    from torch.utils import cpp_extension

    build = os.path.join(ROOT, "build", "emulation", name)
    os.makedirs(build, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[os.path.join(ROOT, "tests", "emulation", source)],
        extra_include_paths=[os.path.join(ROOT, "csrc"), inc],
        extra_cflags=["-O2", "-DLLMFAST_SIMT_EMULATION", "-fno-strict-aliasing"],
        build_directory=build,
        verbose=False,
    )


@pytest.fixture(scope="module")
def emulated():
    return build_emulated("llmfast_attention_emulated", "attention_emulated.cpp",
                          "the emulated kernels are compared through its ops' schemas")


@pytest.fixture
def cuda_kernels_as_cpu(emulated, monkeypatch):
    """The 'cpu' backend runs the emulated CUDA kernels for the duration of a test."""
    original = attention_ops.kernels

    def kernels(backend):
        if backend == "cpu":
            return emulated.attention_fwd, emulated.attention_bwd
        return original(backend)

    monkeypatch.setattr(attention_ops, "kernels", kernels)
    return emulated


SMALL = {"s1_d16", "s17_d40", "dv_ne_d", "bool_mask_dead_rows", "window_dead_rows", "mqa"}
# The dQ of the backward has two paths (attention_cuda.cuh): 'fused' into the dK/dV kernel with
# atomic fp32 sums (fp16/bf16 by default), and the deterministic dQ kernel (under
# torch.use_deterministic_algorithms, which the `poison` fixture turns on, for fp32, and when an
# additive mask needs its gradient). Each case runs through both, split across the dtypes.
DETERMINISTIC = ([pytest.param(torch.float16, c, id=f"float16-{c[0]}") for c in ta.CASES]
                 + [pytest.param(torch.float32, c, id=f"float32-{c[0]}") for c in ta.CASES if c[0] in SMALL])
FUSED = ([pytest.param(torch.bfloat16, c, id=f"bfloat16-{c[0]}") for c in ta.CASES]
         + [pytest.param(torch.float16, c, id=f"float16-{c[0]}") for c in ta.CASES if c[0] in SMALL])


@pytest.mark.parametrize("dtype,case", DETERMINISTIC)
def test_emulated_cuda_kernels_deterministic_path(cuda_kernels_as_cpu, dtype, case, poison):
    assert torch.are_deterministic_algorithms_enabled()
    ta._check("cpu", "cpu", dtype, case)


@pytest.mark.parametrize("dtype,case", FUSED)
def test_emulated_cuda_kernels_fused_dq_path(cuda_kernels_as_cpu, dtype, case):
    assert not torch.are_deterministic_algorithms_enabled()
    ta._check("cpu", "cpu", dtype, case)


def test_emulated_fp32_head_dim_256(cuda_kernels_as_cpu, poison):
    """fp32 at head dim 256 takes the smallest tiles (32 x 32, two warps in dK/dV)."""
    ta._check("cpu", "cpu", torch.float32, ("fp32_d256", 1, 1, 1, 35, 33, 256, 200, True, None, None, None))


# Head dims over 128 split dK/dV over two blocks per key block (Tiles::kDkdvSplits), 128
# columns each: D and Dv that end inside the second half, or below it for one of the two.
SPLIT_COLUMNS = [("d136_dv200", 1, 2, 2, 37, 45, 136, 200, False, None, None, None),
                 ("d96_dv160_causal_gqa", 1, 2, 1, 33, 33, 96, 160, True, None, None, None)]


@pytest.mark.parametrize("deterministic", [False, True], ids=["fused_dq", "dq_kernel"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", SPLIT_COLUMNS, ids=[c[0] for c in SPLIT_COLUMNS])
def test_emulated_split_dkdv_columns(cuda_kernels_as_cpu, case, dtype, deterministic, poison):
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    ta._check("cpu", "cpu", dtype, case)


def test_emulated_nan_propagates_as_torch(cuda_kernels_as_cpu):
    """NaN queries, keys and mask entries (and +inf mask entries) give NaN rows, not the zeros of a
    fully masked row (the forward's row sum is NaN there, not 0)."""
    ta.check_nan_propagates_as_torch("cpu", "cpu", torch.float16)


def test_emulated_dropout_matches_cpu_kernels(cuda_kernels_as_cpu):
    """The CUDA kernels draw the CPU kernels' dropout pattern: same seed, same output and
    gradients (up to rounding) as the C++ CPU kernels."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, s, 32, dtype=torch.float16) for s in (45, 70, 70))
    gout = torch.randn(1, 2, 45, 32, dtype=torch.float16)
    seed = torch.tensor([123456789], dtype=torch.int64)
    args = (None, 32 ** -0.5, -1, 0, 0.0, 0.3, seed)
    emu_out, emu_lse = cuda_kernels_as_cpu.attention_fwd(q, k, v, *args)
    cpu_out, cpu_lse = torch.ops.llmfast.attention_fwd(q, k, v, *args)
    torch.testing.assert_close(emu_out, cpu_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(emu_lse, cpu_lse, atol=1e-5, rtol=1e-5)
    emu = cuda_kernels_as_cpu.attention_bwd(gout, q, k, v, cpu_out, cpu_lse, None, *args, False)
    cpu = torch.ops.llmfast.attention_bwd(gout, q, k, v, cpu_out, cpu_lse, None, *args, False)
    for what, a, b in zip(("dq", "dk", "dv"), emu[:3], cpu[:3]):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2, msg=lambda m: f"{what}: {m}")
    plain, _ = cuda_kernels_as_cpu.attention_fwd(q, k, v, *args[:5], 0.0, None)
    assert not torch.allclose(emu_out, plain, atol=1e-2), "dropout_p = 0.3 must change the output"


def test_emulated_non_contiguous_and_misaligned(cuda_kernels_as_cpu, poison):
    """Views of a fused QKV projection (row strides of 3 * H * D) and a storage offset of one
    element (rows not 16-byte aligned: the kernels' scalar load path)."""
    torch.manual_seed(zlib.crc32(b"emulated layouts"))
    B, S, H, D = 2, 37, 2, 24
    base = torch.randn(B, S, 3 * H * D + 1, dtype=torch.float16, requires_grad=True)
    q, k, v = base[..., 1:].view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
    assert q.stride(-2) == 3 * H * D + 1 and q.storage_offset() % 8 != 0
    gout = torch.randn(B, H, S, D, dtype=torch.float16)
    with llmfast.use_backend("cpu"):
        out = LF.scaled_dot_product_attention(q, k, v, is_causal=True)
    grads = torch.autograd.grad(out, (q, k, v), gout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = ta.reference_attention(*leaves, None, is_causal=True)[0]
    ref_grads = torch.autograd.grad(ref, leaves, gout.double())
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-3, rtol=2e-3)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=5e-3, rtol=5e-3)


def test_emulated_launcher_checks_name_the_argument(cuda_kernels_as_cpu):
    q = torch.randn(1, 1, 4, 300, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head dims must be at most 256"):
        cuda_kernels_as_cpu.attention_fwd(q, q, q, None, 1.0, -1, -1, 0.0, 0.0, None)
    q = torch.randn(1, 1, 4, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="seed must be given"):
        cuda_kernels_as_cpu.attention_fwd(q, q, q, None, 1.0, -1, -1, 0.0, 0.5, None)
    with pytest.raises(RuntimeError, match="key must have query's dtype"):
        cuda_kernels_as_cpu.attention_fwd(q, q.float(), q, None, 1.0, -1, -1, 0.0, 0.0, None)
