"""Cross-entropy: every backend against the float64 reference (loss and logits gradient) for
every reduction (including 'none' with a non-uniform upstream gradient), class weights, label
smoothing, ignore_index, z_loss and softcap; plus edge cases, opcheck, torch.compile and the
nn module.

Vocabulary grid: V = 1 (a single class: loss 0, gradient 0), 97 (not a multiple of any vector
width; one short row), 50257 (GPT-2: odd, so rows start at every 16-byte misalignment, and
longer than the Triton kernel's in-register limit, which exercises its two-pass path). The GPU
adds the H100 benchmark vocabularies and one longer than the CUDA kernel's cluster capacity.
M stays small (6 rows) so the Triton interpreter keeps the suite fast on the CPU.
"""
import math
import zlib

import pytest
import torch

import llmfast
import llmfast.functional as LF
import llmfast.nn as lnn
from conftest import DEVICES, device_backend_params
from helpers import GRAD_REL_TOL, OUT_TOL, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731
VOCABS = [1, 97, 50257]
M = 6

# (id, options): upstream is the scalar gradient fed to a reduced loss (1.0 takes the kernels'
# "nothing to scale" path); 'none' always gets a non-uniform per-row gradient.
CASES = [
    ("none", dict(reduction="none")),
    ("mean", dict(reduction="mean")),
    ("sum_upstream", dict(reduction="sum", upstream=0.37)),
    ("weight_mean", dict(reduction="mean", weight=True, upstream=2.0)),
    ("smoothing", dict(reduction="mean", label_smoothing=0.1)),
    ("weight_smoothing_none", dict(reduction="none", weight=True, label_smoothing=0.2)),
    ("ignore_index_in_range", dict(reduction="mean", ignore_index="mid")),
    ("z_loss_weight", dict(reduction="mean", weight=True, z_loss=1e-2)),
    ("softcap_none", dict(reduction="none", softcap=2.0)),
    ("everything_sum", dict(reduction="sum", weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=3.0)),
]


def _kwargs(opts, V, device):
    kw = dict(reduction=opts["reduction"])
    if opts.get("weight"):
        kw["weight"] = torch.rand(V, device=device) + 0.5
    if opts.get("label_smoothing"):
        kw["label_smoothing"] = opts["label_smoothing"]
    if opts.get("ignore_index") == "mid":
        kw["ignore_index"] = V // 2
    if opts.get("z_loss"):
        kw["z_loss"] = opts["z_loss"]
    if opts.get("softcap"):
        kw["softcap"] = opts["softcap"]
    return kw


def _targets(m, V, device, ignore_index):
    t = torch.randint(0, V, (m,), device=device)
    t[1::3] = ignore_index  # a third of the rows are ignored
    return t


def _reference(x, t, kw):
    """float64 reference loss and its graph input."""
    xr = x.detach().double().requires_grad_()
    kw = dict(kw)
    if "weight" in kw:
        kw["weight"] = kw["weight"].double()
    return xr, llmfast.reference.cross_entropy(xr, t, **kw)


def _upstream(loss_ref, opts, device):
    if opts["reduction"] == "none":
        g = torch.rand(loss_ref.shape, device=device, dtype=torch.float64) + 0.5
        g.view(-1)[::4] = 1.0  # rows with factor 1 are skipped by the scale kernels
        return g
    return torch.tensor(opts.get("upstream", 1.0), device=device, dtype=torch.float64)


def _assert_loss_close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    torch.testing.assert_close(actual.double(), expected.double(), **OUT_TOL[dtype], equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# The fused gradient is a difference of O(1) terms, p_j * coef - w_t (1 - eps) [j == t] - eps/V w_j;
# where they nearly cancel (V = 1, where only the z-loss term survives) fp32 keeps ~1e-7 of the
# terms, a few 1e-5 of the small result: fp32 is allowed 5x the shared table's bound.
def _assert_grad_close(actual, expected, dtype, what, term_scale=0.0):
    """term_scale: the size of the terms whose difference the gradient is (upstream * weight).
    Where they cancel exactly (V = 1 with label smoothing: w (1 - eps) + eps w - w), a kernel
    keeps fp32 rounding of them (the GPU contracts a * b - c into one FMA, the reference does
    not): such a gradient is judged against a few fp32 ulps of term_scale, not exact zero."""
    assert actual is not None, f"{what}: gradient missing"
    assert actual.shape == expected.shape and actual.dtype == dtype, f"{what}: {actual.shape} {actual.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten element?)"
    if not expected.any():
        worst = actual.double().abs().max().item() if actual.numel() else 0.0
        assert worst <= 8 * torch.finfo(torch.float32).eps * term_scale, \
            f"{what}: expected an all-zero gradient, got elements up to {worst:.3g}"
        return
    # Norm-relative error; the floor only matters for gradients that are almost all zero.
    err = rel_error(actual, expected, floor=1e-4)
    # The fused gradient is a difference of O(1) terms (p_j * coef - w_t (1 - eps) [j == t] -
    # eps/V w_j, as in torch's log_softmax backward); where they nearly cancel (V = 1, where only
    # the z-loss term survives: measured up to 4.5e-5) fp32 keeps ~1e-7 of the terms, a few 1e-5
    # of the small result. fp32 is allowed 10x the shared bound; 16-bit dtypes are limited by
    # their own rounding.
    tol = 10 * GRAD_REL_TOL[dtype] if dtype == torch.float32 else GRAD_REL_TOL[dtype]
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def _check(backend, device, dtype, x, t, kw, opts, inplace_backward=False):
    """Runs llmfast (forced backend) and the float64 reference; compares loss and x.grad."""
    xr, ref = _reference(x, t, kw)
    g_ref = _upstream(ref, opts, device)
    (ref * g_ref).sum().backward()

    leaf = x.detach().clone().requires_grad_()
    original = leaf.detach().clone()
    with llmfast.use_backend(backend):
        loss = LF.cross_entropy(leaf, t, **kw, inplace_backward=inplace_backward)
    _assert_loss_close(loss, ref, dtype, f"{backend} loss")
    loss.backward(g_ref.to(loss.dtype))
    term_scale = g_ref.abs().max().item() * (kw["weight"].abs().max().item() if "weight" in kw else 1.0)
    _assert_grad_close(leaf.grad, xr.grad, dtype, f"{backend} grad", term_scale)
    assert torch.equal(leaf.detach(), original), "the logits were modified"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_matches_reference(device, backend, dtype, V, case, poison):
    name, opts = case
    torch.manual_seed(zlib.crc32(f"{name}-{V}".encode()))
    kw = _kwargs(opts, V, device)
    x = (torch.randn(M, V, device=device) * 3).to(dtype)
    t = _targets(M, V, device, kw.get("ignore_index", -100))
    _check(backend, device, dtype, x, t, kw, opts)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_class_dim_and_leading_dims(device, backend, reduction, poison):
    """(N, C, d1), (N, C, d1, d2) and (C,) inputs, as torch.nn.functional.cross_entropy."""
    torch.manual_seed(3)
    for shape in [(3, 11, 5), (2, 13, 3, 4), (17,)]:
        C = shape[1] if len(shape) > 1 else shape[0]
        x = torch.randn(shape, device=device)
        t_shape = (shape[0],) + shape[2:] if len(shape) > 1 else ()
        t = torch.randint(0, C, t_shape, device=device)
        if t.dim():
            t.view(-1)[::5] = -100
        w = torch.rand(C, device=device) + 0.5
        opts = dict(reduction=reduction)
        _check(backend, device, torch.float32, x, t, dict(reduction=reduction, weight=w, label_smoothing=0.05),
               opts)
        if backend == "reference":
            continue  # (plain PyTorch: its gradient's layout is whatever autograd makes of it)
        xg = x.clone().requires_grad_()
        with llmfast.use_backend(backend):
            loss = LF.cross_entropy(xg, t, weight=w, reduction=reduction)
        (grad,) = torch.autograd.grad(loss, xg, torch.ones_like(loss))
        assert grad.is_contiguous()  # as torch's gradient (a permuted view would surprise a caller's .view)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_all_targets_ignored(device, backend, reduction, label_smoothing, poison):
    """As torch: 'mean' is NaN, 'sum' 0, 'none' zeros; the gradient is all zeros."""
    x = torch.randn(5, 97, device=device, requires_grad=True)
    t = torch.full((5,), -100, device=device)
    with llmfast.use_backend(backend):
        loss = LF.cross_entropy(x, t, reduction=reduction, label_smoothing=label_smoothing)
    expected = torch.nn.functional.cross_entropy(x.detach(), t, reduction=reduction, label_smoothing=label_smoothing)
    torch.testing.assert_close(loss.detach(), expected, equal_nan=True)
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("extra", [dict(label_smoothing=0.1), dict(z_loss=1e-3), dict()])
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_mean_over_zero_class_weight_is_nan(device, backend, extra, poison):
    """The targets' class weights sum to 0: 'mean' is NaN as torch's (its NLL term is 0 / 0),
    also where label smoothing or z_loss leave a non-zero sum (which divided by 0 would be inf);
    'sum' stays finite and equal to torch's."""
    torch.manual_seed(21)
    x = torch.randn(6, 33, device=device)
    t = torch.tensor([0, 1, 2, 0, -100, 1], device=device)
    w = torch.rand(33, device=device) + 0.5
    w[:3] = 0
    with llmfast.use_backend(backend):
        mean = LF.cross_entropy(x, t, weight=w, **extra)
        total = LF.cross_entropy(x, t, weight=w, reduction="sum", **extra)
    assert torch.isnan(mean).item()
    if "z_loss" not in extra:  # torch has no z_loss
        torch.testing.assert_close(total, torch.nn.functional.cross_entropy(x, t, weight=w, reduction="sum", **extra))
    assert torch.isfinite(total).item()


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_non_contiguous_logits(device, backend, poison):
    torch.manual_seed(4)
    base = torch.randn(97, 8, device=device)
    t = torch.randint(0, 97, (8,), device=device)
    for x in (base.t(), torch.randn(8, 2 * 97, device=device)[:, ::2]):
        assert not x.is_contiguous()
        for dtype in DTYPES:
            xd = x.to(dtype) if dtype != torch.float32 else x
            _check(backend, device, dtype, xd, t, dict(reduction="mean", label_smoothing=0.1),
                   dict(reduction="mean"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_large_logits_and_neg_inf(device, backend, dtype, poison):
    """Logits of magnitude 1e4 and -inf entries (not at the target): finite, exact loss."""
    torch.manual_seed(5)
    V = 1000
    x = (torch.randn(M, V, device=device) * 1e4).to(dtype)
    t = torch.randint(0, V, (M,), device=device)
    x[:, ::7] = float("-inf")
    t[t % 7 == 0] += 1
    x[0, :] = float("-inf")
    x[0, t[0]] = 3.0  # one finite logit: loss exactly 0
    for opts in (dict(reduction="none"), dict(reduction="mean", z_loss=1e-6)):
        kw = dict(opts)
        xr, ref = _reference(x, t, kw)
        leaf = x.detach().clone().requires_grad_()
        with llmfast.use_backend(backend):
            loss = LF.cross_entropy(leaf, t, **kw)
        assert torch.isfinite(loss).all()
        # The loss is a difference of 1e4-sized numbers: compare relative to that scale.
        torch.testing.assert_close(loss.double(), ref.double(), rtol=OUT_TOL[dtype]["rtol"], atol=1e4 * 1e-6)
        g = torch.rand(ref.shape, device=device, dtype=torch.float64) + 0.5 if opts["reduction"] == "none" \
            else torch.tensor(1.0, device=device, dtype=torch.float64)
        (ref * g).sum().backward()
        loss.backward(g.to(loss.dtype))
        _assert_grad_close(leaf.grad, xr.grad, dtype, f"{backend} grad")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_softcap_zero_is_off(device, backend):
    """softcap=0.0 (FlashAttention's and Liger's default) means no capping, as None."""
    torch.manual_seed(3)
    x = torch.randn(5, 13, device=device) * 4
    t = torch.randint(0, 13, (5,), device=device)
    h, w = torch.randn(5, 6, device=device), torch.randn(13, 6, device=device)
    with llmfast.use_backend(backend):
        torch.testing.assert_close(LF.cross_entropy(x, t, softcap=0.0), LF.cross_entropy(x, t))
        torch.testing.assert_close(LF.linear_cross_entropy(h, w, t, softcap=0),
                                   LF.linear_cross_entropy(h, w, t))
    torch.testing.assert_close(LF.cross_entropy(x, t, softcap=0.0), torch.nn.functional.cross_entropy(x, t))


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[0] == "cpu"])
def test_out_of_range_target_raises_on_cpu(device, backend):
    """On the CPU a bad target is an IndexError (as torch's) raised before any kernel runs
    (logits untouched, even with inplace_backward)."""
    x = torch.randn(4, 10, requires_grad=True)
    for bad in (10, -1, 12345):
        t = torch.tensor([1, -100, bad, 3])
        with llmfast.use_backend(backend), pytest.raises(IndexError, match="out of bounds"):
            LF.cross_entropy(x, t)
        logits = x.detach().clone().requires_grad_()
        before = logits.detach().clone()
        with llmfast.use_backend(backend), pytest.raises(IndexError, match="out of bounds"):
            LF.cross_entropy(logits * 1.0, t, inplace_backward=True)
        assert torch.equal(logits.detach(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in llmfast.available_backends()])
def test_out_of_range_target_is_ignored_on_gpu(backend):
    """Documented GPU behaviour: no check (no synchronisation), no out-of-bounds read, and the
    row counts as ignored."""
    x = torch.randn(4, 10, device="cuda", requires_grad=True)
    t = torch.tensor([1, 10, -7, 3], device="cuda")
    with llmfast.use_backend(backend):
        loss = LF.cross_entropy(x, t, reduction="none")
    loss.sum().backward()
    assert loss[1].item() == 0 and loss[2].item() == 0
    assert not x.grad[1:3].any()
    ok = torch.tensor([1, 3], device="cuda")
    torch.testing.assert_close(loss[[0, 3]], torch.nn.functional.cross_entropy(x.detach()[[0, 3]], ok, reduction="none"))


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] != "reference"])
def test_inplace_backward(device, backend, poison):
    """inplace_backward=True: the same gradient, written over the logits buffer."""
    torch.manual_seed(6)
    for dtype in DTYPES:
        for opts in (dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3), dict(reduction="none", softcap=5.0)):
            h = torch.randn(M, 97, device=device).to(dtype).requires_grad_()
            t = _targets(M, 97, device, -100)
            logits = h * 2.0  # an intermediate, as a model's output projection would be
            with llmfast.use_backend(backend):
                loss = LF.cross_entropy(logits, t, **opts, inplace_backward=True)
            assert not torch.equal(logits.detach(), h.detach() * 2.0), "the gradient should overwrite the logits"
            g = torch.rand(loss.shape, device=device) + 0.5 if opts["reduction"] == "none" else torch.tensor(1.0)
            loss.backward(g.to(device, loss.dtype))

            h2 = h.detach().clone().requires_grad_()
            with llmfast.use_backend(backend):
                loss2 = LF.cross_entropy(h2 * 2.0, t, **opts)
            loss2.backward(g.to(device, loss2.dtype))
            torch.testing.assert_close(loss, loss2)
            torch.testing.assert_close(h.grad, h2.grad, **OUT_TOL[dtype])


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] != "reference"])
def test_inplace_backward_leaves_other_inputs_alone(device, backend):
    """Only a 2-D (N, C) input's own buffer takes the gradient; (C,) and (N, C, 1) inputs, whose
    (N, C) form is a view of the caller's tensor, are copied first (the documented contract)."""
    torch.manual_seed(23)
    for shape, t_shape in [((7,), ()), ((7,), (1,)), ((3, 7, 1), (3, 1)), ((3, 7, 2), (3, 2))]:
        x = torch.randn(shape, device=device, requires_grad=True)
        before = x.detach().clone()
        t = torch.randint(0, 7, t_shape, device=device)
        with llmfast.use_backend(backend):
            loss = LF.cross_entropy(x, t, inplace_backward=True)
        loss.backward()
        assert torch.equal(x.detach(), before), shape
        x2 = before.clone().requires_grad_()
        expected = torch.nn.functional.cross_entropy(x2, t.reshape(()) if t_shape == (1,) else t)
        expected.backward()  # (torch's backward refuses the (1,) target its forward takes)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_float16_gradient_survives_a_loss_scale(device, backend):
    """float16 logits under autocast with a GradScaler-style loss scale: the unlikely classes'
    tiny gradient entries survive as in torch (the scaled gradient is rounded to float16 once),
    rather than being flushed to zero before the scale arrives."""
    torch.manual_seed(24)
    N, C, scale = 512, 64, 65536.0
    x = (torch.randn(N, C, device=device) * 4).half()
    t = torch.randint(0, C, (N,), device=device)
    grads = []
    for use_llmfast in (True, False):
        xx = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.float16), llmfast.use_backend(backend):
            loss = LF.cross_entropy(xx, t) if use_llmfast else torch.nn.functional.cross_entropy(xx, t)
        (loss * scale).backward()
        grads.append(xx.grad)
    ours, theirs = grads
    assert (theirs != 0).sum() > 0.95 * theirs.numel()
    assert ((ours == 0) & (theirs != 0)).sum() <= 0.001 * theirs.numel()
    torch.testing.assert_close(ours, theirs, atol=0, rtol=2e-3)


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] != "reference"])
def test_inplace_backward_detects_saved_logits(device, backend):
    """Logits that another node saved for its backward (tanh saves its output) must not be
    overwritten: torch's version counter turns the broken contract into an error."""
    x = torch.randn(4, 33, device=device, requires_grad=True)
    logits = torch.tanh(x)
    with llmfast.use_backend(backend):
        loss = LF.cross_entropy(logits, torch.randint(0, 33, (4,), device=device), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] != "reference"])
def test_second_backward_is_refused(device, backend):
    x = torch.randn(4, 33, device=device, requires_grad=True)
    with llmfast.use_backend(backend):
        loss = LF.cross_entropy(x, torch.randint(0, 33, (4,), device=device))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_no_grad_and_empty(device, backend, poison):
    x = torch.randn(5, 40, device=device)
    t = torch.randint(0, 40, (5,), device=device)
    with llmfast.use_backend(backend), torch.no_grad():
        loss = LF.cross_entropy(x.requires_grad_(), t)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x.detach(), t))
    empty = torch.randn(0, 40, device=device, requires_grad=True)
    t0 = torch.zeros(0, dtype=torch.int64, device=device)
    with llmfast.use_backend(backend):
        for reduction in ("none", "mean", "sum"):
            got = LF.cross_entropy(empty, t0, reduction=reduction)
            torch.testing.assert_close(got, torch.nn.functional.cross_entropy(empty, t0, reduction=reduction),
                                       equal_nan=True)


# --- class-probability targets (plain PyTorch path) ------------------------------------------
@pytest.mark.parametrize("shape", [(6, 9), (3, 9, 4), (9,)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_match_torch(shape, reduction):
    """A floating target shaped like the input: torch's soft-label cross-entropy, values and
    gradients, with and without class weights and label smoothing; nn.CrossEntropyLoss too."""
    torch.manual_seed(zlib.crc32(repr((shape, reduction)).encode()))
    dim = 1 if len(shape) > 1 else 0
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(*shape, dtype=torch.float64), dim)
    w = torch.rand(shape[dim], dtype=torch.float64)
    for kw in (dict(), dict(weight=w), dict(label_smoothing=0.2), dict(weight=w, label_smoothing=0.1)):
        ours = LF.cross_entropy(x, p, reduction=reduction, **kw)
        theirs = torch.nn.functional.cross_entropy(x, p, reduction=reduction, **kw)
        torch.testing.assert_close(ours, theirs)
        g = torch.randn_like(theirs)
        torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(theirs, x, g)[0])
        module = lnn.CrossEntropyLoss(reduction=reduction, **kw)
        torch.testing.assert_close(module(x, p), theirs)


def test_probability_targets_extras_and_errors():
    torch.manual_seed(4)
    x = torch.randn(5, 7, requires_grad=True)
    p = torch.softmax(torch.randn(5, 7), 1)
    got = LF.cross_entropy(x, p, z_loss=1e-2, softcap=3.0)
    capped = 3.0 * torch.tanh(x / 3.0)
    want = (-(p * torch.log_softmax(capped, 1)).sum(1) + 1e-2 * torch.logsumexp(capped, 1) ** 2).mean()
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="input's shape"):
        LF.cross_entropy(x, p[:, :6])
    with pytest.raises(TypeError, match="weight"):
        LF.cross_entropy(x, p, weight=torch.ones(7, dtype=torch.int64))
    # torch refuses a non-negative ignore_index with probability targets (and ignores negative ones)
    with pytest.raises(ValueError, match="ignore_index"):
        LF.cross_entropy(x, p, ignore_index=0)
    torch.testing.assert_close(LF.cross_entropy(x, p, ignore_index=-1), torch.nn.functional.cross_entropy(x, p))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_uint8_class_targets(device, backend):
    """torch accepts uint8 class indices for an unbatched or (N, C) input; so does every backend."""
    torch.manual_seed(5)
    x = torch.randn(6, 9, device=device)
    t = torch.randint(0, 9, (6,), device=device)
    with llmfast.use_backend(backend):
        got = LF.cross_entropy(x, t.to(torch.uint8), label_smoothing=0.1)
        got1 = LF.cross_entropy(x[0], t[0].to(torch.uint8))
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(x, t, label_smoothing=0.1))
    torch.testing.assert_close(got1, torch.nn.functional.cross_entropy(x[0], t[0]))


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_bad_input_names_the_argument(device, backend):
    x = torch.randn(4, 16, device=device)
    t = torch.randint(0, 16, (4,), device=device)
    cases = [
        (lambda: LF.cross_entropy(x, t.float()), "target"),
        (lambda: LF.cross_entropy(x, t[:3]), "target"),
        (lambda: LF.cross_entropy(x.int(), t), "input"),
        (lambda: LF.cross_entropy(x, t, torch.rand(15, device=device)), "weight"),
        (lambda: LF.cross_entropy(x, t, torch.rand(16, device=device, requires_grad=True)), "weight"),
        (lambda: LF.cross_entropy(x, t, reduction="avg"), "reduction"),
        (lambda: LF.cross_entropy(x, t, label_smoothing=1.5), "label_smoothing"),
        (lambda: LF.cross_entropy(x, t, z_loss=-1.0), "z_loss"),
        (lambda: LF.cross_entropy(x, t, softcap=-2.0), "softcap"),
        (lambda: LF.cross_entropy(x, t, ignore_index=1.5), "ignore_index"),
        (lambda: LF.cross_entropy(x, t, inplace_backward="yes"), "inplace_backward"),
    ]
    with llmfast.use_backend(backend):
        for call, name in cases:
            with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
                call()


def test_float64_uses_reference_path():
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, 2, -100])
    torch.testing.assert_close(LF.cross_entropy(x, t), torch.nn.functional.cross_entropy(x, t))
    assert torch.autograd.gradcheck(lambda v: LF.cross_entropy(v, t, label_smoothing=0.1, z_loss=0.1, softcap=2.0), (x,))


# --- torch.library: opcheck and torch.compile ---------------------------------------------------
def _ops(backend):
    prefix = "triton_" if backend == "triton" else ""
    return tuple(getattr(torch.ops.llmfast, prefix + name)
                 for name in ("cross_entropy_fwd", "cross_entropy_fwd_inplace", "cross_entropy_scale_grad_"))


@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] != "reference"])
def test_opcheck(device, backend, reduction):
    fwd, fwd_inplace, scale = _ops(backend)
    x = torch.randn(6, 50, device=device, requires_grad=True)
    t = torch.tensor([0, 5, -100, 49, 7, 7], device=device)
    w = torch.rand(50, device=device) + 0.5
    # The gradient output is the buffer that backward scales in place (see llmfast/ops/
    # cross_entropy.py); aot_dispatch, which backpropagates while using every output, cannot
    # accept that, so with requires_grad it is left out here -- test_torch_compile_fullgraph
    # covers the traced forward + backward as the functional API uses the op.
    with_grad = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(fwd, (x, t, w, reduction, -100, 0.1, 1e-3, 4.0, True), test_utils=with_grad)
    torch.library.opcheck(fwd, (x.detach(), t, w, reduction, -100, 0.1, 1e-3, 4.0, True))
    torch.library.opcheck(fwd, (x.detach(), t, None, reduction, -100, 0.0, 0.0, None, False))
    torch.library.opcheck(fwd_inplace, (x.detach().clone(), t, w, reduction, -100, 0.1, 0.0, None))
    go = torch.rand(6 if reduction == 0 else 1, device=device)
    torch.library.opcheck(scale, (torch.randn(6, 50, device=device), go))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()

    def loss_fn(h, proj, t, w):
        logits = h @ proj
        a = LF.cross_entropy(logits, t, w, label_smoothing=0.1, z_loss=1e-3)
        b = LF.cross_entropy(logits.view(2, 4, 40).transpose(1, 2), t.view(2, 4), reduction="none", softcap=3.0)
        return a + (b * torch.arange(8, device=h.device).view(2, 4)).sum()

    torch.manual_seed(7)
    h = torch.randn(8, 16, device=device, requires_grad=True)
    proj = torch.randn(16, 40, device=device, requires_grad=True)
    t = torch.randint(0, 40, (8,), device=device)
    t[3] = -100
    w = torch.rand(40, device=device) + 0.5
    with llmfast.use_backend(backend):
        eager = loss_fn(h, proj, t, w)
        g_eager = torch.autograd.grad(eager, (h, proj))
        compiled = torch.compile(loss_fn, fullgraph=True)(h, proj, t, w)
        g_comp = torch.autograd.grad(compiled, (h, proj))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    for a, e in zip(g_comp, g_eager):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] != "reference"])
def test_torch_compile_inplace_backward(device, backend):
    torch._dynamo.reset()

    def loss_fn(h, proj, t):
        return LF.cross_entropy(h @ proj, t, label_smoothing=0.1, inplace_backward=True)

    torch.manual_seed(11)
    h = torch.randn(8, 16, device=device, requires_grad=True)
    proj = torch.randn(16, 40, device=device, requires_grad=True)
    t = torch.randint(0, 40, (8,), device=device)
    with llmfast.use_backend(backend):
        eager = loss_fn(h, proj, t)
        g_eager = torch.autograd.grad(eager, (h, proj))
        compiled = torch.compile(loss_fn, fullgraph=True)(h, proj, t)
        g_comp = torch.autograd.grad(compiled, (h, proj))
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for a, e in zip(g_comp, g_eager):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


# --- nn module --------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_nn_module_is_drop_in(device):
    torch.manual_seed(8)
    w = torch.rand(30) + 0.5
    pairs = [
        (llmfast.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()),
        (llmfast.nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.1),
         torch.nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.1)),
        (llmfast.nn.CrossEntropyLoss(reduction="none"), torch.nn.CrossEntropyLoss(reduction="none")),
    ]
    for ours, theirs in pairs:
        assert isinstance(ours, torch.nn.CrossEntropyLoss)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
        ours.to(device), theirs.to(device)
        x = torch.randn(7, 30, device=device)
        t = torch.randint(0, 30, (7,), device=device)
        torch.testing.assert_close(ours(x, t), theirs(x, t), atol=1e-5, rtol=1e-5)
    # llmfast's extras as keyword-only module options (not state), as the functional's
    extras = llmfast.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, z_loss=1e-2, softcap=5.0,
                                         inplace_backward=True).to(device)
    assert extras.state_dict().keys() == pairs[1][0].state_dict().keys()
    x = torch.randn(7, 30, device=device)
    t = torch.randint(0, 30, (7,), device=device)
    logits = x.clone().requires_grad_()
    expected = LF.cross_entropy(x, t, weight=w.to(device), label_smoothing=0.1, z_loss=1e-2, softcap=5.0)
    torch.testing.assert_close(extras(logits * 1.0, t), expected, atol=1e-5, rtol=1e-5)


# --- GPU only: vocabularies of the benchmarks, cluster and looped paths, 64-bit offsets ---------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("V", [32000, 50304, 128256, 256000, 600000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in llmfast.available_backends()])
def test_gpu_vocab_sizes(backend, dtype, V, poison):
    torch.manual_seed(V)
    for opts in (dict(reduction="mean"), dict(reduction="none", weight=True, label_smoothing=0.1, z_loss=1e-4)):
        kw = _kwargs(opts, V, "cuda")
        x = (torch.randn(5, V, device="cuda") * 3).to(dtype)
        _check(backend, "cuda", dtype, x, _targets(5, V, "cuda", -100), kw, opts)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40e9,
                    reason="needs a CUDA device with 40 GB")
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in llmfast.available_backends()])
def test_gpu_64bit_offsets(backend):
    """M * V > 2^31: the last rows (past element 2^31) match the reference."""
    V = 256000
    m = (2**31) // V + 8
    x = torch.randn(m, V, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, V, (m,), device="cuda")
    with llmfast.use_backend(backend):
        loss = LF.cross_entropy(x, t, reduction="none")
    tail = slice(m - 8, m)
    ref = llmfast.reference.cross_entropy(x[tail].double(), t[tail], reduction="none")
    torch.testing.assert_close(loss[tail].double(), ref, **OUT_TOL[torch.bfloat16])
    del x
    torch.cuda.empty_cache()
    assert math.isfinite(loss.float().sum().item())


def _free_memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


@pytest.mark.skipif("cpu" not in llmfast.available_backends() or _free_memory_bytes() < 12e9,
                    reason="needs llmfast._C and 12 GB of free memory")
def test_cpu_64bit_offsets():
    """M * V > 2^31 on the C++ CPU kernels, loss and gradient: rows past element 2^31 match the
    reference (the first rows are zeros, so filling the 4.3 GB input stays cheap)."""
    V = 256000
    m = (2**31) // V + 4
    x = torch.zeros(m, V, dtype=torch.bfloat16)
    torch.manual_seed(31)
    x[-4:] = (torch.randn(4, V) * 3).to(torch.bfloat16)
    x.requires_grad_()
    t = torch.randint(0, V, (m,))
    with llmfast.use_backend("cpu"):
        loss = LF.cross_entropy(x, t, reduction="none")
        (grad,) = torch.autograd.grad(loss[-4:].sum(), x)
    tail = slice(m - 4, m)
    xr = x.detach()[tail].double().requires_grad_()
    ref = llmfast.reference.cross_entropy(xr, t[tail], reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), xr)
    torch.testing.assert_close(loss[tail].double(), ref, **OUT_TOL[torch.bfloat16])
    assert rel_error(grad[tail].double(), ref_grad) < GRAD_REL_TOL[torch.bfloat16]
    torch.testing.assert_close(loss[:2].float(), torch.full((2,), math.log(V)), atol=2e-2, rtol=2e-2)
    assert (grad[:2] == 0).all(), "rows without upstream gradient get zero gradient"


# --- fused linear + cross-entropy -------------------------------------------------------------
LINEAR_CASES = [
    ("mean", dict(reduction="mean")),
    ("sum_bias_upstream", dict(reduction="sum", bias=True, upstream=0.5)),
    ("none_bias_options", dict(reduction="none", bias=True, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)),
    ("mean_all_ignored", dict(reduction="mean", all_ignored=True)),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_linear_cross_entropy_matches_reference(device, backend, dtype, case, poison):
    """chunk_size=4 over 10 tokens: two full chunks and a partial one."""
    name, opts = case
    torch.manual_seed(zlib.crc32(name.encode()))
    B, T, D, V = 2, 5, 24, 97
    x = torch.randn(B, T, D, device=device).to(dtype)
    w = (torch.randn(V, D, device=device) * 0.3).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if opts.get("bias") else None
    t = torch.randint(0, V, (B, T), device=device)
    t[0, 1] = t[1, 3] = -100
    if opts.get("all_ignored"):
        t.fill_(-100)
    kw = {k: opts[k] for k in ("reduction", "label_smoothing", "z_loss", "softcap") if k in opts}

    leaves_ref = [v.detach().double().requires_grad_() if v is not None else None for v in (x, w, b)]
    ref = llmfast.reference.linear_cross_entropy(leaves_ref[0], leaves_ref[1], t, leaves_ref[2], **kw)
    g = _upstream(ref, opts, device)
    (ref * g).sum().backward()

    leaves = [v.detach().clone().requires_grad_() if v is not None else None for v in (x, w, b)]
    with llmfast.use_backend(backend):
        loss = LF.linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], chunk_size=4, **kw)
    # bf16: the kernels see logits rounded to bf16 (as F.linear would make them).
    tol = OUT_TOL[dtype] if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    assert loss.shape == ref.shape and loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.double(), **tol, equal_nan=True)
    loss.backward(g.to(loss.dtype))
    for what, leaf, leaf_ref in zip(("input", "weight", "bias"), leaves, leaves_ref):
        if leaf is None:
            continue
        assert leaf.grad is not None and leaf.grad.dtype == dtype, what
        assert torch.isfinite(leaf.grad).all(), what
        if not leaf_ref.grad.any():
            assert not leaf.grad.any(), f"{what}: expected zeros"
            continue
        err = rel_error(leaf.grad, leaf_ref.grad, floor=1e-4)
        limit = 1e-5 if dtype == torch.float32 else 3e-2
        assert err <= limit, f"{backend} grad {what}: relative error {err:.3g} > {limit}"


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_cross_entropy_loss_is_float32_under_autocast(device, backend):
    """torch's autocast runs cross_entropy in float32: 16-bit logits give a float32 loss."""
    torch.manual_seed(12)
    dt = torch.bfloat16 if device == "cpu" else torch.float16
    x = (torch.randn(7, 33, device=device) * 2).to(dt).requires_grad_()
    t = torch.randint(0, 33, (7,), device=device)
    with torch.autocast(device, dtype=dt):
        with llmfast.use_backend(backend):
            loss = LF.cross_entropy(x, t, label_smoothing=0.1)
        want = torch.nn.functional.cross_entropy(x, t, label_smoothing=0.1)
    assert loss.dtype == want.dtype == torch.float32
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4)
    (g,) = torch.autograd.grad(loss, x)
    (g_want,) = torch.autograd.grad(want, x)
    assert g.dtype == dt
    torch.testing.assert_close(g.float(), g_want.float(), atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_linear_cross_entropy_under_autocast(device, backend, reduction):
    """Under torch.autocast, as torch's linear + cross_entropy: float32 parameters, the projection
    in the autocast dtype, the loss in float32, float32 gradients (with and without a bias, and
    with an input that needs no gradient)."""
    torch.manual_seed(11)
    dt = torch.bfloat16 if device == "cpu" else torch.float16
    x = torch.randn(2, 9, 16, device=device)
    W = torch.randn(40, 16, device=device) * 0.3
    b = torch.randn(40, device=device)
    t = torch.randint(0, 40, (2, 9), device=device)
    t[0, 3] = -100
    for bias, x_grad in ((None, True), (b, True), (b, False)):
        ours_in = [x.clone().requires_grad_(x_grad), W.clone().requires_grad_(), None if bias is None else
                   bias.clone().requires_grad_()]
        ref_in = [a.detach().clone().requires_grad_(a.requires_grad) if a is not None else None for a in ours_in]
        with torch.autocast(device, dtype=dt):
            with llmfast.use_backend(backend):
                loss = LF.linear_cross_entropy(ours_in[0], ours_in[1], t, ours_in[2], reduction=reduction)
            want = torch.nn.functional.cross_entropy(
                torch.nn.functional.linear(ref_in[0], ref_in[1], ref_in[2]).flatten(0, 1), t.flatten(),
                reduction=reduction)
        assert loss.dtype == torch.float32, loss.dtype
        want = want.view(t.shape) if reduction == "none" else want
        torch.testing.assert_close(loss, want.float(), atol=2e-2, rtol=2e-2)
        g = torch.rand_like(loss) + 0.5
        (loss * g).sum().backward()
        (want.float() * g).sum().backward()
        for a, r in zip(ours_in, ref_in):
            if a is not None and a.requires_grad:
                assert a.grad.dtype == torch.float32
                torch.testing.assert_close(a.grad, r.grad, atol=3e-2, rtol=3e-2)
    if reduction == "mean":
        # float16 with a GradScaler-style loss scale: the float32 loss carries it to finite
        # gradients, as torch's (a loss rounded to float16 first would turn the scale into inf).
        xs, Ws = x.clone().requires_grad_(), W.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.float16), llmfast.use_backend(backend):
            loss = LF.linear_cross_entropy(xs, Ws, t)
        assert loss.dtype == torch.float32
        (loss * 65536.0).backward()
        assert xs.grad.isfinite().all() and Ws.grad.isfinite().all()


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[1] != "reference"])
def test_linear_cross_entropy_default_chunk_and_tied_weight_module(device, backend):
    torch.manual_seed(9)
    emb = torch.nn.Embedding(50, 16).to(device)
    h = torch.randn(3, 7, 16, device=device, requires_grad=True)
    t = torch.randint(0, 50, (3, 7), device=device)
    loss_fn = llmfast.nn.LinearCrossEntropyLoss(label_smoothing=0.05)
    assert list(loss_fn.parameters()) == []
    with llmfast.use_backend(backend):
        loss = loss_fn(h, emb.weight, t)
    loss.backward()
    h2 = h.detach().clone().requires_grad_()
    w2 = emb.weight.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy((h2 @ w2.t()).view(-1, 50), t.view(-1), label_smoothing=0.05)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.weight.grad, w2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_linear_cross_entropy_backward_without_forward_gradients(device, backend, monkeypatch):
    """A forward traced without its gradients (torch.export; torch < 2.14's torch.compile says
    is_exporting() while tracing) keeps the inputs and recomputes the logits in backward: the
    gradients of 'mean' (class weights, ignored rows), 'sum' and 'none' are still torch's."""
    if backend == "reference":
        pytest.skip("the reference path has no fused backward")
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    torch.manual_seed(11)
    h, w, b = torch.randn(9, 8, device=device), torch.randn(21, 8, device=device), torch.randn(21, device=device)
    cw = torch.rand(21, device=device) + 0.5
    t = torch.randint(0, 21, (9,), device=device)
    t[2] = -100
    for reduction, weight in (("mean", cw), ("mean", None), ("sum", cw), ("none", None)):
        leaves = [a.clone().requires_grad_() for a in (h, w, b)]
        refs = [a.clone().requires_grad_() for a in (h, w, b)]
        with llmfast.use_backend(backend):
            loss = LF.linear_cross_entropy(*leaves[:2], t, leaves[2], weight=weight, reduction=reduction,
                                           label_smoothing=0.1, chunk_size=4)
        logits = torch.nn.functional.linear(*refs[:2], refs[2])
        ref = torch.nn.functional.cross_entropy(logits, t, weight=weight, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        g = torch.rand_like(ref) + 0.5
        for a, e in zip(torch.autograd.grad(loss, leaves, g), torch.autograd.grad(ref, refs, g)):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{reduction}: {m}")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_linear_cross_entropy_torch_compile(device, backend):
    torch._dynamo.reset()

    def fn(h, w, b, t):
        return LF.linear_cross_entropy(h, w, t, b, chunk_size=3, z_loss=1e-3)

    torch.manual_seed(10)
    h = torch.randn(8, 16, device=device, requires_grad=True)
    w = torch.randn(40, 16, device=device, requires_grad=True)
    b = torch.randn(40, device=device, requires_grad=True)
    t = torch.randint(0, 40, (8,), device=device)
    with llmfast.use_backend(backend):
        eager = fn(h, w, b, t)
        g_eager = torch.autograd.grad(eager, (h, w, b))
        compiled = torch.compile(fn, fullgraph=True)(h, w, b, t)
        g_comp = torch.autograd.grad(compiled, (h, w, b))
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for a, e in zip(g_comp, g_eager):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
