"""torch.func transforms (grad, vmap, jacrev, per-sample gradients) over llmfast's functional API
give what they give over the torch functions it mirrors: under a transform every op takes the
reference path (llmfast._backend.resolve), whose plain torch ops support them."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, vmap

import llmfast
import llmfast.functional as LF
from conftest import DEVICES

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
