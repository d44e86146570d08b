"""PyTorch's own test inputs, all of them, pointed at llmfast's API (tests/test_torch_conformance.py
holds the corners of torch's contracts that such inputs turned up, one test each).

torch's test suite describes each function and module by sample inputs (OpInfo's
sample_inputs / error_inputs, ModuleInfo's module_inputs) that its own tests feed to them.
Here the same inputs go to llmfast.functional and llmfast.nn, on every backend that can run on
the device, and the results are compared with torch's on the same inputs:
- functions: outputs, and the gradients of every input that requires grad;
- error inputs: llmfast raises where torch raises, an exception of the type torch's test expects;
- modules: llmfast.nn's subclass built with the same constructor arguments loads the torch
  module's state_dict (same keys) and gives the same outputs and input/parameter gradients.
Samples with dropout_p > 0 are compared in shape and dtype only: llmfast draws other random
numbers than torch (documented in llmfast.functional.scaled_dot_product_attention).
"""
import pytest
import torch

pytest.importorskip("expecttest")  # torch.testing._internal imports it
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

import llmfast  # noqa: E402
import llmfast.functional as LF  # noqa: E402
import llmfast.nn as lnn  # noqa: E402

from conftest import DEVICES, backends_for  # noqa: E402

FUNCTIONS = {
    "nn.functional.layer_norm": LF.layer_norm,
    "nn.functional.rms_norm": LF.rms_norm,
    "nn.functional.cross_entropy": LF.cross_entropy,
    "nn.functional.scaled_dot_product_attention": LF.scaled_dot_product_attention,
}
MODULES = {
    torch.nn.LayerNorm: lnn.LayerNorm,
    torch.nn.RMSNorm: lnn.RMSNorm,
    torch.nn.CrossEntropyLoss: lnn.CrossEntropyLoss,
    torch.nn.MultiheadAttention: lnn.MultiheadAttention,
}
OPINFOS = {op.name: op for op in op_db if op.name in FUNCTIONS}
MODULEINFOS = {mi.module_cls: mi for mi in module_db if mi.module_cls in MODULES}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) of llmfast against torch, both computing in the dtype (fp32 statistics inside);
# gradients get 10x.
TOL = {torch.float64: (1e-9, 1e-7), torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 4e-3),
       torch.bfloat16: (3e-2, 3e-2)}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return _tensors(list(obj.values()))
    return []


def _close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    return (actual.shape == expected.shape and actual.dtype == expected.dtype
            and torch.allclose(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale,
                               equal_nan=True))


def _check_same(ours, theirs, inputs, dtype, what):
    """Outputs of llmfast (ours) and torch (theirs) for the same inputs, then the gradients of
    `inputs` (tensors requiring grad) through the first output."""
    a, b = _tensors(ours), _tensors(theirs)
    assert len(a) == len(b), f"{what}: {len(a)} output tensors, torch gives {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        assert _close(x, y, dtype), (f"{what}: output {i} differs from torch's (shape {tuple(x.shape)} vs "
                                     f"{tuple(y.shape)}, max abs diff "
                                     f"{(x.double() - y.double()).abs().max().item() if x.shape == y.shape else '-'})")
    if not inputs or not b[0].requires_grad:
        return
    assert a[0].requires_grad, f"{what}: output does not require grad, torch's does"
    _check_same_grads(a[0], b[0], inputs, inputs, [f"{i}" for i in range(len(inputs))], dtype, what)


def _check_same_grads(out_ours, out_theirs, leaves_ours, leaves_theirs, labels, dtype, what, missing_as_zero=True):
    """The gradients of out_ours with respect to leaves_ours against those of out_theirs with
    respect to leaves_theirs, one upstream gradient for both. A gradient that one side leaves
    out counts as zeros (missing_as_zero), or must be left out by both."""
    g = torch.randn_like(out_theirs)
    ga = torch.autograd.grad(out_ours, leaves_ours, g, allow_unused=True)
    gb = torch.autograd.grad(out_theirs, leaves_theirs, g, allow_unused=True)
    for label, x, y in zip(labels, ga, gb):
        if not missing_as_zero:
            assert (x is None) == (y is None), f"{what}: gradient of {label}: {x is None} vs torch {y is None}"
        if x is None and y is None:
            continue
        x = torch.zeros_like(y) if x is None else x
        y = torch.zeros_like(x) if y is None else y
        assert _close(x, y, dtype, scale=10.0), (f"{what}: gradient {label} differs from torch's, max abs diff "
                                                 f"{(x.double() - y.double()).abs().max().item()}")


def _skip_unsupported(backend, device, dtype, op_name):
    if (backend == "triton" and device == "cpu" and dtype == torch.bfloat16
            and op_name == "nn.functional.scaled_dot_product_attention"):
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly (the GPU runs cover bf16)")


def _device_backend_dtype_params(names):
    return [pytest.param(name, d, b, dt, id=f"{name.split('.')[-1]}-{d}-{b}-{str(dt)[6:]}")
            for name in names for d in DEVICES for b in backends_for(d) for dt in DTYPES]


@pytest.mark.parametrize("name,device,backend,dtype", _device_backend_dtype_params(sorted(OPINFOS)))
def test_functional_matches_torch_on_its_opinfo_samples(name, device, backend, dtype):
    op, fn = OPINFOS[name], FUNCTIONS[name]
    if dtype not in op.supported_dtypes(device):
        pytest.skip(f"torch's {name} does not support {dtype} on {device}")
    _skip_unsupported(backend, device, dtype, name)
    compared = 0
    for sample in op.sample_inputs(device, dtype, requires_grad=True):
        args, kwargs = (sample.input, *sample.args), dict(sample.kwargs)
        what = f"{name} on {backend}, {dtype}, sample {sample.summary() if hasattr(sample, 'summary') else sample}"
        theirs = op.op(*args, **kwargs)
        with llmfast.use_backend(backend):
            ours = fn(*args, **kwargs)
        if kwargs.get("dropout_p", 0.0) > 0.0:  # other random numbers than torch's
            o, t = _tensors(ours)[0], _tensors(theirs)[0]
            assert o.shape == t.shape and o.dtype == t.dtype, what
            assert torch.isfinite(o).all(), what
            continue
        inputs = list({id(t): t for t in _tensors([args, kwargs]) if t.requires_grad}.values())
        _check_same(ours, theirs, inputs, dtype, what)
        compared += 1
    assert compared > 0, f"no sample of {name} was compared"


@pytest.mark.parametrize("name", sorted(OPINFOS))
def test_functional_raises_on_torch_s_error_inputs(name):
    op, fn = OPINFOS[name], FUNCTIONS[name]
    if op.error_inputs_func is None:
        pytest.skip(f"torch has no error inputs for {name}")
    for error_input in op.error_inputs("cpu"):
        sample = error_input.sample_input
        with pytest.raises(error_input.error_type):  # torch's own behaviour, as its test expects
            op.op(sample.input, *sample.args, **sample.kwargs)
        with pytest.raises(error_input.error_type):
            fn(sample.input, *sample.args, **sample.kwargs)


@pytest.mark.parametrize("cls", list(MODULEINFOS), ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("device", DEVICES)
def test_modules_match_torch_on_its_module_inputs(cls, dtype, device):
    info = MODULEINFOS[cls]
    compared = 0
    for module_input in info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True, training=True):
        if module_input.forward_input is None:
            continue
        ctor, fwd = module_input.constructor_input, module_input.forward_input
        theirs_module = cls(*ctor.args, **ctor.kwargs).to(device=device, dtype=dtype)
        ours_module = MODULES[cls](*ctor.args, **ctor.kwargs).to(device=device, dtype=dtype)
        assert isinstance(ours_module, cls)
        assert list(ours_module.state_dict()) == list(theirs_module.state_dict())
        ours_module.load_state_dict(theirs_module.state_dict())
        what = f"{cls.__name__}({ctor.args}, {ctor.kwargs}) on {device}, {dtype}"
        try:
            theirs = theirs_module(*fwd.args, **fwd.kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever torch raises, llmfast must raise too
            with pytest.raises(type(exc)):
                ours_module(*fwd.args, **fwd.kwargs)
            continue
        ours = ours_module(*fwd.args, **fwd.kwargs)
        if isinstance(theirs, tuple):
            assert [x is None for x in ours] == [x is None for x in theirs], what
        _check_same(ours, theirs, [], dtype, what)
        out_ours, out_theirs = _tensors(ours)[0], _tensors(theirs)[0]
        if out_theirs.requires_grad:
            # The inputs are shared; the parameters are each module's own (equal values): one
            # backward each, over the inputs and that module's parameters.
            inputs = list({id(t): t for t in _tensors([fwd.args, fwd.kwargs]) if t.requires_grad}.values())
            labels = [f"input {i}" for i in range(len(inputs))] + [n for n, _ in theirs_module.named_parameters()]
            _check_same_grads(out_ours, out_theirs, inputs + list(ours_module.parameters()),
                              inputs + list(theirs_module.parameters()), labels, dtype, what, missing_as_zero=False)
        compared += 1
    assert compared > 0, f"no module input of {cls.__name__} was compared"
