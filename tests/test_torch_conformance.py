"""Corners of torch's contracts that torch's own test material (OpInfo / ModuleInfo samples, the
legacy loss arguments, forward-mode AD) exercises: llmfast must give what torch gives, on every
backend. Found by pointing torch's samples at llmfast's API."""
import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import llmfast
import llmfast.functional as LF
from conftest import device_backend_params


def _rand(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rms_norm_default_eps_is_torchs(device, backend, dtype):
    """eps=None is the epsilon of the computation dtype (float32 for 16-bit inputs), not of the
    input's dtype: rows with a small mean square tell the two apart."""
    x = (_rand(4, 64, device=device) * 0.02).to(dtype).requires_grad_()
    with llmfast.use_backend(backend):
        ours = LF.rms_norm(x, (64,))
        layer = llmfast.nn.RMSNorm(64, device=device, dtype=dtype)
        ours_layer = layer(x)
    theirs = F.rms_norm(x.detach().double(), (64,), eps=torch.finfo(torch.float32).eps if dtype != torch.float64
                        else None).to(dtype)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours, theirs, **tol)
    torch.testing.assert_close(ours_layer, theirs, **tol)
    torch.testing.assert_close(ours, F.rms_norm(x, (64,)), **tol)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_norm_arguments_torch_accepts(device, backend):
    x = _rand(3, 5, device=device) * 4
    with llmfast.use_backend(backend):
        # a negative eps (torch's OpInfo samples use -0.5): the caller's business, not an error
        torch.testing.assert_close(LF.layer_norm(x, (5,), eps=-1e-3), F.layer_norm(x, (5,), eps=-1e-3))
        torch.testing.assert_close(LF.rms_norm(x, (5,), eps=-1e-3), F.rms_norm(x, (5,), eps=-1e-3))
        # an empty normalized dimension
        for shape, ns in (((3, 0), (0,)), ((2, 3, 0), (3, 0)), ((0,), (0,))):
            e = torch.empty(shape, device=device)
            assert LF.layer_norm(e, ns).shape == F.layer_norm(e, ns).shape
            assert LF.rms_norm(e, ns).shape == F.rms_norm(e, ns).shape
        # rms_norm with a weight of another floating dtype: torch's result, in the input's dtype
        for xd, wd in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float64), (torch.bfloat16, torch.float16)):
            xs, w = x.to(xd).requires_grad_(), _rand(5, seed=1, device=device).to(wd).requires_grad_()
            ours = LF.rms_norm(xs, (5,), w, 1e-6)
            theirs = F.rms_norm(xs, (5,), w, 1e-6)
            assert ours.dtype == theirs.dtype
            torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=2e-2)
            g = torch.randn_like(theirs)
            torch.testing.assert_close(torch.autograd.grad(ours, (xs, w), g), torch.autograd.grad(theirs, (xs, w), g),
                                       atol=5e-2, rtol=5e-2)
        # complex input (torch's formula: x * rsqrt(mean(x^2) + eps))
        c = torch.randn(3, 4, dtype=torch.complex64, device=device)
        torch.testing.assert_close(LF.rms_norm(c, (4,)), F.rms_norm(c, (4,)))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_forward_mode_ad_keeps_the_tangent(device, backend):
    """Dual tensors take the reference path: the kernels' autograd Functions would drop the
    tangent silently."""
    x, tx = _rand(4, 6, device=device), _rand(4, 6, device=device, seed=1)
    q, tq = _rand(1, 2, 5, 8, device=device), _rand(1, 2, 5, 8, device=device, seed=2)
    target = torch.tensor([1, 0, 5, 2], device=device)
    cases = [
        (lambda t: LF.layer_norm(t, (6,)), lambda t: F.layer_norm(t, (6,)), x, tx),
        (lambda t: LF.rms_norm(t, (6,)), lambda t: F.rms_norm(t, (6,)), x, tx),
        (lambda t: LF.cross_entropy(t, target), lambda t: F.cross_entropy(t, target), x, tx),
        (lambda t: LF.scaled_dot_product_attention(t, t, t, is_causal=True),
         lambda t: F.scaled_dot_product_attention(t, t, t, is_causal=True), q, tq),
    ]
    for ours, theirs, primal, tangent in cases:
        with fwAD.dual_level():
            with llmfast.use_backend(backend):
                out = fwAD.unpack_dual(ours(fwAD.make_dual(primal, tangent)))
            with sdpa_kernel(SDPBackend.MATH):  # torch's CPU flash kernel has no forward AD
                expected = fwAD.unpack_dual(theirs(fwAD.make_dual(primal, tangent)))
        assert out.tangent is not None
        torch.testing.assert_close(out.primal, expected.primal, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.tangent, expected.tangent, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_cross_entropy_positional_signature_is_torchs(device, backend):
    """(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing),
    the legacy size_average / reduce overriding reduction as in torch; numpy integers pass."""
    x = _rand(6, 5, device=device).requires_grad_()
    t = torch.tensor([0, 1, 2, 3, 4, 1], device=device)
    w = torch.rand(5, generator=torch.Generator().manual_seed(3)).to(device)
    calls = [
        ((None, None, 1), {}),
        ((w, None, 2, None, "sum", 0.1), {}),
        ((), dict(reduce=False)),
        ((), dict(size_average=False)),
        ((None, None, np.int64(1)), {}),
    ]
    with llmfast.use_backend(backend):
        for args, kw in calls:
            with pytest.warns(UserWarning) if kw else _no_warning():
                ours = LF.cross_entropy(x, t, *args, **kw)
            with pytest.warns(UserWarning) if kw else _no_warning():
                theirs = F.cross_entropy(x, t, *args, **kw)
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=lambda m: f"{args} {kw}: {m}")


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_cross_entropy_probability_targets_promote_like_torch(device, backend):
    x = _rand(3, 4, device=device, dtype=torch.bfloat16)
    p = torch.softmax(_rand(3, 4, device=device, seed=1), -1)
    with llmfast.use_backend(backend):
        ours = LF.cross_entropy(x, p)
    theirs = F.cross_entropy(x, p)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=1e-2)


def _assert_close_on_seen_rows(ours, theirs, keep, inputs, what):
    """Outputs and input gradients of llmfast's attention and torch's math path with the boolean
    mask `keep` (Sq, Sk), compared on the rows that see a key: llmfast gives zeros to the others
    (documented), torch's math path NaN or zeros."""
    seen = keep.any(-1)[:, None]
    torch.testing.assert_close(ours * seen, theirs.nan_to_num() * seen, atol=1e-5, rtol=1e-4,
                               msg=lambda m: f"{what}: {m}")
    g = torch.randn_like(theirs) * seen
    for a, b in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(theirs, inputs, g)):
        torch.testing.assert_close(a, b.nan_to_num(), atol=1e-4, rtol=1e-3, msg=lambda m: f"{what} grad: {m}")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_attention_causal_bias_masks(device, backend):
    """torch.nn.attention.bias.CausalBias (upper-left is is_causal, lower-right is aligned to the
    bottom-right corner): what torch computes, values and gradients."""
    for sq, sk in ((3, 7), (7, 3), (5, 5)):
        for make in (causal_lower_right, causal_upper_left):
            q, k, v = (_rand(2, 2, s, 8, device=device, seed=i).requires_grad_() for i, s in enumerate((sq, sk, sk)))
            bias = make(sq, sk)
            with llmfast.use_backend(backend):
                ours = LF.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            with sdpa_kernel(SDPBackend.MATH):
                theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=bias._materialize(device))
            _assert_close_on_seen_rows(ours, theirs, bias._materialize(device), (q, k, v),
                                       f"{make.__name__}({sq}, {sk})")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_attention_window_follows_a_lower_right_causal_bias(device, backend):
    """window_size with causal_lower_right(Sq, Sk) is aligned to that diagonal, as
    FlashAttention's window with Sq != Sk: query i sees keys i + Sk - Sq - left .. i + Sk - Sq
    (one decoded query sees the last left + 1 keys of its cache); both the kernels' band form
    (left >= Sk - Sq) and the mask form, values and gradients against torch on the dense mask."""
    for sq, sk in ((1, 20), (4, 20), (9, 9), (7, 4)):
        for left in (0, 3, 12):
            q, k, v = (_rand(1, 2, s, 8, device=device, seed=i).requires_grad_() for i, s in enumerate((sq, sk, sk)))
            i = torch.arange(sq, device=device)[:, None]
            j = torch.arange(sk, device=device)[None, :]
            keep = (j <= i + sk - sq) & (j >= i + sk - sq - left)
            with llmfast.use_backend(backend):
                ours = LF.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(sq, sk),
                                                       window_size=(left, 0))
            with sdpa_kernel(SDPBackend.MATH):
                theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            _assert_close_on_seen_rows(ours, theirs, keep, (q, k, v), f"({sq}, {sk}) left={left}")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_attention_finite_mask_minimum_is_not_a_full_mask(device, backend):
    """A row masked only with finfo(float32).min (Hugging Face's padding value) averages its
    keys, as torch's math path does (on the CPU; torch's CUDA kernels zero such a row, so the
    comparison is with torch on the CPU); -inf still masks."""
    mask = torch.zeros(2, 3, device=device)
    mask[0] = torch.finfo(torch.float32).min
    mask[1, 0] = float("-inf")
    q, k, v = (_rand(1, 1, s, 8, device=device, seed=i) for i, s in enumerate((2, 3, 3)))
    with llmfast.use_backend(backend):
        ours = LF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    theirs = F.scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu(), attn_mask=mask.cpu())
    torch.testing.assert_close(ours.cpu(), theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours[0, 0, 0], v[0, 0].mean(0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_attention_arguments_torch_accepts(device, backend):
    q, k, v = (_rand(1, 2, s, 8, device=device, seed=i) for i, s in enumerate((3, 4, 4)))
    empty_qk = (_rand(1, 2, 3, 0, device=device), _rand(1, 2, 4, 0, device=device))
    with llmfast.use_backend(backend):
        # a one-element tensor scale
        torch.testing.assert_close(LF.scaled_dot_product_attention(q, k, v, scale=torch.tensor(0.5)),
                                   F.scaled_dot_product_attention(q, k, v, scale=0.5), atol=1e-5, rtol=1e-4)
        # head dim 0: every score is 0, the output is the mean of the values
        out = LF.scaled_dot_product_attention(*empty_qk, v)
        torch.testing.assert_close(out, v.mean(-2, keepdim=True).expand(1, 2, 3, 8), atol=1e-6, rtol=1e-5)
        # value head dim 0: an empty output
        assert LF.scaled_dot_product_attention(q, k, v[..., :0]).shape == (1, 2, 3, 0)
        # enable_gqa with key and value of different head counts: each repeated to the query's
        q6, k3, v2 = (_rand(2, h, s, 8, device=device, seed=h) for h, s in ((6, 5), (3, 7), (2, 7)))
        torch.testing.assert_close(LF.scaled_dot_product_attention(q6, k3, v2, enable_gqa=True),
                                   F.scaled_dot_product_attention(q6, k3, v2, enable_gqa=True), atol=1e-5, rtol=1e-4)


def test_attention_inputs_torch_refuses_or_llmfast_cannot_take():
    layer = llmfast.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    for kw in (dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.uint8)),
               dict(attn_mask=torch.zeros(5, 5, dtype=torch.int64))):
        with pytest.raises(TypeError, match="must be a bool or floating tensor"):
            layer(x, x, x, need_weights=False, **kw)
    nested = torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 5, 8)], layout=torch.jagged)
    with pytest.raises(TypeError, match="nested tensor"):
        LF.scaled_dot_product_attention(nested, nested, nested)
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="CausalBias"):
        LF.scaled_dot_product_attention(q, q, q, attn_mask=causal_upper_left(3, 3), is_causal=True)
    with pytest.raises(ValueError, match="CausalBias"):
        LF.scaled_dot_product_attention(q, q, q, attn_mask=causal_upper_left(3, 4))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_cross_entropy_infinite_logit_gives_torchs_nan(device, backend):
    x = torch.tensor([[float("inf"), 0.0, 1.0], [0.0, 1.0, 2.0]], device=device)
    t = torch.tensor([1, 2], device=device)
    with llmfast.use_backend(backend):
        ours = LF.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(ours, F.cross_entropy(x, t, reduction="none"), equal_nan=True)
    assert ours[0].isnan()


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_linear_cross_entropy_takes_torchs_signature(device, backend):
    """torch >= 2.14's F.linear_cross_entropy(input, linear_weight, target, *, linear_bias, weight
    (class weights), reduction, ignore_index (None = -100), label_smoothing, options): values and
    gradients of F.cross_entropy(F.linear(...)) on every backend (the fused path with class
    weights), class-probability targets and a K-dimensional projection (unfused), and llmfast's
    own keyword form (weight= the projection when linear_weight is absent)."""
    torch.manual_seed(31)
    N, D, V = 11, 6, 13
    x = torch.randn(N, D, device=device)
    W = torch.randn(V, D, device=device)
    b = torch.randn(V, device=device)
    cw = torch.rand(V, device=device) + 0.2
    t = torch.randint(0, V, (N,), device=device)
    t[4] = -100
    for reduction in ("mean", "sum", "none"):
        for smoothing in (0.0, 0.2):
            xs, Ws, bs = (a.clone().requires_grad_() for a in (x, W, b))
            xr, Wr, br = (a.clone().requires_grad_() for a in (x, W, b))
            with llmfast.use_backend(backend):
                ours = LF.linear_cross_entropy(xs, Ws, t, linear_bias=bs, weight=cw, reduction=reduction,
                                               ignore_index=None, label_smoothing=smoothing, chunk_size=4)
            ref = F.cross_entropy(F.linear(xr, Wr, br), t, weight=cw, reduction=reduction, label_smoothing=smoothing)
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
            g = torch.randn_like(ref)
            for a, e in zip(torch.autograd.grad(ours, (xs, Ws, bs), g), torch.autograd.grad(ref, (xr, Wr, br), g)):
                torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    probs = torch.softmax(torch.randn(N, V, device=device), -1)
    Wk, bk, tk = torch.randn(V, 3, D, device=device), torch.randn(V, 3, device=device), torch.randint(0, V, (N, 3))
    with llmfast.use_backend(backend):
        by_probs = LF.linear_cross_entropy(x, W, probs, weight=cw, label_smoothing=0.1)
        k_dim = LF.linear_cross_entropy(x, Wk, tk.to(device), linear_bias=bk, reduction="none")
        keyword_form = LF.linear_cross_entropy(input=x, weight=W, target=t, bias=b)
        with pytest.raises(TypeError, match="bias and linear_bias"):
            LF.linear_cross_entropy(x, W, t, b, linear_bias=b)
        with pytest.raises(ValueError, match="batched"):  # as torch: K-dim needs (N, D) input
            LF.linear_cross_entropy(x[0], Wk, tk[0].to(device))
    torch.testing.assert_close(by_probs, F.cross_entropy(x @ W.T, probs, weight=cw, label_smoothing=0.1),
                               atol=1e-5, rtol=1e-5)
    logits_k = (x @ Wk.reshape(-1, D).T + bk.reshape(-1)).reshape(N, V, 3)
    torch.testing.assert_close(k_dim, F.cross_entropy(logits_k, tk.to(device), reduction="none"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keyword_form, F.cross_entropy(F.linear(x, W, b), t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_torchs_class", [True, False])
def test_linear_cross_entropy_loss_both_forms(monkeypatch, with_torchs_class):
    """llmfast.nn.LinearCrossEntropyLoss: llmfast's form (options only, the projection at call
    time) and torch >= 2.14's (in_features, num_classes, ...; owns `linear`, torch's state_dict,
    loss_fn(input, target)); built by torch's own constructor where torch has the class, by
    llmfast's otherwise (with_torchs_class=False pretends it is absent)."""
    torch_class = getattr(torch.nn, "LinearCrossEntropyLoss", None)
    if with_torchs_class and torch_class is None:
        pytest.skip("this torch has no torch.nn.LinearCrossEntropyLoss")
    if not with_torchs_class:
        monkeypatch.setattr(llmfast.nn, "_TorchLinearCrossEntropyLoss", None)
    torch.manual_seed(32)
    with pytest.raises(ValueError, match="reduction"):
        llmfast.nn.LinearCrossEntropyLoss(reduction="avg")
    loss_fn = llmfast.nn.LinearCrossEntropyLoss(-1, "sum")
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, -1, 3, 9])
    torch.testing.assert_close(loss_fn(h, w, t), F.cross_entropy(h @ w.T, t, ignore_index=-1, reduction="sum"),
                               atol=1e-4, rtol=1e-4)
    cw = torch.rand(10) + 0.5
    owning = llmfast.nn.LinearCrossEntropyLoss(8, 10, bias=True, weight=cw, label_smoothing=0.1)
    assert sorted(owning.state_dict()) == ["linear.bias", "linear.weight", "weight"]
    if torch_class is not None:
        assert isinstance(owning, torch_class) and isinstance(loss_fn, torch_class)
        theirs = torch_class(8, 10, bias=True, weight=cw, label_smoothing=0.1)
        theirs.load_state_dict(owning.state_dict())
        assert sorted(theirs.state_dict()) == sorted(owning.state_dict())
    expected = F.cross_entropy(owning.linear(h), t.clamp(min=0), weight=cw, label_smoothing=0.1)
    torch.testing.assert_close(owning(h, t.clamp(min=0)), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(owning(h, target=t.clamp(min=0)), expected, atol=1e-5, rtol=1e-5)
    k_dim = llmfast.nn.LinearCrossEntropyLoss(8, 5, out_features=(3,))
    tk = torch.randint(0, 5, (4, 3))
    torch.testing.assert_close(k_dim(h, tk), F.cross_entropy(k_dim.linear(h).reshape(4, 5, 3), tk), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_modules_script_with_torch_jit():
    """torch.jit.script of a model holding llmfast's modules works, as with torch's (the scripted
    forward runs torch's implementation) and gives torch's results."""
    torch.manual_seed(30)
    cases = [
        (llmfast.nn.LayerNorm(8), torch.nn.LayerNorm(8), (_rand(3, 8),)),
        (llmfast.nn.RMSNorm(8), torch.nn.RMSNorm(8), (_rand(3, 8),)),
        (llmfast.nn.CrossEntropyLoss(label_smoothing=0.1), torch.nn.CrossEntropyLoss(label_smoothing=0.1),
         (_rand(4, 5), torch.tensor([0, 4, -100, 2]))),
    ]
    for batch_first in (False, True):
        x = _rand(5, 3, 8)
        cases.append((llmfast.nn.MultiheadAttention(8, 2, batch_first=batch_first),
                      torch.nn.MultiheadAttention(8, 2, batch_first=batch_first), (x, x, x)))
    for ours, theirs, inputs in cases:
        ours.load_state_dict(theirs.state_dict())
        scripted = torch.jit.script(torch.nn.Sequential(ours) if len(inputs) == 1 else ours)
        got, want = scripted(*inputs), theirs(*inputs)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b)
        if isinstance(ours, torch.nn.MultiheadAttention):
            torch.testing.assert_close(scripted(*inputs, need_weights=False)[0], ours(*inputs, need_weights=False)[0])
    block = llmfast.nn.CausalSelfAttention(8, 2, num_kv_heads=1).eval()
    x = _rand(2, 5, 8)
    torch.testing.assert_close(torch.jit.script(block)(x), block(x))


def test_per_sample_gradients_and_fake_and_meta_tensors():
    """torch.func.vmap over cross_entropy (per-sample gradients), FakeTensorMode with float64
    (the reference path) and 'meta' tensors give torch's shapes: the reference's host-side range
    check and the autocast query must not touch values or devices that have none."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import grad, vmap
    x, t = _rand(4, 3, 5), torch.randint(0, 5, (4, 3))
    torch.testing.assert_close(vmap(grad(LF.cross_entropy))(x, t), vmap(grad(F.cross_entropy))(x, t))
    torch.testing.assert_close(vmap(LF.cross_entropy)(x, t), vmap(F.cross_entropy)(x, t))
    with FakeTensorMode():
        assert LF.cross_entropy(torch.randn(3, 5, dtype=torch.float64), torch.tensor([1, 4, 0])).shape == ()
    xm, tm = torch.randn(3, 5, device="meta"), torch.zeros(3, dtype=torch.long, device="meta")
    assert LF.cross_entropy(xm, tm).shape == F.cross_entropy(xm, tm).shape
    assert LF.linear_cross_entropy(torch.randn(3, 4, device="meta"), torch.randn(5, 4, device="meta"), tm).shape == ()
    q = torch.randn(1, 2, 3, 4, device="meta")
    assert LF.scaled_dot_product_attention(q, q, q).shape == q.shape


def test_linear_cross_entropy_under_inference_mode():
    """Inference tensors (no version counter) as targets, e.g. a validation loss in
    torch.inference_mode(): torch's value, no error."""
    x, W = _rand(4, 6), _rand(7, 6, seed=1)
    with torch.inference_mode():
        t = torch.tensor([0, 5, 1, 2])
        torch.testing.assert_close(LF.linear_cross_entropy(x, W, t), F.cross_entropy(x @ W.T, t))


def test_norms_export_with_dynamic_dims():
    """torch.export (non-strict) of llmfast's norm modules with dynamic batch and sequence dims,
    as torch's: the empty-input test must not specialize the symbolic sizes."""
    b, s = torch.export.Dim("b", min=2, max=64), torch.export.Dim("s", min=2, max=64)
    for module in (llmfast.nn.LayerNorm(16), llmfast.nn.RMSNorm(16)):
        ep = torch.export.export(module, (_rand(2, 5, 16),), dynamic_shapes=({0: b, 1: s},))
        x = _rand(3, 7, 16, seed=2)
        torch.testing.assert_close(ep.module()(x), module(x))
