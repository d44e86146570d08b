"""Reference LayerNorm / RMSNorm and their residual-add variants, in plain PyTorch.

Statistics are computed in float32 (float64 for float64 inputs) and the result is cast back to
the input's dtype, which is what every backend must match. The residual-add variants return
`(norm(input + residual), input + residual)`; the sum is rounded to the input's dtype before it
is normalized, exactly as the kernels do.
"""
import torch


def _acc_dtype(dtype):
    if dtype.is_complex:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_rms_eps(dtype):
    """rms_norm's eps when None is given, as torch: the machine epsilon of the computation dtype
    (float32 for float16 and bfloat16 inputs; the real dtype's for complex inputs)."""
    acc = _acc_dtype(dtype)
    return torch.finfo(acc.to_real() if acc.is_complex else acc).eps  # (dynamo cannot trace to_real)


def _dims(normalized_shape):
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    return tuple(range(-len(normalized_shape), 0))


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    acc = _acc_dtype(input.dtype)
    x = input.to(acc)
    dims = _dims(normalized_shape)
    # The mean of x - x[first], plus x[first]: exact for a constant row (torch's Welford mean is
    # too), so such a row normalizes to exactly 0 even with a tiny eps (BERT's 1e-12).
    shift = x[(Ellipsis,) + (slice(0, 1),) * len(dims)]
    mean = shift + (x - shift).mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(input.dtype)


def rms_norm(input, normalized_shape, weight=None, eps=None, bias=None):
    """torch.nn.functional.rms_norm; `eps=None` means default_rms_eps(input.dtype), as in torch.
    `bias` is an llmfast extension (None in torch's function). Complex inputs follow torch's
    formula (x * rsqrt(mean(x^2) + eps), x^2 not |x|^2)."""
    if eps is None:
        eps = default_rms_eps(input.dtype)
    acc = _acc_dtype(input.dtype)
    x = input.to(acc)
    y = x * torch.rsqrt(x.square().mean(dim=_dims(normalized_shape), keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(input.dtype)


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    s = input + residual
    return layer_norm(s, normalized_shape, weight, bias, eps), s


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, bias=None):
    s = input + residual
    return rms_norm(s, normalized_shape, weight, eps, bias), s
