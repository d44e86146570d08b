"""llmfast's functional API: the signatures of torch.nn.functional, llmfast's kernels inside.

    import llmfast.functional as LF
    y = LF.layer_norm(x, (768,), weight, bias)            # as torch.nn.functional.layer_norm
    y, s = LF.add_layer_norm(x, residual, (768,), w, b)   # norm(x + residual), x + residual

The backend is chosen per call (see llmfast.use_backend); every backend computes what
llmfast.reference computes.
"""
import math

import torch

from . import _checks
from . import ops as _ops  # noqa: F401  (registers the custom ops)
from . import reference as _reference
from ._backend import resolve
from ._errors import LlmfastTypeError, LlmfastValueError

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]


# --- normalization ------------------------------------------------------------------------------
def _check_param(fn, name, param, normalized_shape, input):
    if param is None:
        return
    _checks.floating(fn, name, param)
    if tuple(param.shape) != normalized_shape:
        raise LlmfastValueError(
            f"{fn}: {name} must have shape {normalized_shape} (normalized_shape), got {tuple(param.shape)}"
        )
    _checks.same_device(fn, name, param, "input", input)
    if param.dtype != input.dtype and param.dtype != torch.float32:
        raise LlmfastTypeError(
            f"{fn}: {name} must have input's dtype ({input.dtype}) or float32, got {param.dtype}"
        )


def _norm(fn, input, residual, normalized_shape, weight, bias, eps, rms):
    """Validates the arguments, then runs the chosen backend. Returns (out, input + residual)."""
    _checks.floating(fn, "input", input)
    normalized_shape = _checks.shape_tuple(fn, "normalized_shape", normalized_shape)
    k = len(normalized_shape)
    if k == 0 or tuple(input.shape[input.dim() - k:]) != normalized_shape or input.dim() < k:
        raise LlmfastValueError(
            f"{fn}: normalized_shape {normalized_shape} must equal the last {k} dimension(s) of input, "
            f"whose shape is {tuple(input.shape)}"
        )
    if residual is not None:
        _checks.tensor(fn, "residual", residual)
        if residual.shape != input.shape:
            raise LlmfastValueError(f"{fn}: residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != input.dtype:
            raise LlmfastTypeError(f"{fn}: residual must have input's dtype {input.dtype}, got {residual.dtype}")
        _checks.same_device(fn, "residual", residual, "input", input)
    _check_param(fn, "weight", weight, normalized_shape, input)
    _check_param(fn, "bias", bias, normalized_shape, input)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise LlmfastTypeError(f"{fn}: bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise LlmfastValueError(f"{fn}: eps must be a non-negative number, got {eps!r}")
    eps = float(eps)

    backend = resolve("norm", input.device, input.dtype)
    if backend == "reference":
        if rms:
            return _reference.add_rms_norm(input, residual, normalized_shape, weight, eps, bias) if residual is not None \
                else (_reference.rms_norm(input, normalized_shape, weight, eps, bias), None)
        return _reference.add_layer_norm(input, residual, normalized_shape, weight, bias, eps) if residual is not None \
            else (_reference.layer_norm(input, normalized_shape, weight, bias, eps), None)

    n = math.prod(normalized_shape)
    x2d = input.reshape(-1, n).contiguous()
    r2d = residual.reshape(-1, n).contiguous() if residual is not None else None
    w1d = weight.reshape(n).contiguous() if weight is not None else None
    b1d = bias.reshape(n).contiguous() if bias is not None else None
    op = torch.ops.llmfast.triton_norm_fwd if backend == "triton" else torch.ops.llmfast.norm_fwd
    out, residual_out, _, _ = op(x2d, r2d, w1d, b1d, eps, rms)
    out = out.view(input.shape)
    return out, (residual_out.view(input.shape) if residual is not None else None)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """As torch.nn.functional.layer_norm: normalize over the trailing `normalized_shape` dims."""
    return _norm("layer_norm", input, None, normalized_shape, weight, bias, eps, rms=False)[0]


def rms_norm(input, normalized_shape, weight=None, eps=None, *, bias=None):
    """As torch.nn.functional.rms_norm (eps=None means torch.finfo(input.dtype).eps).
    Keyword-only `bias` is an extension: added after scaling, as some models use."""
    return _norm("rms_norm", input, None, normalized_shape, weight, bias, eps, rms=True)[0]


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Pre-norm block step in one pass: returns (layer_norm(input + residual), input + residual)."""
    return _norm("add_layer_norm", input, residual, normalized_shape, weight, bias, eps, rms=False)


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, *, bias=None):
    """Pre-norm block step in one pass: returns (rms_norm(input + residual), input + residual)."""
    return _norm("add_rms_norm", input, residual, normalized_shape, weight, bias, eps, rms=True)
