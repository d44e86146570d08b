"""llmfast's functional API: the signatures of torch.nn.functional, llmfast's kernels inside.

    import llmfast.functional as LF
    y = LF.layer_norm(x, (768,), weight, bias)            # as torch.nn.functional.layer_norm
    y, s = LF.add_layer_norm(x, residual, (768,), w, b)   # norm(x + residual), x + residual
    loss = LF.cross_entropy(logits, target)               # as torch.nn.functional.cross_entropy
    o = LF.scaled_dot_product_attention(q, k, v, is_causal=True)  # FlashAttention-style

The backend is chosen per call (see llmfast.use_backend); every backend computes what
llmfast.reference computes.
"""
import math
import numbers

import torch
from torch.nn.attention.bias import CausalBias as _CausalBias
from torch.nn.attention.bias import CausalVariant as _CausalVariant

from . import _checks
from . import ops as _ops  # noqa: F401  (registers the custom ops)
from . import reference as _reference
from .reference.cross_entropy import linear_arguments as _linear_arguments
from .parallel import cross_entropy as _parallel_ce
from ._backend import available_backends, current_backend, resolve
from ._errors import BackendUnavailableError, LlmfastTypeError, LlmfastValueError

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "cross_entropy", "linear_cross_entropy",
           "scaled_dot_product_attention"]


def _autocast_enabled(device_type):
    """torch.is_autocast_enabled for device types that have an autocast ('meta' tensors, for
    shape inference, have none: torch raises there)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _autocast_cast(t, dtype):
    """What torch's autocast does to an argument: floating tensors other than float64 go to
    `dtype`; anything else (None, integer or bool tensors, float64) is left alone."""
    eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
    return t.to(dtype) if eligible else t


# --- normalization ------------------------------------------------------------------------------
def _check_param(fn, name, param, normalized_shape, input, rms):
    if not isinstance(param, torch.Tensor):
        _checks.tensor(fn, name, param)
    if param.shape != normalized_shape:
        raise LlmfastValueError(
            f"{fn}: {name} must have shape {tuple(normalized_shape)} (normalized_shape), got {tuple(param.shape)}"
        )
    if rms:  # torch's rms_norm takes a weight of any floating (or, for complex input, complex) dtype
        if not (param.dtype.is_floating_point or (param.dtype.is_complex and input.dtype.is_complex)):
            _checks.floating(fn, name, param)
    elif param.dtype is not input.dtype and param.dtype is not torch.float32:
        _checks.floating(fn, name, param)
        raise LlmfastTypeError(f"{fn}: {name} must have input's dtype ({input.dtype}) or float32, got {param.dtype}")
    if param.device != input.device:
        _checks.same_device(fn, name, param, "input", input)


def _params_fit_kernels(input, weight, bias):
    """The kernels take parameters in the input's dtype or float32 (mixed precision), one dtype
    for both; other combinations that torch accepts take the reference path."""
    w = weight.dtype if weight is not None else None
    b = bias.dtype if bias is not None else w
    w = b if w is None else w
    return w is None or (w is b and (w is input.dtype or w is torch.float32))


# Device types whose torch.autocast runs layer_norm and rms_norm in float32 (torch's "fp32" cast
# policy: aten/src/ATen/autocast_mode.cpp). The CPU's autocast leaves norms alone.
_NORM_FP32_AUTOCAST_DEVICES = frozenset({"cuda", "xpu"})


def _check_residual(fn, input, residual):
    _checks.tensor(fn, "residual", residual)
    if residual.shape != input.shape:
        raise LlmfastValueError(f"{fn}: residual must have input's shape {tuple(input.shape)}, "
                                f"got {tuple(residual.shape)}")
    if residual.dtype != input.dtype:
        raise LlmfastTypeError(f"{fn}: residual must have input's dtype {input.dtype}, got {residual.dtype}")
    _checks.same_device(fn, "residual", residual, "input", input)


def _norm_under_autocast(fn, input, residual, normalized_shape, weight, bias, eps, rms):
    """As torch under an autocast that runs norms in float32 (CUDA's): floating input, weight and
    bias on the autocast device (float64 aside) are cast to float32, so the output is float32.
    The residual sum is what torch's `input + residual` gives (autocast leaves additions alone):
    in the input's dtype; a 16-bit sum is normalized after its cast, unfused."""
    f32 = torch.float32
    weight, bias = _autocast_cast(weight, f32), _autocast_cast(bias, f32)
    with torch.autocast(input.device.type, enabled=False):
        if residual is None or input.dtype not in (torch.float16, torch.bfloat16):
            # the input is not cast, so nothing is rounded between the sum and the norm: fused
            return _norm(fn, _autocast_cast(input, f32), residual, normalized_shape, weight, bias, eps, rms)
        _check_residual(fn, input, residual)
        summed = input + residual
        out, _ = _norm(fn, summed.float(), None, normalized_shape, weight, bias, eps, rms)
    return out, summed


def _norm(fn, input, residual, normalized_shape, weight, bias, eps, rms):
    """Validates the arguments, then runs the chosen backend. Returns (out, input + residual).
    The checks are ordered so the common, valid call pays for few of them (this runs on every
    call of every norm layer)."""
    if (isinstance(input, torch.Tensor) and input.device.type in _NORM_FP32_AUTOCAST_DEVICES
            and _autocast_enabled(input.device.type)):
        return _norm_under_autocast(fn, input, residual, normalized_shape, weight, bias, eps, rms)
    if not isinstance(input, torch.Tensor) or input.dtype not in _checks.FLOATING:
        if not (rms and isinstance(input, torch.Tensor) and input.is_complex()):  # torch's rms_norm takes complex
            _checks.floating(fn, "input", input)
    if type(normalized_shape) is not tuple:
        normalized_shape = _checks.shape_tuple(fn, "normalized_shape", normalized_shape)
    shape = input.shape
    k = len(normalized_shape)
    if k == 0 or len(shape) < k or shape[len(shape) - k:] != normalized_shape:
        raise LlmfastValueError(
            f"{fn}: normalized_shape {normalized_shape} must equal the last {k} dimension(s) of input, "
            f"whose shape is {tuple(shape)}"
        )
    normalized_shape = shape[len(shape) - k:]  # the input's own ints (an equal (8.0,) or (True,) compares equal)
    if residual is not None:
        _check_residual(fn, input, residual)
    if weight is not None:
        _check_param(fn, "weight", weight, normalized_shape, input, rms)
    if bias is not None:
        _check_param(fn, "bias", bias, normalized_shape, input, rms)
        if weight is not None and weight.dtype != bias.dtype and not rms:
            raise LlmfastTypeError(f"{fn}: bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    if eps is None:  # torch's default: the epsilon of the computation dtype (float32 for 16-bit inputs)
        eps = _reference.norm.default_rms_eps(input.dtype)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise LlmfastTypeError(f"{fn}: eps must be a real number, got {eps!r}")
    eps = float(eps)  # any value, as torch (a negative one is the caller's business)

    backend = resolve("norm", input.device, input.dtype)
    if input.numel() == 0 or not _params_fit_kernels(input, weight, bias):
        backend = "reference"  # nothing to normalize, or parameter dtypes the kernels do not take
    if backend == "reference":
        if rms:
            out, summed = _reference.add_rms_norm(input, residual, normalized_shape, weight, eps, bias) \
                if residual is not None else (_reference.rms_norm(input, normalized_shape, weight, eps, bias), None)
        else:
            out, summed = _reference.add_layer_norm(input, residual, normalized_shape, weight, bias, eps) \
                if residual is not None else (_reference.layer_norm(input, normalized_shape, weight, bias, eps), None)
        # the kernels' (and torch's layer_norm's) layout: contiguous, whatever the input's strides
        return out.contiguous(), (summed.contiguous() if summed is not None else None)

    eager_norm = _ops.norm.EAGER_NORM
    if backend != "triton" and eager_norm is not None and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
        # cpu / cuda in eager mode: one op, any leading shape, a C++ autograd node
        # (csrc/norm/norm_autograd.cpp).
        out, residual_out = eager_norm(input, residual, weight, bias, eps, rms, k)
        return out, (residual_out if residual is not None else None)
    n = normalized_shape[0] if k == 1 else math.prod(normalized_shape)
    x2d = input.reshape(-1, n)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    r2d = residual.reshape(-1, n).contiguous() if residual is not None else None
    w1d = weight if weight is None or k == 1 else weight.reshape(n)
    b1d = bias if bias is None or k == 1 else bias.reshape(n)
    if w1d is not None and not w1d.is_contiguous():
        w1d = w1d.contiguous()
    if b1d is not None and not b1d.is_contiguous():
        b1d = b1d.contiguous()
    out, residual_out = _ops.norm.norm_forward(backend, x2d, r2d, w1d, b1d, eps, rms)
    out = out.view(shape)
    return out, (residual_out.view(shape) if residual is not None else None)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """As torch.nn.functional.layer_norm: normalize over the trailing `normalized_shape` dims.
    Under CUDA's torch.autocast it runs in float32, as torch's (so do the other norms)."""
    return _norm("layer_norm", input, None, normalized_shape, weight, bias, eps, rms=False)[0]


def rms_norm(input, normalized_shape, weight=None, eps=None, *, bias=None):
    """As torch.nn.functional.rms_norm (eps=None means torch's default: the machine epsilon of the
    computation dtype, torch.finfo(torch.float32).eps for float16 / bfloat16 / float32 input).
    Keyword-only `bias` is an extension: added after scaling, as some models use."""
    out = _norm("rms_norm", input, None, normalized_shape, weight, bias, eps, rms=True)[0]
    if input.device.type == "cpu" and input.dim() in (4, 5) and not input.is_contiguous():
        # torch's CPU rms_norm is elementwise math, so a channels-last input gives a channels-last
        # output (its CUDA kernel, like layer_norm everywhere, returns a contiguous one)
        fmt = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
        if input.is_contiguous(memory_format=fmt):
            out = out.contiguous(memory_format=fmt)
    return out


def _promoted(input, residual):
    """input and residual in the dtype of torch's input + residual: a 16-bit input with a float32
    residual stream (mixed precision's usual setup) is summed and normalized in float32."""
    if (isinstance(input, torch.Tensor) and isinstance(residual, torch.Tensor) and input.dtype != residual.dtype
            and input.dtype in _checks.FLOATING and residual.dtype in _checks.FLOATING):
        dtype = torch.promote_types(input.dtype, residual.dtype)
        return input.to(dtype), residual.to(dtype)
    return input, residual


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Pre-norm block step in one pass: returns (layer_norm(input + residual), input + residual).
    Both in the dtype torch's input + residual has (an input and residual of different floating
    dtypes are promoted first: float16 + float32 gives float32 outputs)."""
    if residual is None:
        _checks.tensor("add_layer_norm", "residual", residual)  # raises (layer_norm takes no residual)
    input, residual = _promoted(input, residual)
    return _norm("add_layer_norm", input, residual, normalized_shape, weight, bias, eps, rms=False)


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, *, bias=None):
    """Pre-norm block step in one pass: returns (rms_norm(input + residual), input + residual),
    with add_layer_norm's dtype rule."""
    if residual is None:
        _checks.tensor("add_rms_norm", "residual", residual)  # raises (rms_norm takes no residual)
    input, residual = _promoted(input, residual)
    return _norm("add_rms_norm", input, residual, normalized_shape, weight, bias, eps, rms=True)


# --- cross-entropy ------------------------------------------------------------------------------
_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}


def _number(fn, name, value, ok, expected):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
        raise LlmfastValueError(f"{fn}: {name} must be {expected}, got {value!r}")
    return float(value)


def _softcap(fn, softcap):
    """None (off), or a finite number > 0; 0 also means off (FlashAttention's default, softcap=0.0)."""
    if softcap is None or (not isinstance(softcap, bool) and isinstance(softcap, (int, float)) and softcap == 0):
        return None
    return _number(fn, "softcap", softcap, lambda v: 0.0 < v < math.inf, "None, 0 (off) or a finite number > 0")


def _loss_options(fn, reduction, ignore_index, label_smoothing, z_loss, softcap):
    """Checks the options cross_entropy and linear_cross_entropy share; returns them as Python
    numbers (ignore_index, label_smoothing, z_loss, softcap)."""
    if reduction not in _REDUCTION_CODES:
        raise LlmfastValueError(f"{fn}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise LlmfastTypeError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    label_smoothing = _number(fn, "label_smoothing", label_smoothing, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
    z_loss = _number(fn, "z_loss", z_loss, lambda v: 0.0 <= v < math.inf, "a finite number >= 0")
    softcap = _softcap(fn, softcap)
    return int(ignore_index), label_smoothing, z_loss, softcap


def _cross_entropy_probs(fn, input, target, weight, reduction, label_smoothing, z_loss, softcap, process_group):
    """Class-probability targets (a floating target shaped like the input), torch's semantics:
    plain PyTorch (llmfast.reference.cross_entropy_probs), no fused kernel."""
    _checks.same_device(fn, "target", target, "input", input)
    if tuple(target.shape) != tuple(input.shape):
        raise LlmfastValueError(f"{fn}: class-probability targets must have the input's shape {tuple(input.shape)}, "
                                f"got {tuple(target.shape)}")
    if process_group is not None:
        raise LlmfastValueError(f"{fn}: process_group takes class-index targets only")
    if input.dim() == 0:
        raise LlmfastValueError(f"{fn}: input must have at least 1 dimension (C,), got a 0-d tensor")
    n_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if weight is not None:
        _checks.floating(fn, "weight", weight)
        if tuple(weight.shape) != (n_classes,):
            raise LlmfastValueError(f"{fn}: weight must have shape ({n_classes},) (one per class), got {tuple(weight.shape)}")
        _checks.same_device(fn, "weight", weight, "input", input)
    _, label_smoothing, z_loss, softcap = _loss_options(fn, reduction, -100, label_smoothing, z_loss, softcap)
    return _reference.cross_entropy_probs(input, target, weight, reduction, label_smoothing, z_loss=z_loss,
                                          softcap=softcap)


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                  label_smoothing=0.0, *, z_loss=0.0, softcap=None, inplace_backward=False, process_group=None):
    """As torch.nn.functional.cross_entropy (the same positional signature, including the
    deprecated size_average / reduce, which override reduction as in torch) with class-index
    targets: logits (C,), (N, C) or
    (N, C, d1, ...), target (), (N,) or (N, d1, ...); the same values and gradients for every
    reduction, class weights, label smoothing and ignore_index. Class-probability targets (a
    floating target shaped like the input) follow torch's semantics too, through plain PyTorch
    (llmfast.reference.cross_entropy_probs; no fused kernel, z_loss and softcap apply).

    Extras (keyword-only): `z_loss` adds z_loss * logsumexp(logits)^2 per non-ignored token
    (weighted by its target-class weight like its NLL term); `softcap` replaces the logits by
    softcap * tanh(logits / softcap) first; `inplace_backward=True` lets the kernels write the
    gradient over the logits buffer (no (N, C) gradient allocation): the logits' contents are
    then garbage after the forward, so use it only when nothing else needs them (torch's version
    counter catches an autograd node that saved them). It only takes effect for a contiguous
    2-D (N, C) input that needs a gradient; other inputs are copied to (N, C) first anyway. The
    gradient is computed in the forward; for float16 logits it is kept in float32 (an (N, C)
    float32 buffer) so that a loss scale reaches the unlikely classes' tiny entries before they
    are rounded to float16, as in torch, except with inplace_backward (float16 in place: entries
    below float16's range, p / N < 6e-8, are flushed to zero there).

    The loss is returned in the input's dtype (in float32 under torch.autocast, as torch's); it
    is accumulated in fp32 ('mean' divides by the
    sum of the target weights of non-ignored tokens: NaN when all are ignored, as in torch). On
    the CPU, a target outside [0, C) that is not ignore_index raises IndexError; the GPU kernels
    do not check (that would synchronise) and treat such a token as ignored. Class weights get
    no gradient (one that requires grad is refused, as by torch).

    Autograd, where it differs from torch: the graph's backward runs once (a second
    `backward(retain_graph=True)` through the same loss raises; the kernels' saved gradient is
    consumed), and double backward (create_graph=True) needs the logits to stay alive, i.e. a
    leaf or a tensor the caller keeps (see llmfast.ops.cross_entropy). Rows whose target is
    ignored get a zero gradient even where their logits are NaN (torch's is NaN there).

    Vocabulary parallelism (`process_group`, a torch.distributed.ProcessGroup): `input` is this
    rank's contiguous slice of the classes (rank r owns [offset_r, offset_r + C_r), slices in
    rank order, uneven sizes allowed), target holds global class ids and `weight` the full (C,)
    class weights, both the same on every rank; every rank returns the loss of the whole
    vocabulary and backward gives each rank the gradient of its slice. inplace_backward then
    writes that gradient over the logits during backward (not forward). See
    llmfast.parallel.cross_entropy for the full contract.
    """
    fn = "cross_entropy"
    if size_average is not None or reduce is not None:  # torch's legacy arguments
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    _checks.floating(fn, "input", input)
    _checks.tensor(fn, "target", target)
    if target.dtype.is_floating_point:
        if isinstance(ignore_index, int) and ignore_index >= 0:  # torch's rule (negative ones are unused)
            raise LlmfastValueError(f"{fn}: ignore_index ({ignore_index}) is not supported for class-probability "
                                    f"(floating point) targets, as in torch; leave it negative (default -100)")
        return _cross_entropy_probs(fn, input, target, weight, reduction, label_smoothing, z_loss, softcap,
                                    process_group)
    if target.dtype.is_complex:
        raise LlmfastTypeError(f"{fn}: target must hold class indices or class probabilities, got {target.dtype}")
    if target.dtype == torch.bool:
        raise LlmfastTypeError(f"{fn}: target must be an integer tensor of class indices, got torch.bool")
    _checks.same_device(fn, "target", target, "input", input)
    if input.dim() == 0:
        raise LlmfastValueError(f"{fn}: input must have at least 1 dimension (C,), got a 0-d tensor")
    n_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    expected = tuple(input.shape[:1]) + tuple(input.shape[2:]) if input.dim() >= 2 else ()
    if input.dim() == 1 and tuple(target.shape) == (1,):
        target = target.reshape(())  # torch takes a (1,) target for a (C,) input too (a 0-d loss)
    if tuple(target.shape) != expected:
        raise LlmfastValueError(
            f"{fn}: target must have shape {expected} for input of shape {tuple(input.shape)} "
            f"(the class dimension is dim {1 if input.dim() >= 2 else 0}), got {tuple(target.shape)}")
    if n_classes < 1 and process_group is None:
        raise LlmfastValueError(f"{fn}: input must have at least one class, got shape {tuple(input.shape)}")
    if weight is not None and process_group is None:
        _checks.floating(fn, "weight", weight)
        if tuple(weight.shape) != (n_classes,):
            raise LlmfastValueError(f"{fn}: weight must have shape ({n_classes},) (one per class), got {tuple(weight.shape)}")
        _checks.same_device(fn, "weight", weight, "input", input)
    if isinstance(weight, torch.Tensor) and weight.requires_grad and torch.is_grad_enabled():
        # torch's nll_loss refuses it too rather than leave the weight without its gradient.
        raise LlmfastValueError(f"{fn}: weight must not require grad with class-index targets (the loss is not "
                                f"differentiable with respect to the class weights, as in torch); pass weight.detach()")
    ignore_index, label_smoothing, z_loss, softcap = _loss_options(fn, reduction, ignore_index, label_smoothing, z_loss,
                                                                   softcap)
    if not isinstance(inplace_backward, bool):
        raise LlmfastTypeError(f"{fn}: inplace_backward must be a bool, got {inplace_backward!r}")
    if process_group is not None:
        return _parallel_ce.vocab_parallel_cross_entropy(input, target, weight, ignore_index, reduction,
                                                         label_smoothing, z_loss, softcap, inplace_backward,
                                                         process_group)

    backend = resolve("cross_entropy", input.device, input.dtype)
    if backend == "reference":
        if _autocast_enabled(input.device.type) and input.dtype in (torch.float16, torch.bfloat16):
            input = input.float()  # torch's autocast runs cross_entropy in float32
        return _reference.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                                        z_loss=z_loss, softcap=softcap)

    # Kernels work on (M, V) row-major logits and (M,) int64 targets.
    if input.dim() == 1:
        x2d, t1d = input.reshape(1, n_classes), target.reshape(1)
    elif input.dim() == 2:
        x2d, t1d = input, target
    else:
        x2d, t1d = input.movedim(1, -1).reshape(-1, n_classes), target.reshape(-1)
    x2d = x2d.contiguous()
    t1d = t1d.to(torch.int64).contiguous()
    w1d = weight.contiguous() if weight is not None else None
    code = _REDUCTION_CODES[reduction]
    needs_grad = torch.is_grad_enabled() and input.requires_grad
    if needs_grad and inplace_backward and input.dim() != 2 and x2d.untyped_storage().data_ptr() == \
            input.untyped_storage().data_ptr():
        x2d = x2d.clone()  # only a 2-D input's own buffer takes the gradient (the documented contract)
    if needs_grad and not inplace_backward and x2d.dtype == torch.float16:
        # The kernels store the gradient at scale 1 in the logits' dtype; in float16 the entries
        # of unlikely classes (p / N below 6e-8) would flush to zero before a loss scale
        # (GradScaler) reaches them. In float32, autograd rounds the scaled gradient to float16
        # once, as torch does (torch's float16 cross_entropy computes in float32 too).
        x2d = x2d.float()
    options = (ignore_index, label_smoothing, z_loss, softcap)

    if backend == "triton":
        fwd, inplace_fn = torch.ops.llmfast.triton_cross_entropy_fwd, _ops.cross_entropy.TritonInplaceFunction
    else:
        if _ops.cross_entropy.CppInplaceFunction is None:
            raise BackendUnavailableError(
                f"llmfast {fn}: backend {backend!r} is unavailable: llmfast._C was built without the "
                f"cross_entropy ops (rebuild the extension)")
        fwd, inplace_fn = torch.ops.llmfast.cross_entropy_fwd, _ops.cross_entropy.CppInplaceFunction
    if inplace_backward and needs_grad:
        loss = inplace_fn.apply(x2d, t1d, w1d, code, *options)
    elif needs_grad and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
        # Eager: the op below the autograd key, in llmfast's own autograd Function.
        loss = _ops.cross_entropy.CrossEntropyFunction.apply(
            input, target, weight, x2d.detach(), t1d, w1d, _grad_view(input.shape), *_ce_eager_ops(backend), code,
            options)
    else:
        loss, _, _ = fwd(x2d, t1d, w1d, code, *options, needs_grad)
    if code == 0:
        loss = loss.view(target.shape)
    if _autocast_enabled(input.device.type):
        return loss.to(torch.float32)  # torch's autocast runs cross_entropy in float32
    return loss.to(input.dtype)


def _grad_view(shape):
    """Maps the kernels' (M, C) gradient back to an input of `shape` ((C,), (N, C) or
    (N, C, d1, ...))."""
    if len(shape) == 1:
        return lambda g: g.view(shape)
    if len(shape) == 2:
        return lambda g: g
    # contiguous, as torch's gradient (one copy; (N, C) inputs, the common case, need none)
    return lambda g: g.view(shape[0], *shape[2:], shape[1]).movedim(-1, 1).contiguous()


def _ce_eager_ops(backend):
    """(forward, scale) of the cross-entropy kernels of `backend`, to call below the autograd key."""
    if backend == "triton":
        from .triton import cross_entropy as kernels

        return kernels.cross_entropy_fwd, kernels.cross_entropy_scale_grad_
    return torch.ops.llmfast.cross_entropy_fwd.default, torch.ops.llmfast.cross_entropy_scale_grad_.default


def linear_cross_entropy(input, linear_weight=None, target=None, bias=None, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
                         chunk_size=None, process_group=None, options=None):
    """cross_entropy(input @ linear_weight.T + bias, target, weight, ...) without materialising
    the logits: input (..., D), linear_weight (V, D) (the output projection, e.g. a tied
    embedding), target of input's leading shape, bias (V,) or None, weight (V,) class weights
    or None. Options as cross_entropy.

    Two calling conventions, told apart by whether `linear_weight` is given:
    - torch >= 2.14's torch.nn.functional.linear_cross_entropy(input, linear_weight, target, *,
      linear_bias=None, weight=None, reduction='mean', ignore_index=None, label_smoothing=0.0,
      options=None): `weight` is the class weights, ignore_index=None means -100, and options
      (a torch.nn.LinearCrossEntropyOptions) contributes its batch_chunk_size as chunk_size (its
      other fields tune torch's implementation and are ignored). As in torch, class-probability
      targets (a floating target shaped like the logits) and a K-dimensional projection
      (C, d1, ..., dK, D) with bias (C, d1, ..., dK) and target (N, d1, ..., dK) are taken; those
      two run unfused (F.linear, then llmfast's cross_entropy), as torch's reference path does.
    - llmfast's: linear_cross_entropy(input, weight, target, bias=None, ...), the projection as
      the second argument (its keyword `weight=` works when linear_weight is not given).

    The tokens are processed `chunk_size` rows at a time (default: about 256 MiB of logits per
    chunk, see llmfast.ops.cross_entropy.default_chunk_rows): one matmul makes a chunk's logits,
    the cross-entropy kernel turns them into their gradient in place, two matmuls accumulate
    grad_input and grad_weight (in the projection's dtype). Extra memory: one chunk of logits plus an
    fp32 (V,) bias-gradient accumulator; the logits of the matmul are rounded to input's dtype
    (as torch.nn.functional.linear would). With reduction='none' backward recomputes each
    chunk's logits (its per-row upstream gradient is only known then).

    Vocabulary parallelism (`process_group`, a torch.distributed.ProcessGroup): the projection (V_r, D)
    and `bias` (V_r,) are this rank's contiguous slice of the classes (slices in rank order,
    uneven sizes allowed); input and target (global class ids) are the same on every rank. Every
    rank returns the loss of the whole vocabulary; backward gives each rank the gradient of its
    projection and bias slices, and grad_input all_reduced (summed) over the group. Each chunk's
    logits are computed again in backward (one more matmul per chunk). No class weights there. See
    llmfast.parallel.cross_entropy for the full contract.
    """
    fn = "linear_cross_entropy"
    linear_weight, class_weight, bias = _linear_arguments(fn, linear_weight, weight, bias, linear_bias)
    if target is None:
        raise LlmfastTypeError(f"{fn}: missing target (the third argument)")
    if ignore_index is None:
        ignore_index = -100  # torch's default for class-index targets
    if chunk_size is None and options is not None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    _checks.floating(fn, "input", input)
    _checks.floating(fn, "linear_weight", linear_weight)
    _checks.tensor(fn, "target", target)
    if target.dtype.is_floating_point or linear_weight.dim() > 2:
        return _linear_then_cross_entropy(fn, input, linear_weight, target, bias, class_weight, reduction, ignore_index,
                                          label_smoothing, z_loss, softcap, process_group)
    if _autocast_enabled(input.device.type):
        # As torch.nn.functional.linear then cross_entropy under autocast: the projection runs
        # in the autocast dtype (input, weight and bias cast to it; autograd casts the gradients
        # back) and the loss comes back in float32. Autocast is off inside: the chunked matmuls
        # must produce the dtypes the gradient buffers were made with.
        dt = torch.get_autocast_dtype(input.device.type)
        with torch.autocast(input.device.type, enabled=False):
            loss = _linear_cross_entropy(
                input.to(dt), linear_weight.to(dt), target,
                bias.to(dt) if isinstance(bias, torch.Tensor) and bias.is_floating_point() else bias, class_weight,
                ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, process_group)
        return loss.to(torch.float32)
    return _linear_cross_entropy(input, linear_weight, target, bias, class_weight, ignore_index, reduction,
                                 label_smoothing, z_loss, softcap, chunk_size, process_group).to(input.dtype)


def _linear_then_cross_entropy(fn, input, linear_weight, target, bias, class_weight, reduction, ignore_index,
                               label_smoothing, z_loss, softcap, process_group):
    """torch's linear_cross_entropy cases the fused path does not take (class-probability targets,
    a K-dimensional projection): F.linear, then llmfast's cross_entropy, as torch's reference
    path computes them (the logits are materialised)."""
    if process_group is not None:
        raise LlmfastValueError(f"{fn}: process_group takes class-index targets and a (V, D) projection only")
    if linear_weight.dim() < 2 or linear_weight.shape[-1] != input.shape[-1]:
        raise LlmfastValueError(f"{fn}: linear_weight must have shape (C, ..., {input.shape[-1]}) (input's last "
                                f"dimension last), got {tuple(linear_weight.shape)}")
    out_dims = tuple(linear_weight.shape[:-1])  # (C, d1, ..., dK)
    if len(out_dims) > 1 and input.dim() != 2:
        raise LlmfastValueError(f"{fn}: with a K-dimensional linear_weight {tuple(linear_weight.shape)}, input must "
                                f"be batched, (N, {input.shape[-1]}), as in torch; got shape {tuple(input.shape)}")
    if bias is not None and tuple(bias.shape) != out_dims:
        raise LlmfastValueError(f"{fn}: bias must have shape {out_dims}, got {tuple(bias.shape)}")
    logits = torch.nn.functional.linear(input, linear_weight.reshape(-1, input.shape[-1]),
                                        bias.reshape(-1) if bias is not None else None)
    logits = logits.reshape(*input.shape[:-1], *out_dims)
    if input.dim() > 2:  # (..., C) probabilities over the last dim: tokens flattened, as the kernels' rows
        if tuple(target.shape) != tuple(logits.shape):
            raise LlmfastValueError(f"{fn}: class-probability targets must have the logits' shape "
                                    f"{tuple(logits.shape)}, got {tuple(target.shape)}")
        loss = cross_entropy(logits.reshape(-1, out_dims[0]), target.reshape(-1, out_dims[0]), class_weight,
                             ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                             z_loss=z_loss, softcap=softcap)
        return loss.reshape(input.shape[:-1]) if reduction == "none" else loss
    return cross_entropy(logits, target, class_weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)


def _linear_cross_entropy(input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, z_loss,
                          softcap, chunk_size, process_group):
    """linear_cross_entropy without autocast; the loss in float32 where the kernels compute it
    (the caller casts it)."""
    fn = "linear_cross_entropy"
    _checks.tensor(fn, "target", target)
    if input.dim() < 1:
        raise LlmfastValueError(f"{fn}: input must have at least 1 dimension (..., D), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise LlmfastValueError(
            f"{fn}: linear_weight must have shape (V, {input.shape[-1]}) (V classes, input's last dimension), "
            f"got {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise LlmfastTypeError(f"{fn}: linear_weight must have input's dtype {input.dtype}, got {weight.dtype}")
    _checks.same_device(fn, "linear_weight", weight, "input", input)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise LlmfastTypeError(f"{fn}: target must be an integer tensor of class indices, got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise LlmfastValueError(f"{fn}: target must have shape {tuple(input.shape[:-1])} (input's leading "
                                f"dimensions), got {tuple(target.shape)}")
    _checks.same_device(fn, "target", target, "input", input)
    V = weight.shape[0]
    if V < 1 and process_group is None:
        raise LlmfastValueError(f"{fn}: linear_weight must have at least one row (class), got shape "
                                f"{tuple(weight.shape)}")
    if bias is not None:
        _checks.floating(fn, "bias", bias)
        if tuple(bias.shape) != (V,):
            raise LlmfastValueError(f"{fn}: bias must have shape ({V},), got {tuple(bias.shape)}")
        if bias.dtype != input.dtype:
            raise LlmfastTypeError(f"{fn}: bias must have input's dtype {input.dtype}, got {bias.dtype}")
        _checks.same_device(fn, "bias", bias, "input", input)
    if class_weight is not None:
        if process_group is not None:
            raise LlmfastValueError(f"{fn}: class weights (weight) are not supported with process_group")
        _checks.floating(fn, "weight", class_weight)
        if tuple(class_weight.shape) != (V,):
            raise LlmfastValueError(f"{fn}: weight (the class weights) must have shape ({V},), got "
                                    f"{tuple(class_weight.shape)}")
        _checks.same_device(fn, "weight", class_weight, "input", input)
        if class_weight.requires_grad and torch.is_grad_enabled():
            raise LlmfastValueError(f"{fn}: weight (the class weights) must not require grad (the loss is not "
                                    f"differentiable with respect to them, as in torch); pass weight.detach()")
        class_weight = class_weight.contiguous()
    ignore_index, label_smoothing, z_loss, softcap = _loss_options(fn, reduction, ignore_index, label_smoothing, z_loss,
                                                                   softcap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise LlmfastValueError(f"{fn}: chunk_size must be None or a positive int, got {chunk_size!r}")
    if process_group is not None:
        return _parallel_ce.vocab_parallel_linear_cross_entropy(input, weight, target, bias, ignore_index, reduction,
                                                                label_smoothing, z_loss, softcap, chunk_size,
                                                                process_group)

    backend = resolve("linear_cross_entropy", input.device, input.dtype)
    if backend == "reference":
        return _reference.linear_cross_entropy(input, weight, target, bias, weight=class_weight,
                                               ignore_index=ignore_index,
                                               reduction=reduction, label_smoothing=label_smoothing,
                                               z_loss=z_loss, softcap=softcap,
                                               out_dtype=torch.promote_types(input.dtype, torch.float32))
    if backend == "triton":
        ops = (torch.ops.llmfast.triton_cross_entropy_fwd, torch.ops.llmfast.triton_cross_entropy_fwd_inplace,
               torch.ops.llmfast.triton_cross_entropy_scale_grad_)
    else:
        if _ops.cross_entropy.CppInplaceFunction is None:
            raise BackendUnavailableError(
                f"llmfast {fn}: backend {backend!r} is unavailable: llmfast._C was built without the "
                f"cross_entropy ops (rebuild the extension)")
        ops = (torch.ops.llmfast.cross_entropy_fwd, torch.ops.llmfast.cross_entropy_fwd_inplace,
               torch.ops.llmfast.cross_entropy_scale_grad_)
    chunk = chunk_size or _ops.cross_entropy.default_chunk_rows(target.numel(), V, input.element_size())
    loss = _ops.cross_entropy.LinearCrossEntropyFunction.apply(
        input, weight, target, bias, class_weight, _REDUCTION_CODES[reduction], ignore_index, label_smoothing, z_loss,
        softcap, chunk, *ops)
    if reduction == "none":
        loss = loss.view(target.shape)
    return loss


# --- attention ----------------------------------------------------------------------------------
def _as_4d(t):
    """(..., H, S, D) as (B, H, S, D): a view for 2-4 dims; more leading dims are flattened
    (a copy only when they cannot be viewed as one, e.g. an expanded mask)."""
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return t.unsqueeze(0)
    if t.dim() == 2:
        return t[None, None]
    return t.reshape(-1, *t.shape[-3:])


def _broadcast_batch(fn, query, key, value):
    """query (..., Hq, Sq, D), key (..., Hkv, Sk, D), value (..., Hkv, Sk, Dv) with their batch
    dimensions (all but the last three; missing ones count as 1) broadcast together, as torch
    does: expanded views, no copies. Inputs of fewer dimensions than the others get leading 1s up
    to the largest rank (at least 3), so the output has torch's rank: the largest of the inputs'."""
    rank = max(3, query.dim(), key.dim(), value.dim())

    def pad(t):
        return t.reshape((1,) * (rank - t.dim()) + tuple(t.shape)) if t.dim() < rank else t

    shapes = [tuple(t.shape[:-3]) for t in (query, key, value)]
    if shapes[0] == shapes[1] == shapes[2] and query.dim() == key.dim() == value.dim():
        return query, key, value
    q, k, v = pad(query), pad(key), pad(value)
    try:
        lead = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError:
        raise LlmfastValueError(f"{fn}: the batch dimensions of query {tuple(query.shape)}, key {tuple(key.shape)} "
                                f"and value {tuple(value.shape)} do not broadcast") from None
    return tuple(t.expand(*lead, *t.shape[-3:]) for t in (q, k, v))


def _from_causal_bias(fn, bias, is_causal, sq, sk, device):
    """A torch.nn.attention.bias.CausalBias as llmfast's arguments: (attn_mask, is_causal,
    causal_right). Upper-left is is_causal (torch's alignment); lower-right with Sk >= Sq is the
    band j <= i + (Sk - Sq); lower-right with Sq > Sk (first rows see no key) is its boolean mask."""
    if is_causal:
        raise LlmfastValueError(f"{fn}: attn_mask is a CausalBias, which already is the causal mask; leave "
                                f"is_causal False")
    if (bias.seq_len_q, bias.seq_len_kv) != (sq, sk):
        raise LlmfastValueError(f"{fn}: the CausalBias is for (Sq, Sk) = ({bias.seq_len_q}, {bias.seq_len_kv}), "
                                f"the inputs have ({sq}, {sk})")
    if bias.variant == _CausalVariant.UPPER_LEFT:
        return None, True, None
    if sk >= sq:
        return None, False, sk - sq
    return bias._materialize(device), False, None


def _lower_right_window(fn, window_size, attn_mask, causal_right, sq, sk, device):
    """A window with a lower-right CausalBias follows that diagonal (FlashAttention's alignment):
    query i sees keys i + (Sk - Sq) - left .. i + (Sk - Sq), e.g. the last `left` + 1 keys of a
    KV cache for one decoded query. Where the kernels' band (left edge i - left', left' >= 0)
    can say it, returns it as a window; otherwise as a boolean (Sq, Sk) mask (Sq * Sk bytes).
    Returns (attn_mask, causal_right, window_size)."""
    left, _ = _window(fn, window_size)  # the right side is the causal diagonal's
    if left < 0:
        return attn_mask, causal_right, window_size
    offset = sk - sq
    if causal_right is not None and left >= offset:
        return attn_mask, causal_right, (left - offset, -1)
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    band = (j >= i + offset - left) & (j <= i + offset)
    return (band if attn_mask is None else attn_mask & band), None, None


def _window(fn, window_size):
    if window_size is None:
        return -1, -1
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise LlmfastTypeError(f"{fn}: window_size must be None or a pair (left, right) of ints, "
                               f"got {window_size!r}") from None
    pair = []
    for v in (left, right):
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() and not v.is_complex() \
                and v.dtype != torch.bool:
            v = int(v.item())  # e.g. FlashAttention's tests draw windows with torch.randint
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise LlmfastValueError(f"{fn}: window_size must be a pair (left, right) of ints (negative = "
                                    f"unbounded), got {window_size!r}")
        pair.append(max(int(v), -1))  # any negative value is unbounded, as in FlashAttention
    return pair[0], pair[1]


_CUDA_MAX_GRID_YZ = 65535  # a CUDA grid's y and z limit (the cuda kernels put heads and batch there)


def _attention_gap(backend, d, dv, batch, hq):
    """Why `backend`'s attention kernels cannot take this problem, or None."""
    most = _ops.attention.TRITON_MAX_HEAD_DIM if backend == "triton" else _ops.attention.CUDA_MAX_HEAD_DIM
    if d > most:
        return f"query's head dim {d} is over {most}, the most the {backend} kernels take"
    if dv > most:
        return f"value's head dim {dv} is over {most}, the most the {backend} kernels take"
    if backend == "cuda" and (batch > _CUDA_MAX_GRID_YZ or hq > _CUDA_MAX_GRID_YZ):
        return (f"the cuda kernels take at most {_CUDA_MAX_GRID_YZ} batch entries and heads (their grid's y and z), "
                f"got {batch} and {hq}")
    return None


_FAST_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Head dims every kernel backend takes (larger ones may need the general path's fallback).
_FAST_ATTENTION_MAX_HEAD_DIM = min(_ops.attention.TRITON_MAX_HEAD_DIM, _ops.attention.CUDA_MAX_HEAD_DIM)


def _in_query_layout(out, query):
    """`out` (B, H, S, Dv), contiguous, in the memory order of a 4-D query's (B, H, S) dims, as
    torch's fused CPU kernels (and cuDNN's) lay their output out: for the common (B, S, H, D)
    projection viewed as (B, H, S, D), out.transpose(1, 2).view(B, S, H * Dv) then works as with
    torch, and costs the copy that the usual .contiguous() / .reshape after it no longer makes.
    Dims of size 1 keep their place."""
    if query.dim() != 4 or out.dim() != 4 or query.is_contiguous():
        return out  # (a contiguous query is in (B, H, S) order: the common call pays one check)
    st, sz = query.stride(), query.shape
    # (a broadcast dim, stride 0, has no memory order of its own: it keeps its place, as in torch)
    dims = [i for i in range(3) if sz[i] > 1 and st[i] != 0]
    if all(st[a] >= st[b] for a, b in zip(dims, dims[1:])):
        return out  # already in (B, H, S) order
    # Order the dims by decreasing stride with plain comparisons (an insertion sort: at most 3
    # dims), which torch.compile can trace on symbolic strides, unlike sorted(key=...).
    ordered = []
    for d in dims:
        at = len(ordered)
        while at > 0 and st[ordered[at - 1]] < st[d]:
            at -= 1
        ordered.insert(at, d)
    ordered = iter(ordered)
    perm = [next(ordered) if sz[i] > 1 and st[i] != 0 else i for i in range(3)] + [3]
    inverse = [perm.index(i) for i in range(4)]
    return out.permute(perm).contiguous().permute(inverse)


def _sdpa_fast(query, key, value, dropout_p, is_causal, scale, enable_gqa):
    """scaled_dot_product_attention's most common call, with little host time: plain 4-D
    (B, H, S, D) tensors of one kernel dtype and device, as many key as query heads (or, with
    enable_gqa=True, a divisor of them), no mask, no dropout, no extras, outside autocast and
    torch.compile. Every condition is checked here,
    cheaply; the output (or None when the general path must handle the call, including every
    call that raises there) is what the general path returns."""
    tensor = torch.Tensor
    if type(query) is not tensor or type(key) is not tensor or type(value) is not tensor:
        return None  # subclasses (Parameters, DTensors, ...) take the general path
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or query.is_nested:
        return None
    dtype, device = query.dtype, query.device
    if (dtype not in _FAST_ATTENTION_DTYPES or key.dtype is not dtype or value.dtype is not dtype
            or key.device != device or value.device != device):
        return None
    B, H, Sq, D = query.shape
    Hkv = key.shape[1]
    if tuple(key.shape) != (B, Hkv, key.shape[2], D) or tuple(value.shape[:3]) != tuple(key.shape[:3]):
        return None
    if Hkv != H and (enable_gqa is not True or Hkv == 0 or H % Hkv != 0):
        return None  # grouped-query attention only as asked for, with whole groups
    Dv = value.shape[3]
    if not (0 < B <= _CUDA_MAX_GRID_YZ and 0 < H <= _CUDA_MAX_GRID_YZ and Sq > 0 and key.shape[2] > 0
            and 0 < D <= _FAST_ATTENTION_MAX_HEAD_DIM and 0 < Dv <= _FAST_ATTENTION_MAX_HEAD_DIM):
        return None
    if type(dropout_p) not in (float, int) or dropout_p != 0:
        return None
    if (is_causal is not False and is_causal is not True) or (enable_gqa is not False and enable_gqa is not True):
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif type(scale) is not float or not math.isfinite(scale):
        return None
    if _autocast_enabled(device.type) or torch.compiler.is_compiling():
        return None
    backend = resolve("attention", device, dtype)
    if backend == "reference":
        return None
    out, _ = _ops.attention.attention_forward(backend, query, key, value, None, scale, -1, 0 if is_causal else -1,
                                              0.0, 0.0, None)
    return out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, window_size=None, softcap=None, return_lse=False):
    """As torch.nn.functional.scaled_dot_product_attention: query (..., Hq, Sq, D), key
    (..., Hkv, Sk, D), value (..., Hkv, Sk, Dv) -> (..., Hq, Sq, Dv), forward and backward,
    computed FlashAttention-style (the (Sq, Sk) scores are never stored).

    Same semantics as torch (llmfast/reference/attention.py has the full definition): scale
    defaults to 1/sqrt(D); is_causal is aligned top-left as in torch (query i sees keys j <= i);
    attn_mask is boolean (True = takes part) or additive, broadcastable to (..., Hq, Sq, Sk);
    enable_gqa lets Hq be a multiple of Hkv; dropout_p > 0 drops probabilities (always, as torch
    does: pass 0 in eval mode), reproducibly under torch.manual_seed, though with other random
    numbers than torch's. Differences from torch:
    - A query row whose keys are all masked gets output 0 and zero gradients (torch >= 2.5's
      math path agrees; older torch and some fused torch backends give NaN).
    - attn_mask and is_causal may be given together (torch refuses); both apply.
    - The output has the query's memory layout (as torch's fused CPU kernels give it).
    - A row masked entirely by a huge finite value (torch.finfo(torch.float32).min) gets
      torch's output (the values' mean) but, as with torch's flash kernels, a wrong gradient: its logsumexp
      m + log(l) rounds to m in float32. Boolean or -inf masks have no such limit.
    Extras (keyword-only):
    - window_size=(left, right): sliding window, query i sees keys i - left .. i + right (any
      negative value, e.g. -1, = unbounded on that side; ints or one-element integer tensors;
      combines with is_causal and attn_mask). Top-left aligned like is_causal; with attn_mask =
      torch.nn.attention.bias.causal_lower_right(Sq, Sk) the causal edge and the window are
      aligned bottom-right, as FlashAttention aligns them when Sq != Sk (a decoded query with a
      KV cache then sees the last left + 1 keys).
    - softcap: scores = softcap * tanh(scores / softcap) before masking (Gemma 2); None or 0
      means off.
    - return_lse=True returns (out, lse), lse (..., Hq, Sq) float32 (float64 for float64
      inputs) = logsumexp of each row's
      scaled, masked scores (-inf for a fully masked row); it is differentiable.

    Backends: 'cuda' (FlashAttention-2 kernels in llmfast._C on the tensor cores for fp16/bf16,
    exact fp32 on the CUDA cores; head dims up to 256), 'triton' (head dims up to 256,
    fp16/bf16/fp32), 'cpu' (tiled C++ kernels in llmfast._C, fp16/bf16/fp32 with fp32 math,
    any head dim, every feature above) and 'reference'. Under 'auto', CPU tensors take the
    'cpu' kernels and CUDA tensors the backend named in llmfast._backend.AUTO_CUDA; a call
    that the chosen kernels cannot serve (a head dim over 256) takes the reference path under
    'auto' and raises BackendUnavailableError, naming the argument, when a backend was forced.
    An additive attn_mask that requires grad gets its gradient (the kernels' backward then
    writes a (B, Hq, Sq, Sk) buffer, summed to the mask's shape). The 'cpu' and 'cuda' kernels
    draw dropout from one counter-based hash of the seed (the same entries for the same seed);
    Triton's pattern differs.
    """
    if attn_mask is None and window_size is None and softcap is None and return_lse is False:
        out = _sdpa_fast(query, key, value, dropout_p, is_causal, scale, enable_gqa)
        if out is not None:
            return _in_query_layout(out, query)
    fn = "scaled_dot_product_attention"
    if isinstance(query, torch.Tensor) and _autocast_enabled(query.device.type):
        # As torch's autocast does for this op: floating inputs (float64 aside), a float mask
        # included, in the autocast dtype; autocast is off inside.
        dt = torch.get_autocast_dtype(query.device.type)
        with torch.autocast(query.device.type, enabled=False):
            return scaled_dot_product_attention(*(_autocast_cast(t, dt) for t in (query, key, value, attn_mask)),
                                                dropout_p, is_causal, scale, enable_gqa, window_size=window_size,
                                                softcap=softcap, return_lse=return_lse)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if isinstance(t, torch.Tensor) and t.is_nested:
            raise LlmfastTypeError(f"{fn}: {name} is a nested tensor; llmfast takes padded (..., S, D) tensors (pass "
                                   f"a key-padding attn_mask for the padding)")
    _checks.floating(fn, "query", query)
    _checks.floating(fn, "key", key)
    _checks.floating(fn, "value", value)
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise LlmfastTypeError(f"{fn}: {name} must have query's dtype {query.dtype}, got {t.dtype}")
        _checks.same_device(fn, name, t, "query", query)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise LlmfastValueError(f"{fn}: {name} must have at least 2 dimensions (..., S, D), got shape "
                                    f"{tuple(t.shape)}")
    query, key, value = _broadcast_batch(fn, query, key, value)
    hq = query.shape[-3] if query.dim() >= 3 else 1
    hkv = key.shape[-3] if key.dim() >= 3 else 1
    sq, d = query.shape[-2], query.shape[-1]
    sk = key.shape[-2]
    causal_right = None  # a bottom-right causal band from a CausalBias: query i sees keys j <= i + this
    if isinstance(attn_mask, _CausalBias):
        lower_right = attn_mask.variant == _CausalVariant.LOWER_RIGHT
        attn_mask, is_causal, causal_right = _from_causal_bias(fn, attn_mask, is_causal, sq, sk, query.device)
        if lower_right and window_size is not None:
            attn_mask, causal_right, window_size = _lower_right_window(fn, window_size, attn_mask, causal_right, sq,
                                                                      sk, query.device)
    if key.shape[-1] != d:
        raise LlmfastValueError(f"{fn}: key must have query's head dim {d} (last dimension), got shape "
                                f"{tuple(key.shape)}")
    hv = value.shape[-3] if value.dim() >= 3 else 1
    if (enable_gqa is True and hv != hkv and value.shape[-2] == sk and hkv and hv and hq % hkv == 0
            and hq % hv == 0):
        # torch's grouped-query rule repeats key and value each to the query's heads; with
        # different head counts they share no grouping, so both are repeated here
        key = key.repeat_interleave(hq // hkv, dim=-3)
        value = value.repeat_interleave(hq // hv, dim=-3)
        hkv = hv = hq
    if hv != hkv and 1 in (hv, hkv) and value.shape[-2] == sk and value.dim() >= 3 and key.dim() >= 3:
        # one key (or value) head against several value (or key) heads: broadcast, as torch's
        # matmuls do (an expanded view; autograd sums the gradient back)
        if hkv == 1:
            key = key.expand(*key.shape[:-3], hv, *key.shape[-2:])
            hkv = hv
        else:
            value = value.expand(*value.shape[:-3], hkv, *value.shape[-2:])
            hv = hkv
    if hv != hkv or value.shape[-2] != sk:
        raise LlmfastValueError(f"{fn}: value must have key's heads and length (..., {hkv}, {sk}, Dv), got "
                                f"shape {tuple(value.shape)}")
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise LlmfastTypeError(f"{fn}: {name} must be a bool, got {flag!r}")
    if hkv != hq and hq == 1:  # one query head against several: broadcast, as torch does
        query = query.expand(*query.shape[:-3], hkv, *query.shape[-2:])
        hq = hkv
    if hkv != hq and hkv != 1:  # (one key head is multi-query attention, with or without enable_gqa)
        if not enable_gqa:
            raise LlmfastValueError(f"{fn}: key has {hkv} heads and query {hq}; pass enable_gqa=True for "
                                    f"grouped-query attention")
        if hkv == 0 or hq % hkv != 0:
            raise LlmfastValueError(f"{fn}: query's heads ({hq}) must be a multiple of key's heads ({hkv}) "
                                    f"with enable_gqa=True")
    if attn_mask is not None:
        _checks.tensor(fn, "attn_mask", attn_mask)
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in _checks.FLOATING:
            raise LlmfastTypeError(f"{fn}: attn_mask must be a bool or floating tensor, got {attn_mask.dtype}")
        _checks.same_device(fn, "attn_mask", attn_mask, "query", query)
        target = (*query.shape[:-1], sk)
        try:
            ok = attn_mask.dim() <= len(target) and torch.broadcast_shapes(attn_mask.shape, target) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise LlmfastValueError(f"{fn}: attn_mask must be broadcastable to {target} (..., Hq, Sq, Sk), got "
                                    f"shape {tuple(attn_mask.shape)}")
        if attn_mask.dtype in (torch.float16, torch.bfloat16) and attn_mask.requires_grad and torch.is_grad_enabled():
            # The kernels write the mask's gradient at full (B, Hq, Sq, Sk) size in the mask's
            # dtype, which autograd then sums down to the mask's shape: in 16 bits every term
            # would be rounded first. An fp32 copy of the (small, unexpanded) mask keeps the sum
            # in fp32; the same values in the forward, one rounding at the end in the backward.
            attn_mask = attn_mask.float()
    dropout_p = _number(fn, "dropout_p", dropout_p, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
    if dropout_p == 1.0:  # everything dropped: zeros (and zero gradients), as torch gives
        result = scaled_dot_product_attention(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa,
                                              window_size=window_size, softcap=softcap, return_lse=return_lse)
        if return_lse:
            return result[0] * 0.0, result[1]
        return result * 0.0
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.dtype.is_complex:
        scale = scale.item()  # torch takes a one-element tensor too
    if scale is not None:
        scale = _number(fn, "scale", scale, math.isfinite, "None or a finite number")
    elif d == 0:
        scale = 1.0  # no features: every score is 0 whatever the scale (torch's 1/sqrt(0) aside)
    softcap = _softcap(fn, softcap)
    left, right = _window(fn, window_size)
    if causal_right is not None:
        right = causal_right if right < 0 else min(right, causal_right)

    backend = resolve("attention", query.device, query.dtype)
    if d == 0 or value.shape[-1] == 0:
        backend = "reference"  # nothing for a kernel to multiply
    if backend in ("triton", "cuda"):
        problem = (d, value.shape[-1], math.prod(query.shape[:-3]), hq)
        gap = _attention_gap(backend, *problem)
        if gap is not None:
            if current_backend() != "auto":
                raise BackendUnavailableError(f"llmfast {fn}: {gap}")
            # auto: triton if it takes what cuda cannot, else the reference path
            takes = backend == "cuda" and "triton" in available_backends() and _attention_gap("triton", *problem) is None
            backend = "triton" if takes else "reference"
    if backend == "reference":
        result = _reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
            window_size=(left, right), softcap=softcap, return_lse=return_lse)
        return (_in_query_layout(result[0], query), result[1]) if return_lse else _in_query_layout(result, query)

    if is_causal:  # causal is the band's right edge at the diagonal
        right = 0 if right < 0 else min(right, 0)
    mask4 = _as_4d(attn_mask.expand(*query.shape[:-1], sk)) if attn_mask is not None else None
    # The dropout pattern is a function of this seed, drawn from torch's generator for the
    # query's device: reproducible under torch.manual_seed, traceable by torch.compile.
    seed = torch.randint(0, 2**62, (1,), device=query.device, dtype=torch.int64) if dropout_p > 0.0 else None
    out, lse = _ops.attention.attention_forward(
        backend, _as_4d(query), _as_4d(key), _as_4d(value), mask4,
        float(scale) if scale is not None else 1.0 / math.sqrt(d), left, right,
        softcap if softcap is not None else 0.0, dropout_p, seed)
    out = _in_query_layout(out.view(*query.shape[:-1], value.shape[-1]), query)
    if return_lse:
        return out, lse.view(query.shape[:-1])
    return out
