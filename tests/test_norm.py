"""LayerNorm, RMSNorm and the residual-add variants: every backend against the float64
reference (values and all gradients), bad input, opcheck, torch.compile and the nn modules.

Shape grid: 1 (degenerate row), 97 and 1025 (not multiples of any vector width or block),
1000 (even but not a power of two), 4096 (the common aligned fast path), 65536 (the widest row
the tuned paths target: Hopper clusters in CUDA, looped chunks in Triton), 70000 and 131075
(past every register path, unaligned), leading batch dims, and empty tensors.
"""
import math
import os
import zlib

import pytest
import torch

import llmfast
import llmfast.functional as LF
from conftest import DEVICES, backends_for, device_backend_params
from helpers import assert_close, assert_grad_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (name, rms, with_residual, with_weight, with_bias)
VARIANTS = [
    ("layer_norm", False, False, True, True),
    ("layer_norm_no_affine", False, False, False, False),
    ("rms_norm", True, False, True, False),
    ("add_layer_norm", False, True, True, True),
    ("add_rms_norm", True, True, True, False),
]

SHAPES = [(1, 1), (3, 97), (5, 1000), (2, 1025), (4, 4096), (1, 65536), (2, 3, 64), (0, 64)]


def _inputs(shape, dtype, device, rms, with_residual, with_weight, with_bias, param_dtype=None):
    param_dtype = param_dtype or dtype
    n = shape[-1]
    x = (torch.randn(shape, device=device, dtype=torch.float32) * 2 + 0.5).to(dtype)
    r = torch.randn(shape, device=device, dtype=torch.float32).to(dtype) if with_residual else None
    w = (torch.rand(n, device=device) + 0.5).to(param_dtype) if with_weight else None
    b = torch.randn(n, device=device).to(param_dtype) if with_bias else None
    return x, r, w, b


def _run(fn, x, r, w, b, rms, eps):
    n = x.shape[-1]
    if r is None:
        if rms:
            return fn.rms_norm(x, (n,), w, eps, bias=b) if b is not None else fn.rms_norm(x, (n,), w, eps), None
        return fn.layer_norm(x, (n,), w, b, eps), None
    if rms:
        return fn.add_rms_norm(x, r, (n,), w, eps, bias=b) if b is not None else fn.add_rms_norm(x, r, (n,), w, eps)
    return fn.add_layer_norm(x, r, (n,), w, b, eps)


def _check_against_reference(backend, device, shape, dtype, variant, param_dtype=None, eps=1e-5):
    _, rms, with_residual, with_weight, with_bias = variant
    x, r, w, b = _inputs(shape, dtype, device, rms, with_residual, with_weight, with_bias, param_dtype)
    leaves = [t for t in (x, r, w, b) if t is not None]
    originals = [t.clone() for t in leaves]

    # Reference in float64 on detached copies.
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    for t in leaves:
        t.requires_grad_()
    y_ref, s_ref = _run(llmfast.reference, *refs, rms, eps)

    with llmfast.use_backend(backend):
        y, s = _run(LF, x, r, w, b, rms, eps)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype, f"{backend} output")
    if with_residual:
        assert s.dtype == dtype
        assert_close(s, s_ref, dtype, f"{backend} input + residual")

    # Random upstream gradients into both outputs.
    gy = torch.randn(shape, device=device).to(dtype)
    gs = torch.randn(shape, device=device).to(dtype) if with_residual else None
    ref_terms = (y_ref * gy.double()).sum() + ((s_ref * gs.double()).sum() if with_residual else 0)
    ref_terms.backward()
    outs, grads = [y], [gy]
    if with_residual:
        outs.append(s)
        grads.append(gs)
    torch.autograd.backward(outs, grads)

    if x.numel() == 0:
        return
    m = max(1, x.numel() // shape[-1])
    # Size of the terms that cancel in dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
    with torch.no_grad():
        s64 = refs[0] + refs[1] if with_residual else refs[0]
        centred = s64 if rms else s64 - s64.mean(-1, keepdim=True)
        rstd64 = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
        g64 = gy.double() * (refs[2] if with_weight else 1.0)
        dx_terms = (g64 * rstd64).norm().item()
    names = ("input", "residual", "weight", "bias")
    for name, t, ref in zip(names, (x, r, w, b), refs):
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype, f"{name}.grad dtype"
        # dW and dB sum over the M rows: allow the error to grow like sqrt(M).
        scale = math.sqrt(m) if name in ("weight", "bias") and t.dtype != torch.float32 else 1.0
        # The tolerance follows the input's dtype even for float32 parameters: their gradients
        # are computed from the low-precision input (and input + residual rounded to it).
        floor = dx_terms if name in ("input", "residual") else 0.0
        assert_grad_close(t.grad, ref.grad, dtype, f"{backend} grad {name}", scale=scale, denom_floor=floor)
    for t, orig in zip(leaves, originals):
        assert torch.equal(t.detach(), orig), "an input was modified"


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_matches_reference(device, backend, dtype, shape, variant, poison):
    torch.manual_seed(zlib.crc32(repr((shape, variant[0], str(dtype))).encode()))
    _check_against_reference(backend, device, shape, dtype, variant)


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[2], VARIANTS[3]], ids=["layer_norm", "rms_norm", "add_layer_norm"])
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_float32_params_with_half_input(device, backend, variant, poison):
    """Mixed precision: float32 weight and bias with a bfloat16 / float16 input."""
    for dtype in (torch.bfloat16, torch.float16):
        _check_against_reference(backend, device, (6, 1000), dtype, variant, param_dtype=torch.float32)


def _statistics_rows(n, dtype, device, kind):
    """Rows that tell stable statistics from unstable ones, and that exercise how the kernels
    combine partial statistics of parts of a row (threads, warps, blocks of a cluster):
    - "shifted": mean 1000, standard deviation 1. E[x^2] - mean^2 loses the variance in fp32
      (relative error ~1e-1); a two-pass or pairwise-merged variance keeps it to ~1e-6.
    - "ramped": a ramp over each quarter of the row plus noise. A thread of the register kernels
      holds one 16-byte vector in each quarter, at the same offset, and blocks of a cluster hold
      contiguous offsets, so every part has another mean: the merge's delta^2 term carries most
      of the variance."""
    g = torch.Generator().manual_seed(n)
    noise = torch.randn(4, n, generator=g)
    if kind == "shifted":
        x = 1000.0 + noise
    else:
        quarter = max(1, n // 4)
        ramp = (torch.arange(n) % quarter).float() / quarter * 16.0 - 8.0
        x = ramp + 0.5 * noise
    return x.to(device=device, dtype=dtype)


def check_row_statistics(backend, device, n, dtype, kind):
    """LayerNorm (plain, and with a residual of zeros) and RMSNorm of _statistics_rows against
    the float64 reference; also the saved statistics through the gradient of x."""
    x = _statistics_rows(n, dtype, device, kind).requires_grad_()
    zeros = torch.zeros_like(x)
    x64 = x.detach().double().requires_grad_()
    # fp32 "shifted" rows: the mean itself rounds at ~1000 * 2^-24 per operation, so outputs
    # agree to ~1e-4 (an E[x^2] - mean^2 variance is off by ~10%).
    tol = dict(atol=2e-3, rtol=2e-3) if (kind == "shifted" and dtype == torch.float32) else None
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    for name, ours, ref in (
        ("layer_norm", lambda t: LF.layer_norm(t, (n,)), lambda t: llmfast.reference.layer_norm(t, (n,))),
        ("add_layer_norm", lambda t: LF.add_layer_norm(t, zeros, (n,))[0],
         lambda t: llmfast.reference.layer_norm(t, (n,))),
        ("rms_norm", lambda t: LF.rms_norm(t, (n,), eps=1e-5), lambda t: llmfast.reference.rms_norm(t, (n,), eps=1e-5)),
    ):
        with llmfast.use_backend(backend):
            y = ours(x)
            (dx,) = torch.autograd.grad(y, x, g)
        y_ref = ref(x64)
        (dx_ref,) = torch.autograd.grad(y_ref, x64, g.double())
        what = f"{backend} {name} on {kind} rows of {n}"
        if tol is None:
            assert_close(y, y_ref, dtype, what)
        else:
            torch.testing.assert_close(y.double(), y_ref, **tol, msg=lambda m: f"{what}: {m}")
        assert_grad_close(dx, dx_ref, dtype, f"{what}, grad of x", scale=1.0 if tol is None else 100.0)


@pytest.mark.parametrize("kind", ["shifted", "ramped"])
@pytest.mark.parametrize("n", [1024, 4096, 16384, 65536])
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_row_statistics_are_stable(device, backend, n, kind, poison):
    check_row_statistics(backend, device, n, torch.float32, kind)
    if kind == "ramped":
        check_row_statistics(backend, device, n, torch.bfloat16, kind)


def check_constant_rows(backend, device, n, dtype):
    """Rows that hold one value each normalize to exactly 0 (the output is the bias), as in
    torch, whose Welford mean of a constant row is exact, even with BERT's eps of 1e-12, where a
    mean off by one rounding gives outputs of order 1; with a residual too. The gradient of x
    (rstd = 1e6 there) against the float64 reference."""
    rows = torch.tensor([3.7, -0.3, 1000.1, 0.0, 2.0 ** -20], dtype=torch.float64)
    x = rows[:, None].expand(len(rows), n).to(device=device, dtype=dtype).contiguous()
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    res = torch.full_like(x, 0.5)
    expected = b.expand_as(x)
    assert torch.equal(torch.nn.functional.layer_norm(x, (n,), w, b, eps=1e-12), expected)  # torch's behaviour
    xg = x.clone().requires_grad_()
    g = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
    with llmfast.use_backend(backend):
        y = LF.layer_norm(xg, (n,), w, b, eps=1e-12)
        y_add, s = LF.add_layer_norm(x, res, (n,), w, b, eps=1e-12)
        (dx,) = torch.autograd.grad(y, xg, g)
    assert torch.equal(y, expected), f"{backend} layer_norm of constant rows of {n}: {(y - expected).abs().max()}"
    assert torch.equal(y_add, expected), f"{backend} add_layer_norm of constant rows of {n}"
    x64 = x.double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(llmfast.reference.layer_norm(x64, (n,), w.double(), b.double(), eps=1e-12),
                                    x64, g.double())
    assert_grad_close(dx, dx_ref, dtype, f"{backend} layer_norm of constant rows of {n}, grad of x")


@pytest.mark.parametrize("n", [1, 7, 768, 1001, 4096, 16384, 70000])
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_constant_rows_normalize_to_exactly_zero(device, backend, n, poison):
    check_constant_rows(backend, device, n, torch.float32)
    check_constant_rows(backend, device, n, torch.bfloat16)


@pytest.mark.parametrize("n", [70000, 131072 + 3])
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_hidden_size_beyond_register_path(device, backend, n, poison):
    _check_against_reference(backend, device, (2, n), torch.float32, VARIANTS[3])
    _check_against_reference(backend, device, (2, n), torch.bfloat16, VARIANTS[2])


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_non_contiguous_and_multi_dim_normalized_shape(device, backend, poison):
    torch.manual_seed(0)
    base = torch.randn(8, 64, 6, device=device)
    x = base.transpose(1, 2)  # (8, 6, 64), non-contiguous
    w = torch.randn(6, 64, device=device)
    b = torch.randn(6, 64, device=device)
    with llmfast.use_backend(backend):
        y = LF.layer_norm(x, (6, 64), w, b)
        y2 = LF.layer_norm(x, (64,))
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (6, 64), w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y2, torch.nn.functional.layer_norm(x, (64,)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.channels_last_3d])
def test_output_memory_format_follows_torch(device, backend, fmt):
    """A channels-last input: the output's strides are torch's on the same device (torch's CPU
    rms_norm keeps the format, layer_norm returns a contiguous tensor), values and gradients too."""
    torch.manual_seed(2)
    shape = (2, 3, 5, 24) if fmt is torch.channels_last else (2, 3, 4, 5, 24)
    base = torch.randn(shape, device=device).to(memory_format=fmt)
    w = torch.rand(24, device=device) + 0.5
    F = torch.nn.functional
    for ours, theirs in ((lambda t: LF.rms_norm(t, (24,), w), lambda t: F.rms_norm(t, (24,), w)),
                         (lambda t: LF.layer_norm(t, (24,), w), lambda t: F.layer_norm(t, (24,), w))):
        x = base.clone().requires_grad_()
        x_ref = base.clone().requires_grad_()
        with llmfast.use_backend(backend):
            y = ours(x)
        y_ref = theirs(x_ref)
        assert y.stride() == y_ref.stride()
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(y_ref)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_matches_torch_functions(device, backend):
    """Same defaults and semantics as torch.nn.functional (eps=1e-5; rms eps=None)."""
    torch.manual_seed(1)
    x = torch.randn(4, 7, 33, device=device)
    w, b = torch.randn(33, device=device), torch.randn(33, device=device)
    with llmfast.use_backend(backend):
        ln, rms, rms_default = LF.layer_norm(x, [33], w, b), LF.rms_norm(x, [33], w, 1e-6), LF.rms_norm(x, 33)
    F = torch.nn.functional
    torch.testing.assert_close(ln, F.layer_norm(x, [33], w, b))
    torch.testing.assert_close(rms, F.rms_norm(x, [33], w, 1e-6))
    torch.testing.assert_close(rms_default, F.rms_norm(x, [33]))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_partial_requires_grad(device, backend):
    """Only some inputs need gradients: the others get none and nothing breaks."""
    x = torch.randn(5, 40, device=device, requires_grad=True)
    w = torch.randn(40, device=device)  # frozen
    b = torch.randn(40, device=device, requires_grad=True)
    with llmfast.use_backend(backend):
        LF.layer_norm(x, (40,), w, b).square().sum().backward()
    xr, br = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.nn.functional.layer_norm(xr, (40,), w, br).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.grad, br.grad, atol=1e-4, rtol=1e-4)
    assert w.grad is None


# --- autocast ---------------------------------------------------------------------------------
def _autocast_dtype(device):
    return torch.bfloat16 if device == "cpu" or torch.cuda.is_bf16_supported() else torch.float16


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_autocast_gives_torchs_dtypes_and_values(device, backend):
    """Under torch.autocast, as torch's functions on the same device: CUDA's autocast runs
    layer_norm and rms_norm in float32 (16-bit input and parameters cast, a float32 output),
    the CPU's leaves them alone. The residual variants give what torch's input + residual, then
    the norm, give: the sum in the input's dtype."""
    torch.manual_seed(11)
    F = torch.nn.functional
    dt = _autocast_dtype(device)
    n = 96
    for x_dtype, p_dtype in [(dt, torch.float32), (dt, dt), (torch.float32, torch.float32)]:
        x = torch.randn(6, n, device=device).to(x_dtype)
        r = torch.randn(6, n, device=device).to(x_dtype)
        w = (torch.rand(n, device=device) + 0.5).to(p_dtype)
        b = torch.randn(n, device=device).to(p_dtype)
        with torch.autocast(device, dtype=dt), llmfast.use_backend(backend):
            pairs = [
                (LF.layer_norm(x, (n,), w, b), F.layer_norm(x, (n,), w, b)),
                (LF.rms_norm(x, (n,), w), F.rms_norm(x, (n,), w)),
                (LF.rms_norm(x, (n,)), F.rms_norm(x, (n,))),
            ]
            y, s = LF.add_layer_norm(x, r, (n,), w, b)
            s_torch = x + r
            pairs += [(y, F.layer_norm(s_torch, (n,), w, b)), (s, s_torch)]
            y, s = LF.add_rms_norm(x, r, (n,), w)
            pairs += [(y, F.rms_norm(s_torch, (n,), w)), (s, s_torch)]
        for i, (ours, theirs) in enumerate(pairs):
            assert ours.dtype == theirs.dtype, (x_dtype, p_dtype, i)
            tol = 1e-5 if theirs.dtype == torch.float32 else 2e-2
            torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol, msg=f"{x_dtype} {p_dtype} case {i}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("rms", [False, True])
def test_residual_of_another_dtype_is_promoted_as_torch(device, backend, rms):
    """A 16-bit input with a float32 residual stream (mixed precision's usual pre-norm setup):
    as torch's layer_norm(input + residual), the sum and the output are float32, and the
    gradients go back in each tensor's own dtype."""
    torch.manual_seed(13)
    F = torch.nn.functional
    n = 48
    for low in (torch.float16, torch.bfloat16):
        x = torch.randn(6, n, device=device).to(low).requires_grad_()
        r = torch.randn(6, n, device=device).requires_grad_()
        w = (torch.rand(n, device=device) + 0.5).requires_grad_()
        with llmfast.use_backend(backend):
            y, s = (LF.add_rms_norm(x, r, (n,), w) if rms else LF.add_layer_norm(x, r, (n,), w))
        x_ref, r_ref, w_ref = (t.detach().clone().requires_grad_() for t in (x, r, w))
        s_ref = x_ref + r_ref
        y_ref = F.rms_norm(s_ref, (n,), w_ref) if rms else F.layer_norm(s_ref, (n,), w_ref)
        assert y.dtype == s.dtype == torch.float32
        torch.testing.assert_close(s, s_ref, atol=0, rtol=0)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        g, gs = torch.randn_like(y_ref), torch.randn_like(y_ref)
        torch.autograd.backward((y, s), (g, gs))
        torch.autograd.backward((y_ref, s_ref), (g, gs))
        assert x.grad.dtype == low and r.grad.dtype == torch.float32
        for ours, theirs in ((x.grad, x_ref.grad), (r.grad, r_ref.grad), (w.grad, w_ref.grad)):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_float32_autocast_policy_casts_as_torch(monkeypatch):
    """The float32 policy (CUDA's, tested here on the CPU by giving the CPU that policy): 16-bit
    input and parameters are normalized in float32 with a float32 output and float32-accurate
    values, gradients go back in the inputs' dtypes, float64 stays float64, and a 16-bit residual
    sum is rounded to the input's dtype before it is normalized, as torch's unfused version."""
    monkeypatch.setattr(LF, "_NORM_FP32_AUTOCAST_DEVICES", frozenset({"cpu"}))
    torch.manual_seed(12)
    F = torch.nn.functional
    n = 80
    x = (torch.randn(5, n) * 3).bfloat16().requires_grad_()
    r = torch.randn(5, n).bfloat16()
    w = (torch.rand(n) + 0.5).bfloat16().requires_grad_()
    b = torch.randn(n).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = LF.layer_norm(x, (n,), w, b)
        z = LF.rms_norm(x, (n,), w)
        ya, s = LF.add_layer_norm(x, r, (n,), w, b)
        y64 = LF.layer_norm(x.detach().double(), (n,))
    assert y.dtype == z.dtype == ya.dtype == torch.float32 and s.dtype == torch.bfloat16 and y64.dtype == torch.float64
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    bf = b.detach().clone().requires_grad_()
    y_ref = F.layer_norm(xf, (n,), wf, bf)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, F.rms_norm(xf, (n,), wf), atol=1e-5, rtol=1e-5)
    s_ref = x.detach() + r
    torch.testing.assert_close(s, s_ref, atol=0, rtol=0)
    torch.testing.assert_close(ya, F.layer_norm(s_ref.float(), (n,), wf, bf), atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, xf.grad.bfloat16(), atol=1e-2, rtol=1e-2)  # a bf16 ulp
    torch.testing.assert_close(w.grad, wf.grad.bfloat16(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(b.grad, bf.grad, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a float32 residual: torch's x + r is float32
        ym, sm = LF.add_layer_norm(x.detach(), r.float(), (n,))
    assert ym.dtype == sm.dtype == torch.float32
    torch.testing.assert_close(sm, x.detach().float() + r.float(), atol=0, rtol=0)
    torch.testing.assert_close(ym, F.layer_norm(sm, (n,)), atol=1e-5, rtol=1e-5)


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_bad_input_names_the_argument(device, backend):
    x = torch.randn(4, 16, device=device)
    cases = [
        (lambda: LF.layer_norm(x, (16,), torch.randn(15, device=device)), "weight"),
        (lambda: LF.layer_norm(x, (16,), None, torch.randn(2, 8, device=device)), "bias"),
        (lambda: LF.layer_norm(x, (16,), torch.ones(16, dtype=torch.int64, device=device)), "weight"),
        (lambda: LF.layer_norm(x, (8,)), "normalized_shape"),
        (lambda: LF.layer_norm(x, (4, 8)), "normalized_shape"),
        (lambda: LF.layer_norm(torch.ones(4, 16, dtype=torch.int32, device=device), (16,)), "input"),
        (lambda: LF.layer_norm(x.half(), (16,), torch.randn(16, device=device, dtype=torch.bfloat16)), "weight"),
        (lambda: LF.add_layer_norm(x, torch.randn(4, 15, device=device), (16,)), "residual"),
        (lambda: LF.add_rms_norm(x, x.to(torch.int32), (16,)), "residual"),
        (lambda: LF.add_layer_norm(x, None, (16,)), "residual"),
        (lambda: LF.add_rms_norm(x, None, (16,)), "residual"),
        (lambda: LF.rms_norm(x, (16,), eps="1e-5"), "eps"),  # (a negative eps is allowed, as in torch)
    ]
    if torch.cuda.is_available():
        other = "cpu" if device == "cuda" else "cuda"
        cases.append((lambda: LF.layer_norm(x, (16,), torch.randn(16, device=other)), "weight"))
    with llmfast.use_backend(backend):
        for call, name in cases:
            with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
                call()


def test_backend_selection_errors():
    with pytest.raises(ValueError, match="unknown backend"):
        with llmfast.use_backend("fastest"):
            pass
    assert "reference" in llmfast.available_backends()
    if "cuda" in llmfast.available_backends():
        with llmfast.use_backend("cuda"), pytest.raises(llmfast.BackendUnavailableError, match="cpu tensor"):
            LF.layer_norm(torch.randn(2, 8), (8,))
    elif "cpu" in llmfast.available_backends() and torch.cuda.is_available():
        with llmfast.use_backend("cpu"), pytest.raises(llmfast.BackendUnavailableError):
            LF.layer_norm(torch.randn(2, 8, device="cuda"), (8,))
    if not torch.cuda.is_available():
        with pytest.raises(llmfast.BackendUnavailableError):
            with llmfast.use_backend("cuda"):
                pass


def test_float64_uses_reference_path():
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    y = LF.layer_norm(x, (10,))
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (10,)))
    assert torch.autograd.gradcheck(lambda t: LF.rms_norm(t, (10,)), (x,))


# --- torch.library: opcheck and torch.compile ---------------------------------------------------
def _op_names(backend):
    return {"cuda": ("norm_fwd", "norm_bwd"), "cpu": ("norm_fwd", "norm_bwd"),
            "triton": ("triton_norm_fwd", "triton_norm_bwd")}.get(backend)


@pytest.mark.parametrize("rms,with_residual", [(False, False), (True, True)], ids=["layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] != "reference"])
def test_opcheck(device, backend, rms, with_residual):
    fwd_name, bwd_name = _op_names(backend)
    fwd, bwd = getattr(torch.ops.llmfast, fwd_name), getattr(torch.ops.llmfast, bwd_name)
    x = torch.randn(6, 40, device=device, requires_grad=True)
    r = torch.randn(6, 40, device=device) if with_residual else None
    w = torch.randn(40, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True)
    torch.library.opcheck(fwd, (x, r, w, b, 1e-5, rms))
    out, s, mean, rstd = fwd(x.detach(), r, w.detach(), b.detach(), 1e-5, rms)
    normed = s if with_residual else x.detach()
    gy = torch.randn_like(out)
    torch.library.opcheck(bwd, (gy, torch.randn_like(out) if with_residual else None, normed, w.detach(), mean, rstd,
                                rms, True, True))
    if backend in ("cpu", "cuda"):  # the eager op with the C++ autograd node: any shape, any strides
        x3 = torch.randn(3, 8, 40, device=device).transpose(0, 1).requires_grad_()
        r3 = torch.randn(8, 3, 40, device=device, requires_grad=True) if with_residual else None
        torch.library.opcheck(torch.ops.llmfast.norm, (x3, r3, w, b, 1e-5, rms, 1))
        w2 = torch.randn(3, 40, device=device, requires_grad=True)
        torch.library.opcheck(torch.ops.llmfast.norm, (x3, r3, w2, None, 1e-5, rms, 2))


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params()])
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()

    def block(x, r, w, b):
        y, s = LF.add_layer_norm(x, r, (48,), w, b)
        y2, s2 = LF.add_rms_norm(y, s, (48,), w)
        return LF.rms_norm(y2, (48,), w) + LF.layer_norm(s2, (48,), w, b)

    x = torch.randn(2, 5, 48, device=device, requires_grad=True)
    r = torch.randn(2, 5, 48, device=device, requires_grad=True)
    w = torch.randn(48, device=device, requires_grad=True)
    b = torch.randn(48, device=device, requires_grad=True)
    with llmfast.use_backend(backend):
        eager = block(x, r, w, b)
        g_eager = torch.autograd.grad(eager.square().sum(), (x, r, w, b))
        compiled = torch.compile(block, fullgraph=True)(x, r, w, b)
        g_comp = torch.autograd.grad(compiled.square().sum(), (x, r, w, b))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    for a, e in zip(g_comp, g_eager):
        torch.testing.assert_close(a, e, atol=1e-3, rtol=1e-4)


# --- nn modules -------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_nn_modules_are_drop_in(device):
    torch.manual_seed(2)
    pairs = [
        (llmfast.nn.LayerNorm(64), torch.nn.LayerNorm(64)),
        (llmfast.nn.LayerNorm((4, 16), eps=1e-6, elementwise_affine=False),
         torch.nn.LayerNorm((4, 16), eps=1e-6, elementwise_affine=False)),
        (llmfast.nn.LayerNorm(64, bias=False), torch.nn.LayerNorm(64, bias=False)),
        (llmfast.nn.RMSNorm(64), torch.nn.RMSNorm(64)),
        (llmfast.nn.RMSNorm(64, eps=1e-6), torch.nn.RMSNorm(64, eps=1e-6)),
    ]
    for ours, theirs in pairs:
        assert isinstance(ours, type(theirs))
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
        assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
        ours.to(device), theirs.to(device)
        with torch.no_grad():
            for p in theirs.parameters():
                p.uniform_(0.5, 1.5)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(3, 5, *theirs.normalized_shape, device=device)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_op_level_checks_name_the_argument(device):
    """The C++ launchers check their arguments too, for callers of torch.ops.llmfast directly."""
    if device not in llmfast.available_backends():  # the 'cpu' and 'cuda' backends are these ops
        pytest.skip(f"llmfast._C has no {device} kernels here")
    fwd, bwd = torch.ops.llmfast.norm_fwd, torch.ops.llmfast.norm_bwd
    x = torch.randn(4, 8, device=device)
    cases = [
        # The whole message, numbers too: a C++ runtime mismatch garbles them (tests/test_build.py).
        (lambda: fwd(x, None, torch.randn(7, device=device), None, 1e-5, False), "weight must have 8 elements, got 7"),
        (lambda: fwd(x, torch.randn(4, 7, device=device), None, None, 1e-5, False), "residual"),
        (lambda: fwd(x.t(), None, None, None, 1e-5, False), "input"),
        (lambda: fwd(x, None, None, torch.randn(8, device=device).half(), 1e-5, False), "bias"),
        (lambda: bwd(x, None, x, None, torch.randn(3, device=device), torch.randn(4, device=device),
                     False, False, False), "mean"),
        (lambda: bwd(x, None, x, None, torch.randn(4, device=device), torch.randn(4, device=device),
                     False, True, False), "weight"),
        # llmfast::norm, the eager op of llmfast.functional (any leading shape)
        (lambda: torch.ops.llmfast.norm(x.view(2, 2, 8), torch.randn(2, 8, 2, device=device), None, None, 1e-5,
                                        False, 1), r"residual must have input's shape \[2, 2, 8\], got \[2, 8, 2\]"),
        (lambda: torch.ops.llmfast.norm(x.view(2, 2, 8), None, torch.randn(4, 4, device=device), None, 1e-5,
                                        False, 2), r"weight must have the normalized shape \[2, 8\], got \[4, 4\]"),
        (lambda: torch.ops.llmfast.norm(x, None, None, torch.randn(2, 4, device=device), 1e-5, False, 1),
         r"bias must have the normalized shape \[8\], got \[2, 4\]"),
        (lambda: torch.ops.llmfast.norm(x, None, None, None, 1e-5, False, 3), "normalized_ndim must be in"),
    ]
    for call, name in cases:
        with pytest.raises(RuntimeError, match=name):
            call()


def test_llmfast_backend_environment_variable():
    import subprocess
    import sys

    code = "import llmfast; print(llmfast.current_backend())"
    env = dict(os.environ, LLMFAST_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    # A misspelt name fails every call with an error naming the variable, float64 ones included
    # (those never reach a kernel, so they used to run on silently).
    code = ("import torch, llmfast.functional as LF\n"
            "try:\n    LF.layer_norm(torch.randn(2, 4, dtype=torch.float64), (4,))\n"
            "except ValueError as e:\n    print(e)")
    env = dict(os.environ, LLMFAST_BACKEND="trition")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "LLMFAST_BACKEND" in out.stdout and "trition" in out.stdout


def test_use_backend_is_per_thread():
    """A use_backend block in one thread does not change another thread's backend, and each
    thread gets its own back when its block ends."""
    import threading
    seen = {}
    entered = threading.Barrier(2)

    def worker(name, backend):
        with llmfast.use_backend(backend):
            entered.wait(timeout=10)  # both blocks are open now
            seen[name] = llmfast.current_backend()
            entered.wait(timeout=10)
        seen[name + " after"] = llmfast.current_backend()

    threads = [threading.Thread(target=worker, args=(n, b)) for n, b in (("a", "reference"), ("b", "cpu"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert seen == {"a": "reference", "b": "cpu", "a after": "auto", "b after": "auto"}, seen
    assert llmfast.current_backend() == "auto"


def test_auto_skips_cuda_kernels_the_gpu_cannot_run(monkeypatch):
    """On a GPU that llmfast._C has no code for (built for sm_80 and sm_90a, run on a T4 or a
    Blackwell GPU), auto takes the triton kernels and a forced 'cuda' says why it cannot."""
    from llmfast import _backend

    monkeypatch.setattr(_backend, "_usable", lambda name: name in ("cuda", "triton", "reference"))
    monkeypatch.setattr(_backend, "_cuda_kernels_run_on", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    gpu = torch.device("cuda", 0)
    for op in ("norm", "cross_entropy", "attention"):
        assert _backend.resolve(op, gpu, torch.bfloat16) == "triton"
    with llmfast.use_backend("cuda"), pytest.raises(llmfast.BackendUnavailableError, match="sm_75"):
        _backend.resolve("norm", gpu, torch.bfloat16)
    monkeypatch.setattr(_backend, "_cuda_kernels_run_on", lambda device: True)
    assert _backend.resolve("norm", gpu, torch.bfloat16) == _backend.AUTO_CUDA["norm"]


@pytest.mark.skipif("cuda" not in llmfast.available_backends(), reason="needs the cuda backend and a GPU")
def test_cuda_kernels_run_on_this_gpu():
    """The build's kernels have code for the GPU the tests run on (the probe agrees with a launch)."""
    from llmfast import _extension

    assert _extension._C.cuda_kernels_run_on(torch.cuda.current_device())


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_eager_outputs_behave_like_torch_outputs(device, backend):
    """The eager kernels' outputs are ordinary op outputs: they can be changed in place
    afterwards, the sum of an add variant needs a gradient only when input or residual does
    (as torch's x + r), and the gradients reach every leaf of any leading shape through one
    autograd node (for cpu / cuda the C++ node of llmfast::norm, no reshaping views)."""
    x = torch.randn(2, 3, 16, device=device, requires_grad=True)
    r = torch.randn(2, 3, 16, device=device)
    w = torch.randn(16, device=device, requires_grad=True)
    with llmfast.use_backend(backend):
        y, s = LF.add_layer_norm(x.detach(), r, (16,), w)
        assert y.requires_grad and not s.requires_grad
        y, s = LF.add_layer_norm(x, r, (16,), w)
        assert y.requires_grad and s.requires_grad
        if backend in ("cpu", "cuda"):
            assert y.grad_fn is s.grad_fn and "View" not in type(y.grad_fn).__name__
        g = torch.randn_like(y)
        gx, gw = torch.autograd.grad((y * 1.0, s), (x, w), (g, g))
        y.add_(1.0)  # an output changed in place after its use
        s.mul_(2.0)
    ref_y = torch.nn.functional.layer_norm(x + r, (16,), w)
    ref_gx, ref_gw = torch.autograd.grad((ref_y, x + r), (x, w), (g, g))
    assert_close(gx, ref_gx, torch.float32, "grad of input")
    assert_close(gw, ref_gw, torch.float32, "grad of weight")
