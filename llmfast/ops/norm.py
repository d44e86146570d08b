"""Registers the normalization ops with torch.library.

Two op pairs share one contract (see csrc/norm/norm_ops.cpp):
  llmfast::norm_fwd / norm_bwd                 C++ schemas; CPU and CUDA kernels in llmfast._C
  llmfast::triton_norm_fwd / triton_norm_bwd   Python custom ops around llmfast/triton/norm.py
For each pair this module registers the fake (meta) kernel used by torch.compile and the
autograd formula, so both trace under torch.compile(fullgraph=True) and pass opcheck.

Eager calls take the fastest path per backend (llmfast.functional._norm): for 'cpu' and
'cuda' llmfast::norm, one op whose autograd node is C++ (csrc/norm/norm_autograd.cpp; its double
backward is norm_backward_with_graph, below); for 'triton' NormFunction, a Python
autograd.Function around the launchers.
"""
import functools
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _extension
from . import _create_graph
from ._transforms import is_transformed


def _fwd_fake(input, residual, weight, bias, eps, rms):
    M, N = input.shape
    out = input.new_empty((M, N))
    residual_out = input.new_empty((M, N) if residual is not None else (0,))
    mean = input.new_empty((0,) if rms else (M,), dtype=torch.float32)
    rstd = input.new_empty((M,), dtype=torch.float32)
    return out, residual_out, mean, rstd


def _bwd_fake(grad_out, grad_residual_out, normed_input, weight, mean, rstd, rms, weight_grad, bias_grad):
    N = normed_input.shape[1]
    param_dtype = weight.dtype if weight is not None else normed_input.dtype
    grad_input = normed_input.new_empty(normed_input.shape)
    grad_weight = normed_input.new_empty((N,) if weight_grad else (0,), dtype=param_dtype)
    grad_bias = normed_input.new_empty((N,) if bias_grad else (0,), dtype=param_dtype)
    return grad_input, grad_weight, grad_bias


def _backward(bwd_op, saved, rms, has_residual, weight_grad, bias_grad, grad_out, grad_residual_out):
    """Shared by the registered autograd formula and NormFunction: runs the backward kernel and
    returns (grad_input, grad_residual, grad_weight, grad_bias)."""
    normed_input, weight, mean, rstd = saved
    if grad_out is None:
        grad_out = torch.zeros_like(normed_input)
    if not has_residual:
        grad_residual_out = None
    elif grad_residual_out is not None:
        grad_residual_out = grad_residual_out.contiguous()
    grad_input, grad_weight, grad_bias = bwd_op(
        grad_out.contiguous(), grad_residual_out, normed_input, weight, mean, rstd, rms, weight_grad, bias_grad,
    )
    return (
        grad_input,
        grad_input if has_residual else None,
        grad_weight if weight_grad else None,
        grad_bias if bias_grad else None,
    )


def _register_autograd(fwd_op, bwd_op):
    """The autograd formula seen by torch.compile (AOTAutograd) and opcheck."""
    def setup_context(ctx, inputs, output):
        input, residual, weight, bias, eps, rms = inputs
        _, residual_out, mean, rstd = output
        normed_input = residual_out if residual is not None else input
        ctx.save_for_backward(normed_input, weight, mean, rstd)
        ctx.rms = rms
        ctx.has_residual = residual is not None
        ctx.has_bias = bias is not None

    def backward(ctx, grad_out, grad_residual_out, _grad_mean, _grad_rstd):
        saved = ctx.saved_tensors
        weight_grad = saved[1] is not None and ctx.needs_input_grad[2]
        bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
        grads = _backward(bwd_op, saved, ctx.rms, ctx.has_residual, weight_grad, bias_grad, grad_out, grad_residual_out)
        return (*grads, None, None)

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


class NormFunction(torch.autograd.Function):
    """Eager-mode autograd for a norm op pair, with the same formula as the registered one.

    The generic autograd wrapper that torch.library builds around a custom op costs tens of
    microseconds of Python per call; this Function calls the kernels straight below the
    autograd dispatch key instead. llmfast.functional uses it in eager mode and the registered
    formula under torch.compile (which never sees this class).
    """

    @staticmethod
    def forward(ctx, fwd_op, bwd_op, input, residual, weight, bias, eps, rms):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            out, residual_out, mean, rstd = fwd_op(input, residual, weight, bias, eps, rms)
        normed_input = residual_out if residual is not None else input
        ctx.save_for_backward(normed_input, weight, mean, rstd)
        ctx.bwd_op, ctx.rms, ctx.eps, ctx.has_residual = bwd_op, rms, eps, residual is not None
        ctx.weight_grad = weight is not None and ctx.needs_input_grad[4]
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[5]
        if residual is None or not (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
            ctx.mark_non_differentiable(residual_out)  # as torch's x + r: no gradient unless x or r has one
        return out, residual_out

    @staticmethod
    def backward(ctx, grad_out, grad_residual_out):
        if _create_graph.wants_graph():  # create_graph=True: gradients with a graph (as llmfast::norm's node)
            normed_input, weight, _, _ = ctx.saved_tensors
            input_grad = ctx.needs_input_grad[2] or (ctx.has_residual and ctx.needs_input_grad[3])
            grad_in, grad_w, grad_b = _backward_with_graph(
                grad_out, grad_residual_out if ctx.has_residual else None, normed_input, weight, ctx.eps, ctx.rms, 1,
                input_grad, ctx.weight_grad, ctx.bias_grad)
            grads = (grad_in if input_grad else None, grad_in if input_grad and ctx.has_residual else None,
                     grad_w if ctx.weight_grad else None, grad_b if ctx.bias_grad else None)
            return (None, None, *grads, None, None)
        bwd_op = ctx.bwd_op
        if not isinstance(bwd_op, torch._ops.OpOverload) and is_transformed(grad_out, grad_residual_out):
            bwd_op = torch.ops.llmfast.triton_norm_bwd.default  # batched gradients: through the dispatcher
        with torch._C._AutoDispatchBelowADInplaceOrView():
            grads = _backward(bwd_op, ctx.saved_tensors, ctx.rms, ctx.has_residual, ctx.weight_grad,
                              ctx.bias_grad, grad_out, grad_residual_out)
        return (None, None, *grads, None, None)


def _backward_with_graph(grad_out, grad_residual_out, normed_input, weight, eps, rms, normalized_ndim, input_grad,
                         weight_grad, bias_grad):
    """llmfast::norm_backward_with_graph: the backward under create_graph=True of both eager
    nodes, llmfast::norm's C++ one and NormFunction. The gradients are written out as differentiable torch ops of the
    normalized tensor, the weight and the incoming gradient (in float32, float64 for float64),
    so they carry a graph and their own derivatives are exact.

    No torch.autograd.grad runs here: with a residual, normed_input is the node's own output
    input + residual (the double backward flows through it back into the node, which hands the
    gradient of the sum on to input and residual), and a nested autograd.grad through it would
    have to run this very node again (the engine cannot tell that the sum does not depend on the
    weight; for the C++ node that deadlocks on the node's lock). Returns (grad of
    normed_input including grad_residual_out, grad_weight (n,), grad_bias (n,)), an empty
    tensor for each one not asked for."""
    n = math.prod(normed_input.shape[normed_input.dim() - normalized_ndim:])
    compute = torch.float64 if normed_input.dtype == torch.float64 else torch.float32
    x = normed_input.reshape(-1, n).to(compute)
    if rms:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xhat = x * rstd
    else:
        centered = x - x.mean(-1, keepdim=True)
        rstd = torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps)
        xhat = centered * rstd
    g = grad_out.reshape(-1, n).to(compute) if grad_out is not None else None
    empty = normed_input.new_empty((0,))
    grad_in, grad_w, grad_b = empty, empty, empty
    if input_grad:
        if g is not None:
            gy = g * weight.reshape(n).to(compute) if weight is not None else g
            along = (gy * xhat).mean(-1, keepdim=True)  # the part of gy along xhat
            gx = gy - xhat * along if rms else gy - gy.mean(-1, keepdim=True) - xhat * along
            grad_in = (rstd * gx).to(normed_input.dtype).view(normed_input.shape)
        else:
            grad_in = torch.zeros_like(normed_input)
        if grad_residual_out is not None:
            grad_in = grad_in + grad_residual_out
    if weight_grad and weight is not None:
        grad_w = ((g * xhat).sum(0) if g is not None else x.new_zeros(n)).to(weight.dtype)
    if bias_grad:
        grad_b = g.sum(0) if g is not None else x.new_zeros(n)
    return grad_in, grad_w, grad_b


# The eager op of the 'cpu' and 'cuda' backends, or None where llmfast._C predates it.
EAGER_NORM = None


@functools.cache
def _triton_eager_kernels():
    """The Triton launchers without their argument checks (llmfast.functional has checked and
    made contiguous what it passes; autograd hands the backward gradients of the outputs'
    shape and dtype, made contiguous in _backward)."""
    from ..triton import norm as kernels

    return (functools.partial(kernels.norm_fwd, checked=False),
            functools.partial(kernels.norm_bwd, checked=False))


def norm_forward(backend, input, residual, weight, bias, eps, rms):
    """Runs the forward of `backend` ('cuda', 'cpu' or 'triton') on 2-D contiguous tensors and
    returns (out, residual_out), differentiable in eager mode and under torch.compile. (In
    eager mode llmfast.functional takes llmfast::norm for 'cpu' and 'cuda' instead.)"""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # Traced: the custom ops, with their fake kernels and registered autograd.
        fwd_op = torch.ops.llmfast.triton_norm_fwd if backend == "triton" else torch.ops.llmfast.norm_fwd
        out, residual_out, _, _ = fwd_op(input, residual, weight, bias, eps, rms)
        return out, residual_out
    if backend == "triton":
        # Eager: the kernel launchers themselves; a Python custom op's trip through the
        # dispatcher would add tens of microseconds per call.
        fwd_op, bwd_op = _triton_eager_kernels()
    else:
        fwd_op, bwd_op = torch.ops.llmfast.norm_fwd.default, torch.ops.llmfast.norm_bwd.default
    if torch.is_grad_enabled() and (
        input.requires_grad
        or (residual is not None and residual.requires_grad)
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        return NormFunction.apply(fwd_op, bwd_op, input, residual, weight, bias, eps, rms)
    with torch._C._AutoDispatchBelowADInplaceOrView():
        out, residual_out, _, _ = fwd_op(input, residual, weight, bias, eps, rms)
    return out, residual_out


# --- C++ / CUDA kernels from llmfast._C ------------------------------------------------------
if _extension.has_extension:
    torch.library.register_fake("llmfast::norm_fwd")(_fwd_fake)
    torch.library.register_fake("llmfast::norm_bwd")(_bwd_fake)
    _register_autograd("llmfast::norm_fwd", torch.ops.llmfast.norm_bwd.default)
    if hasattr(torch.ops.llmfast, "norm_backward_with_graph"):
        torch.library.impl("llmfast::norm_backward_with_graph", "CompositeImplicitAutograd")(_backward_with_graph)
        EAGER_NORM = torch.ops.llmfast.norm.default


# --- Triton kernels ---------------------------------------------------------------------------
@torch.library.custom_op("llmfast::triton_norm_fwd", mutates_args=())
def triton_norm_fwd(
    input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    eps: float, rms: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..triton import norm as kernels

    return kernels.norm_fwd(input, residual, weight, bias, eps, rms)


@torch.library.custom_op("llmfast::triton_norm_bwd", mutates_args=())
def triton_norm_bwd(
    grad_out: Tensor, grad_residual_out: Optional[Tensor], normed_input: Tensor,
    weight: Optional[Tensor], mean: Tensor, rstd: Tensor, rms: bool, weight_grad: bool,
    bias_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    from ..triton import norm as kernels

    return kernels.norm_bwd(grad_out, grad_residual_out, normed_input, weight, mean, rstd, rms, weight_grad, bias_grad)


triton_norm_fwd.register_fake(_fwd_fake)
triton_norm_bwd.register_fake(_bwd_fake)
_register_autograd(triton_norm_fwd, triton_norm_bwd)
