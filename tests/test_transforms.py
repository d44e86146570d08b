"""torch.func transforms (grad, vmap, jacrev, per-sample gradients) over llmfast's functional API
give what they give over the torch functions it mirrors: under a transform every op takes the
reference path (llmfast._backend.resolve), whose plain torch ops support them."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, vmap

import llmfast
import llmfast.functional as LF
from conftest import DEVICES, device_backend_params

DTYPE = torch.float32  # a kernel dtype: float64 would take the reference path anyway
TOL = dict(atol=1e-5, rtol=1e-4)


def _pairs(device):
    """(name, llmfast function, torch function, example inputs) for one op each."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g, dtype=DTYPE).to(device)
    w = torch.randn(8, generator=g, dtype=DTYPE).to(device)
    b = torch.randn(8, generator=g, dtype=DTYPE).to(device)
    r = torch.randn(3, 8, generator=g, dtype=DTYPE).to(device)
    target = torch.randint(0, 8, (3,), generator=g).to(device)
    proj = torch.randn(8, 8, generator=g, dtype=DTYPE).to(device)
    q = torch.randn(2, 5, 8, generator=g, dtype=DTYPE).to(device)
    return [
        ("layer_norm", lambda x: LF.layer_norm(x, (8,), w, b), lambda x: F.layer_norm(x, (8,), w, b), x),
        ("rms_norm", lambda x: LF.rms_norm(x, (8,), w, 1e-6), lambda x: F.rms_norm(x, (8,), w, 1e-6), x),
        ("add_layer_norm", lambda x: LF.add_layer_norm(x, r, (8,), w, b)[0],
         lambda x: F.layer_norm(x + r, (8,), w, b), x),
        ("cross_entropy", lambda x: LF.cross_entropy(x, target, label_smoothing=0.1),
         lambda x: F.cross_entropy(x, target, label_smoothing=0.1), x),
        ("linear_cross_entropy", lambda x: LF.linear_cross_entropy(x, proj, target),
         lambda x: F.cross_entropy(x @ proj.T, target), x),
        ("scaled_dot_product_attention", lambda q: LF.scaled_dot_product_attention(q, q, q, is_causal=True),
         lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True), q),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(6))
def test_grad_jacrev_and_vmap_match_torch(device, index):
    name, ours, theirs, x = _pairs(device)[index]
    torch.testing.assert_close(grad(lambda t: ours(t).sum())(x), grad(lambda t: theirs(t).sum())(x), **TOL,
                               msg=lambda m: f"{name} grad: {m}")
    torch.testing.assert_close(jacrev(ours)(x), jacrev(theirs)(x), **TOL, msg=lambda m: f"{name} jacrev: {m}")
    batch = torch.stack([x, 2 * x, -x])
    torch.testing.assert_close(vmap(ours)(batch), vmap(theirs)(batch), **TOL, msg=lambda m: f"{name} vmap: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_gradients_of_a_norm_layer(device):
    """The per-sample gradient recipe (vmap over grad of functional_call) on llmfast.nn.LayerNorm."""
    torch.manual_seed(0)
    layer = llmfast.nn.LayerNorm(8, device=device, dtype=DTYPE)
    ref = torch.nn.LayerNorm(8, device=device, dtype=DTYPE)
    with torch.no_grad():
        layer.weight.normal_(), layer.bias.normal_()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 8, device=device, dtype=DTYPE)
    target = torch.randn(4, 8, device=device, dtype=DTYPE)

    def per_sample(module):
        params = {k: v.detach() for k, v in module.named_parameters()}

        def loss(p, xi, ti):
            return ((torch.func.functional_call(module, p, (xi,)) - ti) ** 2).sum()

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)

    ours, theirs = per_sample(layer), per_sample(ref)
    for key in ("weight", "bias"):
        assert ours[key].shape == (4, 8)
        torch.testing.assert_close(ours[key], theirs[key], **TOL)


def _batched_grad_cases(device):
    """(name, llmfast loss, torch loss, inputs): the fused ops whose backward scales a saved
    gradient in place (cross-entropy, its inplace_backward form, linear CE in each reduction),
    and the norm and attention kernels."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 11, generator=g, dtype=DTYPE).to(device)
    h = torch.randn(6, 8, generator=g, dtype=DTYPE).to(device)
    proj = torch.randn(11, 8, generator=g, dtype=DTYPE).to(device)
    bias = torch.randn(11, generator=g, dtype=DTYPE).to(device)
    target = torch.randint(0, 11, (6,), generator=g).to(device)
    target[2] = -100
    q = torch.randn(1, 2, 5, 8, generator=g, dtype=DTYPE).to(device)
    w = torch.randn(11, generator=g, dtype=DTYPE).to(device)
    cases = []
    for red in ("mean", "sum", "none"):
        cases += [
            (f"cross_entropy-{red}", lambda x, red=red: LF.cross_entropy(x, target, reduction=red, label_smoothing=0.1),
             lambda x, red=red: F.cross_entropy(x, target, reduction=red, label_smoothing=0.1), (x,)),
            (f"cross_entropy-inplace-{red}",
             lambda x, red=red: LF.cross_entropy(x * 1.0, target, reduction=red, inplace_backward=True),
             lambda x, red=red: F.cross_entropy(x, target, reduction=red), (x,)),
            (f"linear_cross_entropy-{red}",
             lambda h, p, b, red=red: LF.linear_cross_entropy(h, p, target, b, reduction=red, chunk_size=4),
             lambda h, p, b, red=red: F.cross_entropy(F.linear(h, p, b), target, reduction=red), (h, proj, bias)),
        ]
    cases += [
        ("layer_norm", lambda x: LF.layer_norm(x, (11,), w), lambda x: F.layer_norm(x, (11,), w), (x,)),
        ("attention", lambda q: LF.scaled_dot_product_attention(q, q, q, is_causal=True),
         lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True), (q,)),
    ]
    return cases


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_batched_gradients_through_the_kernels(device, backend):
    """torch.autograd.grad(..., is_grads_batched=True) (what jacobian(vectorize=True) runs) over
    a forward that ran the kernels: the backward sees batched upstream gradients, which the
    in-place scaling of a saved gradient cannot take; llmfast scales out of place then."""
    for name, ours, theirs, inputs in _batched_grad_cases(device):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with llmfast.use_backend(backend):
            out = ours(*leaves)
        ref_leaves = [t.clone().requires_grad_() for t in inputs]
        ref = theirs(*ref_leaves)
        grad_outputs = torch.randn(3, *ref.shape, device=device, dtype=DTYPE)
        got = torch.autograd.grad(out, leaves, grad_outputs, is_grads_batched=True)
        want = torch.autograd.grad(ref, ref_leaves, grad_outputs, is_grads_batched=True)
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{name} input {i}: {m}")
    x = torch.randn(4, 5, device=device, dtype=DTYPE)
    t = torch.tensor([0, 3, 1, 4], device=device)
    with llmfast.use_backend(backend):
        jac = torch.autograd.functional.jacobian(lambda z: LF.cross_entropy(z, t, reduction="none"), x,
                                                 vectorize=True)
    want = torch.autograd.functional.jacobian(lambda z: F.cross_entropy(z, t, reduction="none"), x, vectorize=True)
    torch.testing.assert_close(jac, want, **TOL)


def test_kernels_still_run_outside_transforms(monkeypatch):
    """The transform check must not send ordinary calls to the reference path."""
    from llmfast import _backend

    if "cpu" not in llmfast.available_backends():
        pytest.skip("llmfast._C is not built")
    assert _backend.resolve("norm", torch.device("cpu"), torch.float32) == "cpu"
    seen = []
    monkeypatch.setattr(_backend.torch._C, "_are_functorch_transforms_active", lambda: seen.append(1) or True)
    assert _backend.resolve("norm", torch.device("cpu"), torch.float32) == "reference"
    assert seen


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_of_layers():
    """torch.jit.trace records the ops' torch.library entries (the same graph with and without
    grad, so the tracer's own check passes), and the traced module is differentiable."""
    torch.manual_seed(0)
    layer = llmfast.nn.LayerNorm(8)
    x = torch.randn(3, 8, requires_grad=True)
    traced = torch.jit.trace(layer, x)
    y = traced(x)
    torch.testing.assert_close(y, F.layer_norm(x, (8,), layer.weight, layer.bias), **TOL)
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    q = torch.randn(1, 2, 5, 8)
    attention = torch.jit.trace(lambda q: LF.scaled_dot_product_attention(q, q, q, is_causal=True), q)
    torch.testing.assert_close(attention(q), F.scaled_dot_product_attention(q, q, q, is_causal=True), **TOL)
