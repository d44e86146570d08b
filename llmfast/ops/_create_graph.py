"""Double backward for the eager autograd Functions of the kernels.

The kernels' backward passes are not themselves differentiable. When a backward runs with
create_graph=True (torch.autograd.grad(..., create_graph=True), gradient penalties,
torch.autograd.gradgradcheck), grad mode is on inside it; the Functions then recompute the
gradients through the plain-PyTorch reference (llmfast/reference/) with autograd, so the
returned gradients carry a graph and second derivatives are those of the reference, the
definition of right. An ordinary backward never comes here and costs nothing extra.

Ops that keep their inputs for backward anyway (norms, attention) recompute from what they
saved. The cross-entropy ops keep only the gradient they computed in the forward, not the
logits (that is their memory saving), so they hold weak references to their inputs instead
(InputRefs): a double backward works while the caller still holds the inputs unmodified (as
gradgradcheck and gradient-penalty code do) and raises a clear error otherwise.
"""
import weakref

import torch


def wants_graph():
    """True inside an eager backward that runs with create_graph=True (compiled graphs have no
    double backward; AOTAutograd may trace a backward with grad mode on)."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def reference_grads(fn, inputs, needs, grad_outputs):
    """The gradients of `fn(*inputs)` (a reference implementation returning a tensor or a tuple
    of tensors) with respect to each input i with needs[i], weighted by grad_outputs (None for an
    output without gradient), as tensors with a graph (create_graph=True). Inputs without
    needs[i] enter as constants. Returns one entry per input (None where not needed)."""
    with torch.enable_grad():
        leaves = []
        for t, need in zip(inputs, needs):
            if t is not None and need and not t.requires_grad:
                t = t.detach().requires_grad_()
            leaves.append(t)
        outs = fn(*leaves)
        if isinstance(outs, torch.Tensor):
            outs = (outs,)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
        wanted = [t for t, need in zip(leaves, needs) if need and t is not None]
        if not pairs or not wanted:
            grads = [None] * len(wanted)
        else:
            grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g.to(o.dtype) for o, g in pairs],
                                        create_graph=True, allow_unused=True)
    result, it = [], iter(grads)
    for t, need in zip(leaves, needs):
        if need and t is not None:
            g = next(it)
            result.append(torch.zeros_like(t) if g is None else g)
        else:
            result.append(None)
    return result


class InputRefs:
    """Weak references to a Function's input tensors and their version counters at forward
    time, for a double backward that must recompute from them (see the module docstring)."""

    def __init__(self, op, **tensors):
        self.op = op
        # (inference tensors have no version counter, and no autograd graph can use them anyway)
        self.refs = {name: None if t is None else (weakref.ref(t), None if t.is_inference() else t._version)
                     for name, t in tensors.items()}

    def get(self):
        """The inputs by name; raises RuntimeError if one was freed or modified in place."""
        out = {}
        for name, ref in self.refs.items():
            if ref is None:
                out[name] = None
                continue
            t = ref[0]()
            if t is None:
                raise RuntimeError(
                    f"llmfast {self.op}: a backward with create_graph=True (double backward) recomputes the "
                    f"gradient from the forward's inputs, but '{name}' has been freed (the fused kernel does not "
                    f"keep it, to save memory); keep a reference to it until then, or use "
                    f"llmfast.use_backend('reference') for this computation")
            if ref[1] is not None and t._version != ref[1]:
                raise RuntimeError(
                    f"llmfast {self.op}: a backward with create_graph=True (double backward) recomputes the "
                    f"gradient from the forward's inputs, but '{name}' was modified in place after the forward")
            out[name] = t
        return out
