"""The CUDA norm and cross-entropy kernels, run on the CPU through the SIMT emulator.

csrc/norm/norm_cuda_launch.h and csrc/cross_entropy/cross_entropy_cuda_launch.h (launchers and,
through them, the kernels) are compiled as plain C++ with LLMFAST_SIMT_EMULATION
(csrc/common/simt_emulator.h: every CUDA thread a fiber; block, warp and cluster barriers; warp
shuffles; per-block static and dynamic shared memory; distributed shared memory across the blocks
of a thread-block cluster) into two small extensions, tests/emulation/{norm,cross_entropy}_emulated.cpp.
For the duration of a test they replace the CPU kernels of the llmfast::norm_* and
llmfast::cross_entropy_* ops (a scoped torch.library registration), so the 'cpu' backend runs
the CUDA code through the whole public path -- llmfast.functional, the registered autograd -- and
the norm and cross-entropy tests' own checks (test_norm._check_against_reference,
test_cross_entropy._check) judge it against the float64 reference.

The launchers pick their path from the device: thread-block clusters on sm_90+, one block per row
(or the generic / looped kernels) without. The emulated device is set per test through
LLMFAST_EMULATED_SM (90: clusters, 80: none) and LLMFAST_EMULATED_SM_COUNT (1 SM: the persistent
backward grid is then smaller than the row groups, so its blocks loop over several), read by
csrc/common/device_compat.cuh. Shapes are chosen to reach every kernel and layout:

  norm (bf16 unless said)   forward (sm_90 / sm_80)          backward (sm_90 / sm_80)
  N = 1, 97, 1025           generic                           generic
  N = 1024                  4 rows per 128-thread block       8 rows per 512-thread block
  N = 16384                 one 512-thread block per row      cluster 2 x 512 / generic
  N = 65536                 cluster 4 x 512 / generic         cluster 8 x 512 / generic
  N = 65536 fp32            cluster 8 x 512 / generic         generic

  cross-entropy             sm_90                             sm_80
  V = 1, 97                 one small block                   same
  V = 50257 bf16 / fp32     cluster 2 x 416 / 8 x 416         one 800-thread block / looped
  V = 140000 fp32           looped (past 8 x 1024 x 16)       looped

The emulator is slow (a fiber switch per thread per barrier): a few rows per case.
"""
import os
import zlib

import pytest
import torch

import llmfast
import test_cross_entropy as tce
import test_norm as tn
from test_cuda_emulation import ROOT, _cuda_include

# The emulated GPUs: Hopper (thread-block clusters) and Ampere (none).
DEVICES = {"sm90": "90", "sm80": "80"}


def _build(name, source):
    inc = _cuda_include()
    if inc is None:
        pytest.skip("no CUDA toolkit headers (cuda_fp16.h) to compile the emulated kernels against")
    if not llmfast._extension.has_extension:
        pytest.skip("llmfast._C is not built (the emulated kernels replace its CPU kernels)")
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
def norm_kernels():
    return _build("llmfast_norm_emulated", "norm_emulated.cpp")


@pytest.fixture(scope="module")
def cross_entropy_kernels():
    return _build("llmfast_cross_entropy_emulated", "cross_entropy_emulated.cpp")


def _as_cpu_kernels(module, ops, sm, monkeypatch):
    """Registers module's functions as the CPU kernels of llmfast::<op> for each op in `ops`
    (undone when the returned library is destroyed), on an emulated sm_<sm> with one SM."""
    monkeypatch.setenv("LLMFAST_EMULATED_SM", DEVICES[sm])
    monkeypatch.setenv("LLMFAST_EMULATED_SM_COUNT", "1")
    lib = torch.library.Library("llmfast", "IMPL")
    for op in ops:
        lib.impl(op, getattr(module, op), "CPU")
    return lib


@pytest.fixture(params=list(DEVICES))
def emulated_norm(request, norm_kernels, monkeypatch):
    lib = _as_cpu_kernels(norm_kernels, ("norm_fwd", "norm_bwd"), request.param, monkeypatch)
    yield request.param
    lib._destroy()


@pytest.fixture(params=list(DEVICES))
def emulated_cross_entropy(request, cross_entropy_kernels, monkeypatch):
    ops = ("cross_entropy_fwd", "cross_entropy_fwd_inplace", "cross_entropy_scale_grad_")
    lib = _as_cpu_kernels(cross_entropy_kernels, ops, request.param, monkeypatch)
    yield request.param
    lib._destroy()


# ---------------------------------------------------------------------------------------------
# Norm.
# ---------------------------------------------------------------------------------------------
VARIANTS = {v[0]: v for v in tn.VARIANTS}
DTYPE_IDS = tce.DTYPE_IDS

# (shape, dtype, variants): every variant where it is cheap, the kernel-selecting widths with the
# variants that take different code (affine LayerNorm with a residual, RMSNorm).
NORM_CASES = (
    [((1, 1), dt, name) for dt in tn.DTYPES for name in VARIANTS]
    + [((3, 97), dt, name) for dt in tn.DTYPES for name in VARIANTS]
    + [((2, 1025), torch.float16, name) for name in VARIANTS]
    + [((4, 1024), dt, name) for dt in tn.DTYPES for name in VARIANTS]
    + [((3, 16384), torch.bfloat16, name) for name in ("add_layer_norm", "rms_norm")]
    + [((2, 65536), torch.bfloat16, name) for name in ("add_layer_norm", "rms_norm", "layer_norm_no_affine")]
    + [((2, 65536), torch.float32, "add_rms_norm")]
)


@pytest.mark.parametrize("shape,dtype,variant", [
    pytest.param(s, dt, v, id=f"{'x'.join(map(str, s))}-{DTYPE_IDS(dt)}-{v}") for s, dt, v in NORM_CASES])
def test_norm_matches_reference(emulated_norm, shape, dtype, variant, poison):
    torch.manual_seed(zlib.crc32(f"{shape}{dtype}{variant}".encode()))
    tn._check_against_reference("cpu", "cpu", shape, dtype, VARIANTS[variant])


@pytest.mark.parametrize("variant", ["layer_norm", "add_rms_norm"])
def test_norm_float32_params_with_half_input(emulated_norm, variant, poison):
    """Mixed precision: float32 weight and bias (another W in the kernels' templates)."""
    torch.manual_seed(5)
    for dtype in (torch.bfloat16, torch.float16):
        tn._check_against_reference("cpu", "cpu", (3, 1000), dtype, VARIANTS[variant], param_dtype=torch.float32)


def test_norm_unaligned_rows(emulated_norm, poison):
    """A row length past every register path and not a multiple of the vector width."""
    torch.manual_seed(6)
    tn._check_against_reference("cpu", "cpu", (2, 70000), torch.bfloat16, VARIANTS["add_layer_norm"])


# ---------------------------------------------------------------------------------------------
# Cross-entropy.
# ---------------------------------------------------------------------------------------------
CE_CASES = dict(tce.CASES)
# Every option on the short rows; the long rows (cluster / looped kernels) with the option sets
# that take different code in the kernels: plain, class weights + smoothing, and everything.
CE_LONG = ("mean", "weight_smoothing_none", "ignore_index_in_range", "everything_sum")


def _ce_check(dtype, V, name, m=tce.M, inplace_backward=False):
    opts = CE_CASES[name]
    torch.manual_seed(zlib.crc32(f"{name}-{V}-{dtype}".encode()))
    kw = tce._kwargs(opts, V, "cpu")
    x = (torch.randn(m, V) * 3).to(dtype)
    t = tce._targets(m, V, "cpu", kw.get("ignore_index", -100))
    tce._check("cpu", "cpu", dtype, x, t, kw, opts, inplace_backward=inplace_backward)


@pytest.mark.parametrize("case", list(CE_CASES))
@pytest.mark.parametrize("V", [1, 97])
@pytest.mark.parametrize("dtype", tce.DTYPES, ids=DTYPE_IDS)
def test_cross_entropy_short_rows(emulated_cross_entropy, dtype, V, case, poison):
    _ce_check(dtype, V, case)


@pytest.mark.parametrize("case", CE_LONG)
@pytest.mark.parametrize("dtype", tce.DTYPES, ids=DTYPE_IDS)
def test_cross_entropy_long_rows(emulated_cross_entropy, dtype, case, poison):
    _ce_check(dtype, 50257, case, m=3)


@pytest.mark.parametrize("case", ["mean", "everything_sum"])
def test_cross_entropy_looped_rows(emulated_cross_entropy, case, poison):
    _ce_check(torch.float32, 140000, case, m=2)


def test_cross_entropy_inplace_backward(emulated_cross_entropy, poison):
    """inplace_backward=True on short rows: the cross-entropy test's own check."""
    tce.test_inplace_backward("cpu", "cpu", None)


@pytest.mark.parametrize("dtype", tce.DTYPES, ids=DTYPE_IDS)
def test_cross_entropy_inplace_backward_long_rows(emulated_cross_entropy, dtype, poison):
    """The gradient written over the logits (grad == logits in the kernels) on long rows, the
    looped kernel included: loss and gradient as without inplace_backward."""
    torch.manual_seed(7)
    V = 140000 if dtype == torch.float32 else 50257  # fp32: the looped kernel
    h = torch.randn(3, V).to(dtype).requires_grad_()
    t = tce._targets(3, V, "cpu", -100)
    opts = dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    g = torch.rand(3) + 0.5
    losses, grads = [], []
    for inplace in (True, False):
        h.grad = None
        with llmfast.use_backend("cpu"):
            loss = llmfast.functional.cross_entropy(h * 2.0, t, **opts, inplace_backward=inplace)
        loss.backward(g)
        losses.append(loss.detach())
        grads.append(h.grad)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1], **tce.OUT_TOL[dtype])


def test_cross_entropy_all_targets_ignored(emulated_cross_entropy, poison):
    """'mean' over no valid target: NaN loss (0 / 0, as torch), zero gradient."""
    x = torch.randn(3, 50257, dtype=torch.bfloat16, requires_grad=True)
    t = torch.full((3,), -100)
    with llmfast.use_backend("cpu"):
        loss = llmfast.functional.cross_entropy(x, t)
    assert torch.isnan(loss)
    loss.backward()
    assert not x.grad.any()


# ---------------------------------------------------------------------------------------------
# The launchers take the paths the shapes above are meant to exercise.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,n,fwd,bwd", [
    (torch.bfloat16, 1024, {"sm90": (128, 1), "sm80": (128, 1)}, {"sm90": (512, 1), "sm80": (512, 1)}),
    (torch.bfloat16, 16384, {"sm90": (512, 1), "sm80": (512, 1)}, {"sm90": (512, 2), "sm80": (512, 1)}),
    (torch.bfloat16, 65536, {"sm90": (512, 4), "sm80": (512, 1)}, {"sm90": (512, 8), "sm80": (512, 1)}),
    (torch.float32, 65536, {"sm90": (512, 8), "sm80": (512, 1)}, {"sm90": (512, 1), "sm80": (512, 1)}),
])
def test_norm_launch_paths(emulated_norm, norm_kernels, dtype, n, fwd, bwd):
    x = torch.randn(2, n).to(dtype)
    w = torch.rand(n).to(dtype) + 0.5
    norm_kernels.launches()
    out, _, mean, rstd = norm_kernels.norm_fwd(x, None, w, None, 1e-5, False)
    assert [(b, c) for _, b, _, c in norm_kernels.launches()] == [fwd[emulated_norm]]
    norm_kernels.norm_bwd(torch.randn_like(x), None, x, w, mean, rstd, False, True, False)
    launches = norm_kernels.launches()
    assert [(b, c) for _, b, _, c in launches[:1]] == [bwd[emulated_norm]]
    assert launches[1][1] == 32 * 32, "then the dW reduction"


@pytest.mark.parametrize("dtype,V,plan", [
    (torch.bfloat16, 50257, {"sm90": (416, 2), "sm80": (800, 1)}),
    (torch.float32, 50257, {"sm90": (416, 8), "sm80": (1024, 1)}),
    (torch.float32, 140000, {"sm90": (1024, 1), "sm80": (1024, 1)}),
])
def test_cross_entropy_launch_paths(emulated_cross_entropy, cross_entropy_kernels, dtype, V, plan):
    x = torch.randn(2, V).to(dtype)
    t = torch.tensor([0, V - 1])
    cross_entropy_kernels.launches()
    cross_entropy_kernels.cross_entropy_fwd(x, t, None, 0, -100, 0.0, 0.0, None, True)
    (grid, block, _, cluster), = cross_entropy_kernels.launches()
    assert (block, cluster) == plan[emulated_cross_entropy] and grid[0] == 2 * cluster
