"""Registers the normalization ops with torch.library.

Two op pairs share one contract (see csrc/norm/norm_ops.cpp):
  llmfast::norm_fwd / norm_bwd                 C++ schemas; CPU and CUDA kernels in llmfast._C
  llmfast::triton_norm_fwd / triton_norm_bwd   Python custom ops around llmfast/triton/norm.py
For each pair this module registers the fake (meta) kernel used by torch.compile and the
autograd formula, so both trace under torch.compile(fullgraph=True) and pass opcheck.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _extension


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


def _register_autograd(fwd_op, bwd_op):
    def setup_context(ctx, inputs, output):
        input, residual, weight, bias, eps, rms = inputs
        _, residual_out, mean, rstd = output
        normed_input = residual_out if residual is not None else input
        ctx.save_for_backward(normed_input, weight, mean, rstd)
        ctx.rms = rms
        ctx.has_residual = residual is not None
        ctx.has_bias = bias is not None

    def backward(ctx, grad_out, grad_residual_out, _grad_mean, _grad_rstd):
        normed_input, weight, mean, rstd = ctx.saved_tensors
        weight_grad = weight is not None and ctx.needs_input_grad[2]
        bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
        if grad_out is None:
            grad_out = torch.zeros_like(normed_input)
        if not ctx.has_residual:
            grad_residual_out = None
        elif grad_residual_out is not None:
            grad_residual_out = grad_residual_out.contiguous()
        grad_input, grad_weight, grad_bias = bwd_op(
            grad_out.contiguous(), grad_residual_out, normed_input, weight, mean, rstd,
            ctx.rms, weight_grad, bias_grad,
        )
        return (
            grad_input,
            grad_input if ctx.has_residual else None,
            grad_weight if weight_grad else None,
            grad_bias if bias_grad else None,
            None,
            None,
        )

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


# --- C++ / CUDA kernels from llmfast._C ------------------------------------------------------
if _extension.has_extension:
    torch.library.register_fake("llmfast::norm_fwd")(_fwd_fake)
    torch.library.register_fake("llmfast::norm_bwd")(_bwd_fake)
    _register_autograd("llmfast::norm_fwd", torch.ops.llmfast.norm_bwd.default)


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
