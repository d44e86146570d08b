"""Registers the cross-entropy ops with torch.library.

Two op families share one contract (see csrc/cross_entropy/cross_entropy_ops.cpp):
  llmfast::cross_entropy_fwd / cross_entropy_fwd_inplace / cross_entropy_scale_grad_
      C++ schemas; CPU and CUDA kernels in llmfast._C
  llmfast::triton_cross_entropy_fwd / ..._fwd_inplace / ..._scale_grad_
      Python custom ops around llmfast/triton/cross_entropy.py
For each family this module registers the fake (meta) kernels used by torch.compile and the
autograd formula of the forward op, so it traces under torch.compile(fullgraph=True) and passes
opcheck (aot_dispatch with requires_grad excepted, see below). LinearCrossEntropyFunction, at the
end, builds the fused linear + cross-entropy of llmfast.functional.linear_cross_entropy on the
same ops.

Autograd. The forward computes the gradient of its loss output in the same pass over the logits
(for 'mean', with 1/sum(w[t]) folded in) and saves it; backward only multiplies it by the
upstream gradient, row by row, in place in the saved buffer (cross_entropy_scale_grad_, which
leaves rows whose factor is exactly 1 untouched: loss.backward() costs no extra pass). Because
the saved buffer is scaled in place, a second backward through the same graph
(retain_graph=True) is refused. lse and the gradient output are not differentiable, and the
gradient output belongs to autograd: a caller of the raw op that backpropagates through the loss
must not use it (backward rescales it; under torch.compile, using it as a graph output while
backpropagating is rejected by AOTAutograd). llmfast.functional never returns it.

inplace_backward: `cross_entropy_fwd_inplace` writes the gradient over the logits buffer (its
schema declares the mutation); `CrossEntropyInplaceFunction` wraps it in an autograd.Function
whose backward returns that buffer, scaled. The logits must then not be needed by anything else
(torch's version counter reports a saved tensor that was overwritten).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _extension
from .. import reference as _reference
from . import _create_graph
from ._transforms import is_transformed

_REDUCTION_NAMES = ("none", "mean", "sum")  # by the ops' reduction code

_TWICE = ("llmfast cross_entropy: backward ran twice through the same graph; the saved gradient is "
          "scaled in place during the first backward, so retain_graph=True is not supported")


def _loss_fake(logits, reduction):
    return logits.new_empty((logits.shape[0],) if reduction == 0 else (), dtype=torch.float32)


def _fwd_fake(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, compute_grad):
    loss = _loss_fake(logits, reduction)
    lse = logits.new_empty((logits.shape[0],), dtype=torch.float32)
    grad = logits.new_empty(logits.shape if compute_grad else (0,))
    return loss, lse, grad


def _fwd_inplace_fake(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap):
    return _loss_fake(logits, reduction), logits.new_empty((logits.shape[0],), dtype=torch.float32)


def _scale_fake(grad_logits, grad_output):
    return None


def _scaled(grad, grad_loss):
    """Out of place, what scale_grad_ does in place: grad (M, C) times the upstream gradient
    (one value, or one per row), in float32, returned in grad's dtype. The saved buffer is left
    as it was (so this backward may run again). For batched upstream gradients (see
    llmfast/ops/_transforms.py), where the in-place op cannot run."""
    factor = grad_loss.to(torch.float32)
    factor = factor.reshape(()) if factor.numel() == 1 else factor.reshape(-1, 1)
    return (grad.to(torch.float32) * factor).to(grad.dtype)


def _register_autograd(fwd_op, scale_op):
    def setup_context(ctx, inputs, output):
        compute_grad = inputs[-1]
        _, lse, grad = output
        ctx.mark_non_differentiable(lse, grad)
        ctx.compute_grad = compute_grad
        ctx.backward_done = False
        ctx.save_for_backward(grad)

    def backward(ctx, grad_loss, _grad_lse, _grad_grad):
        if not ctx.compute_grad:
            raise RuntimeError(
                "llmfast cross_entropy: the forward ran with compute_grad=False (no gradient was "
                "computed); call it with compute_grad=True when logits need a gradient")
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        (grad,) = ctx.saved_tensors
        if is_transformed(grad_loss):
            return (_scaled(grad, grad_loss),) + (None,) * 8
        if ctx.backward_done:
            raise RuntimeError(_TWICE)
        ctx.backward_done = True
        scale_op(grad, grad_loss.to(torch.float32).contiguous())
        return (grad,) + (None,) * 8

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


def make_inplace_function(fwd_inplace_op, scale_op):
    """autograd.Function for inplace_backward=True around a fwd_inplace op: forward overwrites
    logits with the (unscaled) gradient and returns the loss; backward scales that buffer in
    place and returns it."""

    class CrossEntropyInplaceFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap):
            loss, _ = fwd_inplace_op(logits, target, weight, reduction, ignore_index, label_smoothing,
                                     z_loss, softcap)
            # C++ ops with a mutable argument do not bump the version counter themselves (Python
            # custom ops do; one more bump is harmless): a node that saved the logits must see it.
            torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(logits)
            ctx.backward_done = False
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            if _create_graph.wants_graph():
                raise NotImplementedError(
                    "llmfast cross_entropy: a backward with create_graph=True (double backward) is not supported "
                    "with inplace_backward=True (the forward overwrote the logits it would need)")
            (grad,) = ctx.saved_tensors
            if is_transformed(grad_loss):
                return (_scaled(grad, grad_loss),) + (None,) * 7
            if ctx.backward_done:
                raise RuntimeError(_TWICE)
            ctx.backward_done = True
            scale_op(grad, grad_loss.to(torch.float32).contiguous())
            return grad, None, None, None, None, None, None, None

    return CrossEntropyInplaceFunction


# --- C++ / CUDA kernels from llmfast._C ------------------------------------------------------
CppInplaceFunction = None
if _extension.has_extension and hasattr(torch.ops.llmfast, "cross_entropy_fwd"):
    torch.library.register_fake("llmfast::cross_entropy_fwd")(_fwd_fake)
    torch.library.register_fake("llmfast::cross_entropy_fwd_inplace")(_fwd_inplace_fake)
    torch.library.register_fake("llmfast::cross_entropy_scale_grad_")(_scale_fake)
    _register_autograd("llmfast::cross_entropy_fwd", torch.ops.llmfast.cross_entropy_scale_grad_.default)
    CppInplaceFunction = make_inplace_function(torch.ops.llmfast.cross_entropy_fwd_inplace.default,
                                               torch.ops.llmfast.cross_entropy_scale_grad_.default)


# --- Triton kernels ---------------------------------------------------------------------------
@torch.library.custom_op("llmfast::triton_cross_entropy_fwd", mutates_args=())
def triton_cross_entropy_fwd(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], reduction: int, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: Optional[float], compute_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    from ..triton import cross_entropy as kernels

    return kernels.cross_entropy_fwd(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                                     softcap, compute_grad)


@torch.library.custom_op("llmfast::triton_cross_entropy_fwd_inplace", mutates_args=("logits",))
def triton_cross_entropy_fwd_inplace(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], reduction: int, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: Optional[float],
) -> Tuple[Tensor, Tensor]:
    from ..triton import cross_entropy as kernels

    return kernels.cross_entropy_fwd_inplace(logits, target, weight, reduction, ignore_index, label_smoothing,
                                             z_loss, softcap)


@torch.library.custom_op("llmfast::triton_cross_entropy_scale_grad_", mutates_args=("grad_logits",))
def triton_cross_entropy_scale_grad_(grad_logits: Tensor, grad_output: Tensor) -> None:
    from ..triton import cross_entropy as kernels

    kernels.cross_entropy_scale_grad_(grad_logits, grad_output)


triton_cross_entropy_fwd.register_fake(_fwd_fake)
triton_cross_entropy_fwd_inplace.register_fake(_fwd_inplace_fake)
triton_cross_entropy_scale_grad_.register_fake(_scale_fake)
_register_autograd(triton_cross_entropy_fwd, triton_cross_entropy_scale_grad_)
TritonInplaceFunction = make_inplace_function(triton_cross_entropy_fwd_inplace, triton_cross_entropy_scale_grad_)


# --- eager autograd -----------------------------------------------------------------------------
class CrossEntropyFunction(torch.autograd.Function):
    """Eager-mode autograd for a cross-entropy forward op (C++ or Triton), with the registered
    formula's behaviour: the forward computes and saves the gradient, backward scales it in
    place. It calls the op straight below the autograd dispatch key (the generic autograd
    wrapper of a custom op costs tens of microseconds of Python a call) and, for a double
    backward, recomputes through the reference from weak references to its inputs
    (llmfast/ops/_create_graph.py). torch.compile sees the registered formula instead.

    input2d / target1d / weight1d are the kernels' (M, C) / (M,) / (C,) operands made from
    `input` / `target` / `weight` (the caller's tensors, kept as weak references only);
    grad_view turns the (M, C) gradient back into input's shape."""

    @staticmethod
    def forward(ctx, input, target, weight, input2d, target1d, weight1d, grad_view, fwd_op, scale_op, reduction,
                options):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            loss, _, grad = fwd_op(input2d, target1d, weight1d, reduction, *options, True)
        ctx.save_for_backward(grad)
        ctx.scale_op, ctx.grad_view, ctx.reduction, ctx.options = scale_op, grad_view, reduction, options
        ctx.inputs = _create_graph.InputRefs("cross_entropy", input=input, target=target, weight=weight)
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.needs_input_grad[0]:
            return (None,) * 11
        if _create_graph.wants_graph():  # create_graph=True: gradients with a graph, from the reference
            refs = ctx.inputs.get()
            ignore_index, label_smoothing, z_loss, softcap = ctx.options

            def loss_fn(x):
                loss = _reference.cross_entropy(x, refs["target"], refs["weight"], ignore_index,
                                                _REDUCTION_NAMES[ctx.reduction],
                                                label_smoothing, z_loss=z_loss, softcap=softcap)
                return loss.reshape(grad_loss.shape)

            (grad,) = _create_graph.reference_grads(loss_fn, (refs["input"],), (True,), (grad_loss,))
            return (grad,) + (None,) * 10
        (grad,) = ctx.saved_tensors
        if is_transformed(grad_loss):
            return (ctx.grad_view(_scaled(grad, grad_loss)),) + (None,) * 10
        if ctx.backward_done:
            raise RuntimeError(_TWICE)
        ctx.backward_done = True
        with torch._C._AutoDispatchBelowADInplaceOrView():
            ctx.scale_op(grad, grad_loss.to(torch.float32).reshape(-1).contiguous())
        return (ctx.grad_view(grad),) + (None,) * 10


# --- fused linear + cross-entropy -------------------------------------------------------------
def default_chunk_rows(n_rows, vocab, elt_size):
    """Rows per chunk of linear_cross_entropy: a chunk of logits of about 256 MiB (1024 rows of
    a 128K bf16 vocabulary), a multiple of 256 rows so the matmuls keep full tiles, at least
    256 rows (matmul efficiency), never more than n_rows."""
    rows = (1 << 28) // max(1, vocab * elt_size)
    rows = max(256, rows // 256 * 256)
    return max(1, min(n_rows, rows))


def _target_weight_sum(target, class_weight, ignore_index, V):
    """'mean''s divisor, as torch's: the sum over rows with a valid target (not ignore_index,
    in [0, V)) of its class weight (1 without weights), fp32, 0-d."""
    valid = (target != ignore_index) & (target >= 0) & (target < V)
    if class_weight is None:
        return valid.sum(dtype=torch.float32)
    return torch.where(valid, class_weight.float()[target.clamp(0, max(V - 1, 0))], 0.0).sum()


def _weight_grad_buffer(weight, n_rows):
    """The (V, D) weight-gradient buffer of linear_cross_entropy: left unfilled, since the first
    chunk writes it (_add_weight_grad), which saves a fill and a read of zeros (~0.7 ms of
    memory traffic at V = 128256, D = 4096 in bf16); zeros when there is no chunk at all."""
    return weight.new_zeros(weight.shape) if n_rows == 0 else weight.new_empty(weight.shape)


def _add_weight_grad(grad_w, grad_logits, x_chunk, first):
    """grad_w (+)= grad_logits.T @ x_chunk: written by the first chunk, added by the others."""
    if first:
        torch.mm(grad_logits.t(), x_chunk, out=grad_w)
    else:
        grad_w.addmm_(grad_logits.t(), x_chunk)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss of (input @ weight.T + bias) without materialising the (M, V) logits.

    The rows are processed in chunks of `chunk` rows: a chunk's logits come from one matmul
    (cuBLAS through torch), the cross-entropy kernel overwrites them with their gradient
    (cross_entropy_fwd_inplace, 'sum' reduction), and two more matmuls turn that into the
    chunk's share of grad_input and grad_weight (written by the first chunk, then accumulated
    in weight's dtype with addmm_, as Liger-Kernel does) and grad_bias (fp32). For 'mean' the
    1 / (non-ignored count) factor is applied to the chunk of input (and to grad_input), small
    tensors, never to the logits.
    For 'mean' / 'sum' this happens in the forward (the upstream gradient is a scalar that
    backward applies with the scale op, free when it is 1); for 'none' the upstream gradient
    differs per row, so the forward only computes the losses and backward recomputes each
    chunk's logits (one extra matmul per chunk) and scales its rows before the matmuls.

    Extra memory beyond the gradients themselves: one chunk of logits (chunk x V, input dtype)
    and an fp32 (V,) bias-gradient accumulator.
    """

    @staticmethod
    def forward(ctx, input, weight, target, bias, class_weight, reduction, ignore_index, label_smoothing, z_loss,
                softcap, chunk, fwd_op, fwd_inplace_op, scale_op):
        if not torch.compiler.is_compiling():  # (compiled graphs have no double backward)
            ctx.inputs = _create_graph.InputRefs("linear_cross_entropy", input=input, weight=weight, target=target,
                                                 bias=bias, class_weight=class_weight)
        ctx.input_shape = input.shape
        input = input.reshape(-1, input.shape[-1]).contiguous()
        target = target.reshape(-1).to(torch.int64).contiguous()
        M = input.shape[0]
        V = weight.shape[0]
        opts = (ignore_index, label_smoothing, z_loss, softcap)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[3]
        # (torch.export records the forward only: gradients made there would be graph outputs
        # written by out= matmuls, which an exported module cannot differentiate through)
        eager_grads = reduction != 0 and (need_x or need_w or need_b) and not torch.compiler.is_exporting()
        if reduction == 1:
            count = _target_weight_sum(target, class_weight, ignore_index, V)
            inv_count = 1.0 / count  # the loss is NaN when every target is ignored, as torch's
            grad_factor = torch.where(count > 0, inv_count, torch.zeros_like(inv_count))  # zero gradients then
        else:
            inv_count = grad_factor = None

        grad_x = torch.empty_like(input) if eager_grads and need_x else None
        grad_w = _weight_grad_buffer(weight, M) if eager_grads and need_w else None
        grad_b = torch.zeros((V,), dtype=torch.float32, device=input.device) if eager_grads and need_b else None
        losses = []
        for start in range(0, M, chunk):
            x_c = input[start:start + chunk]
            t_c = target[start:start + chunk]
            logits = torch.addmm(bias, x_c, weight.t()) if bias is not None else torch.mm(x_c, weight.t())
            if not eager_grads:
                loss_c, _, _ = fwd_op(logits, t_c, class_weight, 0 if reduction == 0 else 2, *opts, False)
                losses.append(loss_c)
                continue
            loss_c, _ = fwd_inplace_op(logits, t_c, class_weight, 2, *opts)  # logits now hold d loss_sum / d logits
            losses.append(loss_c)
            if grad_factor is not None:
                x_c = x_c * grad_factor.to(x_c.dtype)
            if need_x:
                torch.mm(logits, weight, out=grad_x[start:start + chunk])
                if grad_factor is not None:
                    grad_x[start:start + chunk].mul_(grad_factor.to(grad_x.dtype))
            if need_w:
                _add_weight_grad(grad_w, logits, x_c, first=start == 0)
            if need_b:
                grad_b += logits.sum(0, dtype=torch.float32) * (grad_factor if grad_factor is not None else 1.0)
            del logits

        if reduction == 0:
            loss = torch.cat(losses) if losses else input.new_empty((0,), dtype=torch.float32)
        else:
            loss = torch.stack(losses).sum() if losses else input.new_zeros((), dtype=torch.float32)
            if inv_count is not None:
                loss = loss * inv_count
        ctx.reduction = reduction
        ctx.opts = opts
        ctx.chunk = chunk
        ctx.ops = (fwd_inplace_op, scale_op)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.backward_done = False
        ctx.eager_grads = eager_grads
        if eager_grads:
            ctx.save_for_backward(grad_x, grad_w, grad_b)
        else:
            ctx.save_for_backward(input, weight, target, bias, class_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if _create_graph.wants_graph():  # create_graph=True: gradients with a graph, from the reference
            return _linear_reference_backward(ctx, grad_loss)
        if is_transformed(grad_loss):
            return _linear_transformed_backward(ctx, grad_loss)
        if ctx.backward_done:
            raise RuntimeError(_TWICE)
        ctx.backward_done = True
        fwd_inplace_op, scale_op = ctx.ops
        grad_loss = grad_loss.to(torch.float32).contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[3]
        if ctx.eager_grads:
            grad_x, grad_w, grad_b = ctx.saved_tensors
            for g in (grad_x, grad_w):
                if g is not None:
                    scale_op(g, grad_loss.reshape(1))
            if grad_b is not None:
                grad_b = grad_b * grad_loss
        else:
            # 'none' (each row's upstream gradient is only known now), or a forward traced without
            # its gradients (torch.export; torch < 2.14's torch.compile, where is_exporting() is
            # True while tracing): each chunk's logits again, their gradient scaled row by row
            input, weight, target, bias, class_weight = ctx.saved_tensors
            M = input.shape[0]
            V = weight.shape[0]
            factor = _row_factor(ctx, grad_loss, target, class_weight, V)
            grad_x = torch.empty_like(input) if need_x else None
            grad_w = _weight_grad_buffer(weight, M) if need_w else None
            grad_b = torch.zeros((V,), dtype=torch.float32, device=input.device) if need_b else None
            for start in range(0, M, ctx.chunk):
                x_c = input[start:start + ctx.chunk]
                logits = torch.addmm(bias, x_c, weight.t()) if bias is not None else torch.mm(x_c, weight.t())
                fwd_inplace_op(logits, target[start:start + ctx.chunk], class_weight, 0, *ctx.opts)
                scale_op(logits, factor[start:start + ctx.chunk] if ctx.reduction == 0 else factor)
                if need_x:
                    torch.mm(logits, weight, out=grad_x[start:start + ctx.chunk])
                if need_w:
                    _add_weight_grad(grad_w, logits, x_c, first=start == 0)
                if need_b:
                    grad_b += logits.sum(0, dtype=torch.float32)
                del logits
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return (grad_x.view(ctx.input_shape) if need_x else None, grad_w if need_w else None, None,
                grad_b if need_b else None, None, None, None, None, None, None, None, None, None, None)


def _row_factor(ctx, grad_loss, target, class_weight, V):
    """What each row's loss gradient (the kernel's 'none' gradient) is scaled by in a backward
    that recomputes the logits: grad_loss (M,) for 'none'; else one value (1,), the upstream
    gradient, over the valid targets' weight sum for 'mean' (0 when that sum is 0)."""
    if ctx.reduction == 0:
        return grad_loss.reshape(-1)
    factor = grad_loss.reshape(1)
    if ctx.reduction == 1:
        count = _target_weight_sum(target, class_weight, ctx.opts[0], V)
        factor = torch.where(count > 0, factor / count, torch.zeros_like(factor))
    return factor


def _linear_transformed_backward(ctx, grad_loss):
    """LinearCrossEntropyFunction.backward for a batched upstream gradient (see is_transformed):
    the same chunked computation with every product out of place (no in-place scaling of a
    saved buffer, no out= matmul into an unbatched one). Saved buffers are not modified."""
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[3]
    if ctx.eager_grads:
        grad_x, grad_w, grad_b = ctx.saved_tensors
        grad_x = _scaled(grad_x, grad_loss) if need_x else None
        grad_w = _scaled(grad_w, grad_loss) if need_w else None
        grad_b = grad_b * grad_loss.to(torch.float32) if need_b else None
    else:
        fwd_inplace_op, _ = ctx.ops
        input, weight, target, bias, class_weight = ctx.saved_tensors
        factor = _row_factor(ctx, grad_loss.to(torch.float32), target, class_weight, weight.shape[0])
        xs, grad_w, grad_b = [], None, None
        for start in range(0, input.shape[0], ctx.chunk):
            x_c = input[start:start + ctx.chunk]
            logits = torch.addmm(bias, x_c, weight.t()) if bias is not None else torch.mm(x_c, weight.t())
            fwd_inplace_op(logits, target[start:start + ctx.chunk], class_weight, 0, *ctx.opts)  # its own buffer
            g = _scaled(logits, factor[start:start + ctx.chunk] if ctx.reduction == 0 else factor)
            if need_x:
                xs.append(g @ weight)
            if need_w:
                part = g.t() @ x_c
                grad_w = part if grad_w is None else grad_w + part
            if need_b:
                part = g.sum(0, dtype=torch.float32)
                grad_b = part if grad_b is None else grad_b + part
        if need_x:
            grad_x = torch.cat(xs) if xs else torch.zeros_like(input)
        if need_w and grad_w is None:
            grad_w = torch.zeros_like(weight)
        if need_b and grad_b is None:
            grad_b = torch.zeros((weight.shape[0],), dtype=torch.float32, device=input.device)
    if need_b:
        grad_b = grad_b.to(ctx.bias_dtype)
    return (grad_x.view(ctx.input_shape) if need_x else None, grad_w if need_w else None, None,
            grad_b if need_b else None, None, None, None, None, None, None, None, None, None, None)


def _linear_reference_backward(ctx, grad_loss):
    """LinearCrossEntropyFunction's gradients recomputed through llmfast.reference with a graph
    (double backward), from the caller's tensors (weak references, see _create_graph)."""
    refs = ctx.inputs.get()
    ignore_index, label_smoothing, z_loss, softcap = ctx.opts

    def loss_fn(x, w, b):
        loss = _reference.linear_cross_entropy(x, w, refs["target"], b, weight=refs["class_weight"],
                                               ignore_index=ignore_index,
                                               reduction=_REDUCTION_NAMES[ctx.reduction],
                                               label_smoothing=label_smoothing,
                                               z_loss=z_loss, softcap=softcap)
        return loss.reshape(grad_loss.shape)

    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3])
    grad_x, grad_w, grad_b = _create_graph.reference_grads(loss_fn, (refs["input"], refs["weight"], refs["bias"]),
                                                           needs, (grad_loss,))
    return (grad_x, grad_w, None, grad_b) + (None,) * 10
