"""Registers the attention ops with torch.library.

Two op pairs share one contract:
  llmfast::attention_fwd / attention_bwd                 C++ schemas (csrc/attention/); CPU
                                                          and CUDA kernels in llmfast._C
  llmfast::triton_attention_fwd / triton_attention_bwd   Python custom ops around
                                                          llmfast/triton/attention.py

Contract (see llmfast/triton/attention.py): 4-D (B, H, S, D) query/key/value with any strides,
attn_mask None or (B, Hq, Sq, Sk) (an expanded view), the causal flag folded into
window_right = 0, softcap 0 = off, dropout from a one-element int64 seed tensor. The forward
returns (out, lse); both are differentiable (the gradient of lse enters the backward through
delta = rowsum(dO * O) - dlse). This module registers the fake kernels used by torch.compile and
the autograd formula, so the ops trace under torch.compile(fullgraph=True) and pass opcheck;
AttentionFunction is the eager fast path, as NormFunction is for the norms.
"""
import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _extension
from ..reference import attention as _reference_attention
from . import _create_graph
from ._transforms import is_transformed

# The largest head dim (query's and value's) of the Triton kernels (llmfast/triton/attention.py
# asserts the same number; kept here so that checking it does not import triton) and of the CUDA
# kernels (csrc/attention/attention_cuda_launch.h, kMaxHeadDim).
TRITON_MAX_HEAD_DIM = 256
CUDA_MAX_HEAD_DIM = 256


def _mask_grad_wanted(attn_mask, wanted):
    return bool(wanted) and attn_mask is not None and attn_mask.dtype != torch.bool


def _fwd_fake(query, key, value, attn_mask, scale, window_left, window_right, softcap, dropout_p, seed):
    B, Hq, Sq, _ = query.shape
    out = query.new_empty((B, Hq, Sq, value.shape[3]))
    lse = query.new_empty((B, Hq, Sq), dtype=torch.float32)
    return out, lse


def _bwd_fake(grad_out, query, key, value, out, lse, grad_lse, attn_mask, scale, window_left, window_right, softcap,
              dropout_p, seed, mask_grad):
    grad_mask = (attn_mask.new_empty(attn_mask.shape) if _mask_grad_wanted(attn_mask, mask_grad)
                 else query.new_empty((0,)))
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), grad_mask


def _backward(bwd_op, saved, args, needs_mask_grad, grad_out, grad_lse):
    """Shared by the registered autograd formula and AttentionFunction: runs the backward
    kernels and returns (grad_query, grad_key, grad_value, grad_mask or None)."""
    query, key, value, out, lse, attn_mask, seed = saved
    scale, window_left, window_right, softcap, dropout_p = args
    if grad_out is None:  # only lse was used
        grad_out = torch.zeros_like(out)
    mask_grad = _mask_grad_wanted(attn_mask, needs_mask_grad)
    dq, dk, dv, dmask = bwd_op(grad_out, query, key, value, out, lse, grad_lse, attn_mask, scale, window_left,
                               window_right, softcap, dropout_p, seed, mask_grad)
    return dq, dk, dv, (dmask if mask_grad else None)


def _register_autograd(fwd_op, bwd_op):
    """The autograd formula seen by torch.compile (AOTAutograd) and opcheck."""
    def setup_context(ctx, inputs, output):
        query, key, value, attn_mask, scale, window_left, window_right, softcap, dropout_p, seed = inputs
        out, lse = output
        ctx.save_for_backward(query, key, value, out, lse, attn_mask, seed)
        ctx.args = (scale, window_left, window_right, softcap, dropout_p)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, grad_lse):
        if grad_out is None and grad_lse is None:
            return (None,) * 10
        grads = _backward(bwd_op, ctx.saved_tensors, ctx.args, ctx.needs_input_grad[3], grad_out, grad_lse)
        return (*grads, None, None, None, None, None, None)

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


class AttentionFunction(torch.autograd.Function):
    """Eager-mode autograd for an attention op pair, with the same formula as the registered one:
    calls the kernels straight below the autograd dispatch key, skipping the Python custom-op
    wrapper (tens of microseconds a call). torch.compile sees the registered formula instead."""

    @staticmethod
    def forward(ctx, fwd_op, bwd_op, query, key, value, attn_mask, scale, window_left, window_right, softcap,
                dropout_p, seed):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            out, lse = fwd_op(query, key, value, attn_mask, scale, window_left, window_right, softcap, dropout_p, seed)
        ctx.save_for_backward(query, key, value, out, lse, attn_mask, seed)
        ctx.bwd_op = bwd_op
        ctx.args = (scale, window_left, window_right, softcap, dropout_p)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        if grad_out is None and grad_lse is None:
            return (None,) * 12
        if _create_graph.wants_graph():  # create_graph=True: gradients with a graph, from the reference
            return (None, None, *_reference_backward(ctx, grad_out, grad_lse), None, None, None, None, None, None)
        bwd_op = ctx.bwd_op
        if not isinstance(bwd_op, torch._ops.OpOverload) and is_transformed(grad_out, grad_lse):
            bwd_op = torch.ops.llmfast.triton_attention_bwd.default  # batched gradients: through the dispatcher
        with torch._C._AutoDispatchBelowADInplaceOrView():
            grads = _backward(bwd_op, ctx.saved_tensors, ctx.args, ctx.needs_input_grad[5], grad_out, grad_lse)
        return (None, None, *grads, None, None, None, None, None, None)


def _reference_backward(ctx, grad_out, grad_lse):
    """AttentionFunction's gradients recomputed through llmfast.reference with a graph (double
    backward). The kernels' dropout pattern cannot be replayed there, so dropout is refused."""
    query, key, value, _, _, attn_mask, _ = ctx.saved_tensors
    scale, window_left, window_right, softcap, dropout_p = ctx.args
    if dropout_p > 0.0:
        raise NotImplementedError(
            "llmfast scaled_dot_product_attention: a backward with create_graph=True (double backward) is not "
            "supported with dropout_p > 0 (the kernels' dropout pattern cannot be recomputed differentiably); "
            "use dropout_p=0 or llmfast.use_backend('reference')")

    def attention(q, k, v, mask):
        return _reference_attention.attention(
            q, k, v, mask, 0.0, False, scale, k.shape[1] != q.shape[1], (window_left, window_right),
            softcap if softcap > 0.0 else None)

    needs = (*ctx.needs_input_grad[2:5], _mask_grad_wanted(attn_mask, ctx.needs_input_grad[5]))
    return _create_graph.reference_grads(attention, (query, key, value, attn_mask), needs, (grad_out, grad_lse))


_KERNELS = {}


def kernels(backend):
    """The (forward, backward) op pair of `backend`: the Triton launchers (without their
    argument checks: llmfast.functional has checked what it passes), or the C++ ops of
    llmfast._C ('cpu' and 'cuda': one schema, dispatched on the tensors' device). Eager calls
    go below the autograd key, so these are the plain ops."""
    pair = _KERNELS.get(backend)
    if pair is None:
        if backend == "triton":
            from ..triton import attention as triton_kernels

            pair = (functools.partial(triton_kernels.attention_fwd, checked=False),
                    functools.partial(triton_kernels.attention_bwd, checked=False))
        else:
            pair = (torch.ops.llmfast.attention_fwd.default, torch.ops.llmfast.attention_bwd.default)
        _KERNELS[backend] = pair
    return pair


def attention_forward(backend, query, key, value, attn_mask, scale, window_left, window_right, softcap,
                      dropout_p, seed):
    """Runs the forward of `backend` ('triton', 'cuda' or 'cpu') on 4-D tensors and returns
    (out, lse), differentiable in eager mode and under torch.compile."""
    if backend not in ("triton", "cuda", "cpu"):
        raise NotImplementedError(f"llmfast attention: no {backend!r} kernels (only 'triton', 'cuda', 'cpu' and "
                                  f"'reference')")
    args = (query, key, value, attn_mask, scale, window_left, window_right, softcap, dropout_p, seed)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        fwd = torch.ops.llmfast.triton_attention_fwd if backend == "triton" else torch.ops.llmfast.attention_fwd
        return fwd(*args)
    fwd_op, bwd_op = kernels(backend)
    if torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
        or (attn_mask is not None and attn_mask.requires_grad)
    ):
        return AttentionFunction.apply(fwd_op, bwd_op, *args)
    with torch._C._AutoDispatchBelowADInplaceOrView():
        return fwd_op(*args)


# --- C++ kernels from llmfast._C ---------------------------------------------------------------
if _extension.has_extension and hasattr(torch.ops.llmfast, "attention_fwd"):  # a stale _C may predate it
    torch.library.register_fake("llmfast::attention_fwd")(_fwd_fake)
    torch.library.register_fake("llmfast::attention_bwd")(_bwd_fake)
    _register_autograd("llmfast::attention_fwd", torch.ops.llmfast.attention_bwd.default)


# --- Triton kernels ---------------------------------------------------------------------------
@torch.library.custom_op("llmfast::triton_attention_fwd", mutates_args=())
def triton_attention_fwd(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], scale: float, window_left: int,
    window_right: int, softcap: float, dropout_p: float, seed: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    from ..triton import attention as kernels

    return kernels.attention_fwd(query, key, value, attn_mask, scale, window_left, window_right, softcap,
                                 dropout_p, seed)


@torch.library.custom_op("llmfast::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
    grad_lse: Optional[Tensor], attn_mask: Optional[Tensor], scale: float, window_left: int, window_right: int,
    softcap: float, dropout_p: float, seed: Optional[Tensor], mask_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from ..triton import attention as kernels

    return kernels.attention_bwd(grad_out, query, key, value, out, lse, grad_lse, attn_mask, scale, window_left,
                                 window_right, softcap, dropout_p, seed, mask_grad)


triton_attention_fwd.register_fake(_fwd_fake)
triton_attention_bwd.register_fake(_bwd_fake)
_register_autograd(triton_attention_fwd, triton_attention_bwd)
