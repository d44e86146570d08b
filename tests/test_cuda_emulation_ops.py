"""The CUDA norm and cross-entropy kernels, run on the CPU through the SIMT emulator.

csrc/norm/norm_cuda_launch.h and csrc/cross_entropy/cross_entropy_cuda_launch.h (launchers and,
through them, the kernels) are compiled as plain C++ with LLMFAST_SIMT_EMULATION
(csrc/common/simt_emulator.h: every CUDA thread a fiber; block, warp and cluster barriers; warp
shuffles; per-block static and dynamic shared memory; distributed shared memory across the blocks
of a thread-block cluster; guarded memory) into one small extension,
tests/emulation/ops_emulated.cpp. For the duration of a test it replaces the CPU kernels of the
llmfast::norm_* and llmfast::cross_entropy_* ops (a scoped torch.library registration), so the
'cpu' backend runs the CUDA code through the whole public path -- llmfast.functional, the
registered autograd -- and the norm and cross-entropy tests' own checks
(test_norm._check_against_reference, test_cross_entropy._check) judge it against the float64
reference.

The launchers pick their path from the device: thread-block clusters on sm_90+, one block per row
(or the generic / looped kernels) without. The emulated device is set per test through
LLMFAST_EMULATED_SM (90: clusters, 80: none) and LLMFAST_EMULATED_SM_COUNT (1 SM: a persistent
backward grid has 2 blocks, or 1 cluster, so with more row groups its blocks loop over several),
read by csrc/common/device_compat.cuh. Shapes that take the same path on both devices run on one
(sm_90); each path runs at least once in fp32 and once in a 16-bit type, and the tests of the
paths check from the emulator's launch log that the launchers took them (grid, block, cluster):

  norm                      forward                           backward
  N = 1, 97, 1025           generic                           generic (2 blocks loop over 3 rows)
  N = 1024 (9 / 17 rows)    2 / 4 rows per 128-thread block   4 / 8 rows per 512-thread block,
                                                              2 blocks loop over 3 row groups
  4096 fp32, 8192 fp16      one 256-thread block per row      one 512-thread block per row, looping
  16384 bf16                one 512-thread block per row      sm_90: cluster 2 x 512, looping;
                                                              sm_80: generic, looping
  32768 fp32 (sm_90)        cluster 4 x 512                   cluster 8 x 512
  40000 bf16 (sm_90)        cluster 3 x 448 (part empty)      cluster 5 x 512 (part empty)

  cross-entropy             sm_90                             sm_80
  V = 1, 97                 one small block                   same
  V = 50257 bf16 / fp32     cluster 2 x 416 / 8 x 416         one 800-thread block / looped
  V = 140000 fp32           looped (past 8 x 1024 x 16)       looped

The cross-entropy kernels load whole 16-byte slots, past a row's ends; test_cross_entropy_guarded
runs them on logits placed against an inaccessible page (the emulator's guarded memory), so that
a load outside the tensor's 16-byte chunks fails the launch.

The emulator is slow (a fiber switch per thread per barrier): a few rows per case.
"""
import zlib

import pytest
import torch

import llmfast
import test_cross_entropy as tce
import test_norm as tn
from test_cuda_emulation import build_emulated

# The emulated GPUs: Hopper (thread-block clusters) and Ampere (none).
DEVICES = {"sm90": "90", "sm80": "80"}
BOTH = list(DEVICES)
NORM_OPS = ("norm_fwd", "norm_bwd")
CE_OPS = ("cross_entropy_fwd", "cross_entropy_fwd_inplace", "cross_entropy_scale_grad_")


@pytest.fixture(scope="module")
def kernels():
    return build_emulated("llmfast_ops_emulated", "ops_emulated.cpp",
                          "the emulated kernels replace its CPU kernels")


@pytest.fixture
def emulated(request, kernels, monkeypatch):
    """For the duration of a test the emulated kernels are the CPU kernels of the norm and
    cross-entropy ops (undone when the library is destroyed), on an emulated GPU with one SM:
    request.param ('sm90' unless a test parametrizes this fixture indirectly). Yields the device
    name."""
    sm = getattr(request, "param", "sm90")
    monkeypatch.setenv("LLMFAST_EMULATED_SM", DEVICES[sm])
    monkeypatch.setenv("LLMFAST_EMULATED_SM_COUNT", "1")
    lib = torch.library.Library("llmfast", "IMPL")
    for op in NORM_OPS + CE_OPS:
        lib.impl(op, getattr(kernels, op), "CPU")
    kernels.launches()  # start the log afresh
    yield sm
    lib._destroy()


def _plans(kernels):
    """The emulated launches since the last call, as (grid x, block threads, cluster)."""
    return [(grid[0], block, cluster) for grid, block, _, cluster in kernels.launches()]


# ---------------------------------------------------------------------------------------------
# Norm.
# ---------------------------------------------------------------------------------------------
VARIANTS = {v[0]: v for v in tn.VARIANTS}
DTYPE_IDS = tce.DTYPE_IDS
WEIGHTED = ("add_layer_norm", "rms_norm")  # affine LayerNorm with a residual; RMSNorm

# Generic kernels on short rows (the same on either device): every dtype and variant.
NORM_CASES = (
    [((1, 1), dt, name) for dt in tn.DTYPES for name in VARIANTS]
    + [((3, 97), dt, name) for dt in tn.DTYPES for name in VARIANTS]
    + [((2, 1025), torch.float16, name) for name in VARIANTS]
)


@pytest.mark.parametrize("shape,dtype,variant", [
    pytest.param(s, dt, v, id=f"{'x'.join(map(str, s))}-{DTYPE_IDS(dt)}-{v}") for s, dt, v in NORM_CASES])
def test_norm_matches_reference(emulated, shape, dtype, variant, poison):
    torch.manual_seed(zlib.crc32(f"{shape}{dtype}{variant}".encode()))
    tn._check_against_reference("cpu", "cpu", shape, dtype, VARIANTS[variant])


# (device, shape, dtype, variants, forward launch, backward launch), launches as (grid, block,
# cluster). The backward grid is the persistent one: 2 blocks (1 SM) or 1 cluster, fewer than the
# row groups wherever a path can loop. The generic backward grid assumes parameter gradients
# (without them it is one block per row): such rows run the weighted variants only.
NORM_PATHS = [
    ("sm90", (3, 97), torch.float32, WEIGHTED, (3, 128, 1), (2, 128, 1)),
    ("sm90", (9, 1024), torch.float32, list(VARIANTS), (5, 128, 1), (2, 512, 1)),
    ("sm90", (17, 1024), torch.bfloat16, list(VARIANTS), (5, 128, 1), (2, 512, 1)),
    ("sm90", (5, 4096), torch.float32, WEIGHTED, (5, 256, 1), (2, 512, 1)),
    ("sm90", (5, 8192), torch.float16, WEIGHTED, (5, 256, 1), (2, 512, 1)),
    ("sm90", (3, 16384), torch.bfloat16, WEIGHTED, (3, 512, 1), (2, 512, 2)),
    ("sm80", (3, 16384), torch.bfloat16, ("rms_norm",), (3, 512, 1), (2, 512, 1)),
    ("sm90", (2, 32768), torch.float32, ("add_rms_norm", "layer_norm_no_affine"), (8, 512, 4), (8, 512, 8)),
    ("sm90", (2, 40000), torch.bfloat16, WEIGHTED, (6, 448, 3), (5, 512, 5)),
]


@pytest.mark.parametrize("emulated,shape,dtype,variant,fwd,bwd", [
    pytest.param(sm, s, dt, v, f, b, id=f"{sm}-{'x'.join(map(str, s))}-{DTYPE_IDS(dt)}-{v}")
    for sm, s, dt, variants, f, b in NORM_PATHS for v in variants], indirect=["emulated"])
def test_norm_paths(emulated, kernels, shape, dtype, variant, fwd, bwd, poison):
    """The register-resident kernels (rows packed into blocks, a block or a cluster per row) and
    the looping persistent / generic backward grids: the result, and the path taken."""
    torch.manual_seed(zlib.crc32(f"{shape}{dtype}{variant}".encode()))
    tn._check_against_reference("cpu", "cpu", shape, dtype, VARIANTS[variant])
    launches = _plans(kernels)
    assert launches[:2] == [fwd, bwd], "forward, then backward"
    assert len(launches) == 2 + (variant != "layer_norm_no_affine"), "then the dW/dB reduction"


@pytest.mark.parametrize("kind", ["shifted", "ramped"])
@pytest.mark.parametrize("emulated,n,dtype", [
    pytest.param("sm90", 1024, torch.float32, id="sm90-1024-rows_per_block"),
    pytest.param("sm90", 16384, torch.bfloat16, id="sm90-16384-block_per_row"),
    pytest.param("sm90", 32768, torch.float32, id="sm90-32768-cluster4"),
    pytest.param("sm90", 40000, torch.bfloat16, id="sm90-40000-cluster3_part_empty"),
    pytest.param("sm80", 16384, torch.bfloat16, id="sm80-16384-block_per_row"),
], indirect=["emulated"])
def test_norm_row_statistics(emulated, n, dtype, kind, poison):
    """Statistics merged over threads, warps and the blocks of a cluster (LayerNorm's forward
    merges (count, mean, M2) pairs): rows with a large mean, and rows whose parts have other
    means (test_norm._statistics_rows)."""
    if kind == "shifted" and dtype != torch.float32:
        pytest.skip("a mean of 1000 in a 16-bit type rounds the rows to a few values")
    tn.check_row_statistics("cpu", "cpu", n, dtype, kind)


@pytest.mark.parametrize("emulated,n", [
    pytest.param("sm90", 768, id="sm90-768-rows_per_block"),
    pytest.param("sm90", 1001, id="sm90-1001-generic"),
    pytest.param("sm90", 40000, id="sm90-40000-cluster3_part_empty"),
    pytest.param("sm80", 16384, id="sm80-16384-block_per_row"),
], indirect=["emulated"])
def test_norm_constant_rows(emulated, n, poison):
    """A constant row normalizes to exactly 0 (each thread's mean is its first value plus the mean
    of the differences, so equal parts merge exactly; the generic kernel shifts by s[0])."""
    tn.check_constant_rows("cpu", "cpu", n, torch.float32)
    tn.check_constant_rows("cpu", "cpu", n, torch.bfloat16)


@pytest.mark.parametrize("variant", ["layer_norm", "add_rms_norm"])
def test_norm_float32_params_with_half_input(emulated, variant, poison):
    """Mixed precision: float32 weight and bias (another W in the kernels' templates)."""
    torch.manual_seed(5)
    for dtype in (torch.bfloat16, torch.float16):
        tn._check_against_reference("cpu", "cpu", (3, 1000), dtype, VARIANTS[variant], param_dtype=torch.float32)


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
def test_cross_entropy_short_rows(emulated, dtype, V, case, poison):
    _ce_check(dtype, V, case)


@pytest.mark.parametrize("case", CE_LONG)
@pytest.mark.parametrize("dtype", tce.DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("emulated", BOTH, indirect=True)
def test_cross_entropy_long_rows(emulated, dtype, case, poison):
    _ce_check(dtype, 50257, case, m=3)


@pytest.mark.parametrize("case", ["mean", "everything_sum"])
def test_cross_entropy_looped_rows(emulated, case, poison):
    _ce_check(torch.float32, 140000, case, m=2)


def test_cross_entropy_inplace_backward(emulated, poison):
    """inplace_backward=True on short rows: the cross-entropy test's own check."""
    tce.test_inplace_backward("cpu", "cpu", None)


@pytest.mark.parametrize("dtype", tce.DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("emulated", BOTH, indirect=True)
def test_cross_entropy_inplace_backward_long_rows(emulated, dtype, poison):
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


@pytest.mark.parametrize("emulated", BOTH, indirect=True)
def test_cross_entropy_all_targets_ignored(emulated, poison):
    """'mean' over no valid target: NaN loss (0 / 0, as torch), zero gradient."""
    x = torch.randn(3, 50257, dtype=torch.bfloat16, requires_grad=True)
    t = torch.full((3,), -100)
    with llmfast.use_backend("cpu"):
        loss = llmfast.functional.cross_entropy(x, t)
    assert torch.isnan(loss)
    loss.backward()
    assert not x.grad.any()


@pytest.mark.parametrize("emulated", BOTH, indirect=True)
def test_cross_entropy_mean_over_zero_class_weight(emulated, poison):
    """The targets' class weights sum to 0 with label smoothing: 'mean' is NaN as torch's (the
    reduce kernel's non-zero sum over a zero denominator would be inf)."""
    x = torch.randn(4, 300, dtype=torch.bfloat16)
    t = torch.tensor([0, 1, 0, 1])
    w = torch.ones(300)
    w[:2] = 0
    with llmfast.use_backend("cpu"):
        loss = llmfast.functional.cross_entropy(x, t, weight=w, label_smoothing=0.1)
    assert torch.isnan(loss)


@pytest.mark.parametrize("V", [97, 50257, 140000])
@pytest.mark.parametrize("emulated", BOTH, indirect=True)
def test_cross_entropy_out_of_range_targets_are_ignored(emulated, kernels, V):
    """The GPU contract (cross_entropy_ops.cpp): a target outside [0, V) that is not ignore_index
    is never used as an index and its row counts as ignored (loss 0, zero gradient, not in the
    'mean' denominator). The CPU launchers raise instead, so the kernels are called directly,
    on guarded memory (a read outside the logits fails the launch)."""
    torch.manual_seed(V)
    x = torch.randn(4, V)
    t = torch.tensor([-3, 2, V - 1, V + 5])  # out of range in the first and the last row
    valid = slice(1, 3)
    for after_guard in (True, False):  # the logits start right after / end right before a guard
        for reduction, code in (("none", 0), ("mean", 1)):
            logits = kernels.guarded_copy(x, after_guard, 0)
            loss, _, grad = kernels.cross_entropy_fwd(logits, t, None, code, -100, 0.0, 0.0, None, True)
            ref = torch.nn.functional.cross_entropy(x[valid], t[valid], reduction=reduction)
            if reduction == "none":
                torch.testing.assert_close(loss[valid], ref)
                torch.testing.assert_close(loss[[0, 3]], torch.zeros(2))
            else:
                torch.testing.assert_close(loss, ref)
            assert not grad[[0, 3]].any(), "rows with an out-of-range target get no gradient"


@pytest.mark.parametrize("emulated,dtype,V,plan", [
    ("sm90", torch.bfloat16, 50257, (416, 2)),
    ("sm80", torch.bfloat16, 50257, (800, 1)),
    ("sm90", torch.float32, 50257, (416, 8)),
    ("sm80", torch.float32, 50257, (1024, 1)),
    ("sm90", torch.float32, 140000, (1024, 1)),
], indirect=["emulated"])
def test_cross_entropy_launch_paths(emulated, kernels, dtype, V, plan):
    x = torch.randn(2, V).to(dtype)
    t = torch.tensor([0, V - 1])
    kernels.cross_entropy_fwd(x, t, None, 0, -100, 0.0, 0.0, None, True)
    (grid, block, cluster), = _plans(kernels)
    assert (block, cluster) == plan and grid == 2 * cluster


# ---------------------------------------------------------------------------------------------
# Guarded memory: loads past the logits' 16-byte chunks fail the launch.
# ---------------------------------------------------------------------------------------------
def test_guard_catches_out_of_bounds_reads(kernels):
    """The guard itself: a read of the first byte past a tensor's last 16-byte chunk (or before
    its first) raises from the launch, every time; reads inside those chunks do not."""
    x = torch.arange(5, dtype=torch.bfloat16)  # 10 bytes: one 16-byte chunk
    end = kernels.guarded_copy(x, False, 0)
    assert kernels.guard_probe(end, 0) == end.view(torch.uint8)[0].item()
    assert kernels.guard_probe(end, 15) == 0xFF, "the chunk's bytes past the tensor are poisoned"
    for _ in range(2):
        with pytest.raises(RuntimeError, match="out-of-bounds access at byte 16 of a guarded buffer of 10 bytes"):
            kernels.guard_probe(end, 16)
    start = kernels.guarded_copy(x, True, 6)
    assert kernels.guard_probe(start, -6) == 0xFF
    with pytest.raises(RuntimeError, match="out-of-bounds access at byte -7 "):
        kernels.guard_probe(start, -7)


@pytest.mark.parametrize("emulated,dtype,V", [
    ("sm90", torch.bfloat16, 97),      # one small block
    ("sm90", torch.float32, 97),
    ("sm90", torch.bfloat16, 50257),   # cluster 2 x 416
    ("sm90", torch.float32, 50257),    # cluster 8 x 416
    ("sm80", torch.bfloat16, 50257),   # one 800-thread block
    ("sm80", torch.float32, 50257),    # looped
], indirect=["emulated"])
@pytest.mark.parametrize("layout", ["end_at_guard", "start_after_guard"])
def test_cross_entropy_guarded(emulated, kernels, dtype, V, layout):
    """Forward with the gradient written in place, and the backward scaling, on logits that end
    at a guard page (rows at every 16-byte misalignment, the last one ending inside its last
    slot) or start one element short of a 16-byte boundary after one (the first row's head slot
    holds one element): the same results as on ordinary memory, no access outside the logits'
    16-byte chunks."""
    torch.manual_seed(8)
    m = 3
    x = (torch.randn(m, V) * 3).to(dtype)
    t = torch.tensor([V - 1, -100, 0])  # the last element, an ignored row, the first element
    size = x.element_size()
    lead = 0 if layout == "end_at_guard" else 16 - size
    go = torch.rand(m) + 0.5
    # Ordinary memory at the same 16-byte misalignment: the same slots, the same sums.
    plain = torch.empty(x.numel() + 16 // size, dtype=dtype)[lead // size:][:x.numel()].view(x.shape)
    plain.copy_(x)
    results = []
    for logits in (kernels.guarded_copy(x, lead > 0, lead), plain):
        out = kernels.cross_entropy_fwd_inplace(logits, t, None, 0, -100, 0.1, 1e-3, 5.0)
        kernels.cross_entropy_scale_grad_(logits, go)
        results.append([*out, logits.clone()])
    for guarded, plain in zip(*results):
        assert torch.equal(guarded, plain)
