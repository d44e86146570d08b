"""LayerNorm, RMSNorm and residual-add + LayerNorm, with weight and bias, over the last dim.

Shapes and byte counts from PERF.md. Peers: torch eager, torch.compile of it (added for every
op by spec.providers_for) and Liger-Kernel's autograd Functions.
"""
import torch
import torch.nn.functional as F

import llmfast.functional as LF
import llmfast.reference as R

from .. import peers
from ..spec import Case, OpSpec, register

LN_EPS = 1e-5
RMS_EPS = 1e-6

_NORM_SHAPES_CUDA = [(16384, 4096), (8192, 8192), (4096, 16384), (2048, 65536)]
_CPU_SHAPES = [(1024, 1024), (256, 4096)]


# --- bytes --------------------------------------------------------------------------------------
# One pass = M*N*elt bytes; weights, bias and per-row statistics are ignored (PERF.md).
def _norm_bytes(shape, elt, mode):
    M, N = shape
    # fwd: read x, write y = 2 passes; bwd: read x, read dy, write dx = 3;
    # fwd+bwd: read x, write y, read x, read dy, write dx = 5
    return {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * M * N * elt


def _add_norm_bytes(shape, elt, mode):
    M, N = shape
    # fwd: read x, read r, write y, write s = x + r = 4 passes; bwd: read s, read dy, read ds,
    # write dx (= dr, one tensor) = 4; fwd+bwd = 8
    return {"fwd": 4, "bwd": 4, "fwd+bwd": 8}[mode] * M * N * elt


# --- inputs -------------------------------------------------------------------------------------
def _rand(shape, dtype, device, scale=1.0, shift=0.0, requires_grad=True):
    t = torch.randn(shape, dtype=torch.float32, device=device).mul_(scale).add_(shift).to(dtype)
    return t.requires_grad_(requires_grad)


def _norm_case(shape, dtype, device, *, bias=True):
    M, N = shape
    args = {
        "x": _rand((M, N), dtype, device),
        "weight": _rand((N,), dtype, device, scale=0.1, shift=1.0),
    }
    if bias:
        args["bias"] = _rand((N,), dtype, device, scale=0.1)
    grad_outputs = (_rand((M, N), dtype, device, requires_grad=False),)
    return Case(args, tuple(args), grad_outputs)


def _ln_case(shape, dtype, device):
    return _norm_case(shape, dtype, device, bias=True)


def _rms_case(shape, dtype, device):
    return _norm_case(shape, dtype, device, bias=False)


def _add_ln_case(shape, dtype, device):
    M, N = shape
    args = {
        "x": _rand((M, N), dtype, device),
        "residual": _rand((M, N), dtype, device),
        "weight": _rand((N,), dtype, device, scale=0.1, shift=1.0),
        "bias": _rand((N,), dtype, device, scale=0.1),
    }
    # gradients of both outputs: y = LN(x + r) feeds the next layer, s = x + r the residual stream
    grad_outputs = tuple(_rand((M, N), dtype, device, requires_grad=False) for _ in range(2))
    return Case(args, tuple(args), grad_outputs)


def _n(a):
    return (a["x"].shape[-1],)


# --- LayerNorm ----------------------------------------------------------------------------------
def _ln_eager(a):
    return (F.layer_norm(a["x"], _n(a), a["weight"], a["bias"], LN_EPS),)


def _ln_llmfast(a):
    return (LF.layer_norm(a["x"], _n(a), a["weight"], a["bias"], LN_EPS),)


def _ln_reference(a):
    return (R.layer_norm(a["x"], _n(a), a["weight"], a["bias"], LN_EPS),)


def _liger_ln(device):
    fn = peers.liger_function("LigerLayerNormFunction", "layer_norm", device)
    return lambda a: (fn.apply(a["x"], a["weight"], a["bias"], LN_EPS),)


register(OpSpec(
    name="layer_norm",
    order=10,
    shapes={"cuda": [(16384, 1024)] + _NORM_SHAPES_CUDA, "cpu": _CPU_SHAPES},
    quick_shapes={"cuda": [(16384, 1024), (8192, 8192), (2048, 65536)], "cpu": _CPU_SHAPES[:1]},
    make_case=_ln_case,
    eager=_ln_eager,
    llmfast_fn=_ln_llmfast,
    reference=_ln_reference,
    bytes=_norm_bytes,
    formula="fwd 2*M*N*elt (read x, write y); bwd 3*M*N*elt (read x, dy; write dx); fwd+bwd 5*M*N*elt",
    peers={"liger": _liger_ln},
))


# --- RMSNorm ------------------------------------------------------------------------------------
def _rms_eager(a):
    return (F.rms_norm(a["x"], _n(a), a["weight"], RMS_EPS),)


def _rms_llmfast(a):
    return (LF.rms_norm(a["x"], _n(a), a["weight"], RMS_EPS),)


def _rms_reference(a):
    return (R.rms_norm(a["x"], _n(a), a["weight"], RMS_EPS),)


def _liger_rms(device):
    fn = peers.liger_function("LigerRMSNormFunction", "rms_norm", device)
    # offset 0, Llama casting (Liger's default); in_place=False keeps dy intact, so every
    # provider sees the same incoming gradient on every timed call.
    return lambda a: (fn.apply(a["x"], a["weight"], RMS_EPS, 0.0, "llama", False),)


register(OpSpec(
    name="rms_norm",
    order=20,
    shapes={"cuda": _NORM_SHAPES_CUDA, "cpu": _CPU_SHAPES},
    quick_shapes={"cuda": [(8192, 8192), (2048, 65536)], "cpu": _CPU_SHAPES[:1]},
    make_case=_rms_case,
    eager=_rms_eager,
    llmfast_fn=_rms_llmfast,
    reference=_rms_reference,
    bytes=_norm_bytes,
    formula="as LayerNorm: fwd 2*M*N*elt; bwd 3*M*N*elt; fwd+bwd 5*M*N*elt (weight only, no bias)",
    peers={"liger": _liger_rms},
    peer_notes={"liger": "LigerRMSNormFunction, casting_mode='llama', in_place=False"},
))


# --- residual add + LayerNorm -------------------------------------------------------------------
def _add_ln_eager(a):
    s = a["x"] + a["residual"]
    return F.layer_norm(s, _n(a), a["weight"], a["bias"], LN_EPS), s


def _add_ln_llmfast(a):
    return LF.add_layer_norm(a["x"], a["residual"], _n(a), a["weight"], a["bias"], LN_EPS)


def _add_ln_reference(a):
    return R.add_layer_norm(a["x"], a["residual"], _n(a), a["weight"], a["bias"], LN_EPS)


def _liger_add_ln(device):
    fn = peers.liger_function("LigerLayerNormFunction", "layer_norm", device)

    def forward(a):
        s = a["x"] + a["residual"]
        return fn.apply(s, a["weight"], a["bias"], LN_EPS), s
    return forward


register(OpSpec(
    name="add_layer_norm",
    order=30,
    shapes={"cuda": _NORM_SHAPES_CUDA, "cpu": _CPU_SHAPES},
    quick_shapes={"cuda": [(8192, 8192), (2048, 65536)], "cpu": _CPU_SHAPES[:1]},
    make_case=_add_ln_case,
    eager=_add_ln_eager,
    llmfast_fn=_add_ln_llmfast,
    reference=_add_ln_reference,
    bytes=_add_norm_bytes,
    formula="fwd 4*M*N*elt (read x, r; write y, s); bwd 4*M*N*elt (read s, dy, ds; write dx); fwd+bwd 8*M*N*elt",
    peers={"liger": _liger_add_ln},
    peer_notes={"liger": "unfused: x + r in torch, then LigerLayerNormFunction (Liger has no add+LayerNorm)"},
))
