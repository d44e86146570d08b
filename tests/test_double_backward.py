"""Double backward (a backward with create_graph=True, as gradient penalties, MAML and
torch.autograd.gradgradcheck use): every op's gradients carry a graph, and second derivatives
match torch's own functions. The kernels' backward passes are not differentiable themselves;
their autograd Functions recompute through the reference then (llmfast/ops/_create_graph.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import llmfast
import llmfast.functional as LF
from conftest import device_backend_params

DTYPE = torch.float32  # a kernel dtype (float64 takes the reference path anyway)
TOL = dict(atol=2e-5, rtol=2e-4)


def _second_derivatives(fn, inputs, seed):
    """d/d inputs of <v, d<u, fn(inputs)>/d inputs> for random u, v: first derivatives with a
    graph, then the derivatives of a random projection of them."""
    g = torch.Generator().manual_seed(seed)
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    first = torch.autograd.grad(
        [o for o in outs], inputs, [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in outs],
        create_graph=True, allow_unused=True)
    first = [f for f in first if f is not None]
    assert any(f.requires_grad for f in first), "the gradients carry no graph"
    # (a first derivative that is constant, such as a bias's, may or may not carry a graph: the
    # random draws must not depend on which do)
    proj = sum((f * torch.randn(f.shape, generator=g, dtype=f.dtype).to(f.device)).sum() for f in first)
    return first, torch.autograd.grad(proj, inputs, allow_unused=True)


def _check(backend, ours, theirs, make_inputs, what):
    with sdpa_kernel(SDPBackend.MATH):  # torch's other CPU/GPU attention kernels have no double backward
        expected = _second_derivatives(theirs, make_inputs(), seed=1)
    with llmfast.use_backend(backend):
        actual = _second_derivatives(ours, make_inputs(), seed=1)
    for order, (a_all, e_all) in enumerate(zip(actual, expected), start=1):
        for i, (a, e) in enumerate(zip(a_all, e_all)):
            if e is None:
                assert a is None or not a.abs().any(), f"{what}: order {order}, input {i}: torch gives none"
                continue
            assert a is not None, f"{what}: order {order}, input {i}: llmfast gives no gradient"
            torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"{what}: order {order}, input {i}: {m}")


def _leaves(device, *shapes, seed=0):
    def make():
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(s, generator=g, dtype=DTYPE).to(device).requires_grad_() for s in shapes]
    return make


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_norms(device, backend):
    make = _leaves(device, (5, 16), (16,), (16,), (5, 16))
    _check(backend, lambda x, w, b, r: LF.layer_norm(x, (16,), w, b), lambda x, w, b, r: F.layer_norm(x, (16,), w, b),
           make, "layer_norm")
    _check(backend, lambda x, w, b, r: LF.rms_norm(x * 2.0, (16,), w, 1e-6),
           lambda x, w, b, r: F.rms_norm(x * 2.0, (16,), w, 1e-6), make, "rms_norm")
    _check(backend, lambda x, w, b, r: LF.add_layer_norm(x, r, (16,), w, b),
           lambda x, w, b, r: (F.layer_norm(x + r, (16,), w, b), x + r), make, "add_layer_norm")
    _check(backend, lambda x, w, b, r: LF.add_rms_norm(x, r, (16,), w, 1e-6),
           lambda x, w, b, r: (F.rms_norm(x + r, (16,), w, 1e-6), x + r), make, "add_rms_norm")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_cross_entropy(device, backend):
    target = torch.tensor([3, 0, -100, 7, 5], device=device)
    class_weight = torch.rand(8, generator=torch.Generator().manual_seed(2)).to(device)
    make = _leaves(device, (5, 8), (8,))

    def ce(f, **kw):
        def run(x, s):
            logits = x * s  # an intermediate, held by this frame until backward
            run.logits = logits
            return f(logits, target, **kw)
        return run

    for kw in (dict(label_smoothing=0.1), dict(reduction="none", weight=class_weight), dict(reduction="sum")):
        _check(backend, ce(LF.cross_entropy, **kw), ce(F.cross_entropy, **kw), make, f"cross_entropy {kw}")
    # (N, C, d) logits: the kernels' (M, C) view and back
    make3 = _leaves(device, (2, 8, 3), (3,))
    target3 = torch.tensor([[1, 2, 3], [0, 7, 4]], device=device)
    _check(backend, lambda x, s: LF.cross_entropy(x, target3, reduction="none") * s,
           lambda x, s: F.cross_entropy(x, target3, reduction="none") * s, make3, "cross_entropy (N, C, d)")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_linear_cross_entropy(device, backend):
    target = torch.tensor([[3, 0, 7], [-100, 5, 1]], device=device)
    make = _leaves(device, (2, 3, 8), (10, 8), (10,))
    for reduction in ("mean", "none"):
        _check(backend,
               lambda x, w, b: LF.linear_cross_entropy(x, w, target, b, reduction=reduction, chunk_size=4),
               lambda x, w, b: F.cross_entropy((x @ w.T + b).flatten(0, 1), target.flatten(),
                                               reduction=reduction).view_as(target if reduction == "none" else
                                                                            torch.empty(())),
               make, f"linear_cross_entropy {reduction}")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_attention(device, backend):
    make = _leaves(device, (1, 4, 6, 8), (1, 2, 9, 8), (1, 2, 9, 8), (1, 1, 6, 9))
    _check(backend,
           lambda q, k, v, m: LF.scaled_dot_product_attention(q, k, v, m, enable_gqa=True),
           lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, enable_gqa=True), make,
           "sdpa, additive mask, GQA")
    make = _leaves(device, (2, 2, 7, 8), (2, 2, 7, 8), (2, 2, 7, 8))
    _check(backend, lambda q, k, v: LF.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5),
           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5), make, "sdpa causal")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_what_cannot_be_recomputed_raises(device, backend):
    if backend == "reference":
        pytest.skip("the reference path is plain torch: double backward always works there")
    x = torch.randn(4, 8, device=device, requires_grad=True)
    target = torch.tensor([1, 2, 3, 0], device=device)
    with llmfast.use_backend(backend):
        # the logits were an intermediate nobody holds: the fused kernel kept only their gradient
        loss = LF.cross_entropy(x * 2.0, target)
        with pytest.raises(RuntimeError, match="create_graph=True.*'input' has been freed"):
            torch.autograd.grad(loss, x, create_graph=True)
        logits = x * 2.0
        loss = LF.cross_entropy(logits, target, inplace_backward=True)
        with pytest.raises(NotImplementedError, match="inplace_backward"):
            torch.autograd.grad(loss, x, create_graph=True)
        q = torch.randn(1, 1, 4, 8, device=device, requires_grad=True)
        out = LF.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
        with pytest.raises(NotImplementedError, match="dropout_p > 0"):
            torch.autograd.grad(out.sum(), q, create_graph=True)
        # an ordinary backward of the same graphs still works
        logits = x * 2.0
        loss = LF.cross_entropy(logits, target)
        assert torch.autograd.grad(loss, x)[0].shape == x.shape
