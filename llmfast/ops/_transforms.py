"""Backward passes whose upstream gradients come batched.

torch.autograd.grad(..., is_grads_batched=True) (what torch.autograd.functional.jacobian(
vectorize=True) runs) and torch.func transforms wrapped around a backward hand the eager
autograd Functions batched (or otherwise functorch-wrapped) gradients, while their saved
tensors are plain. Batching rules cannot run an in-place op on a plain saved buffer, nor pass a
batched tensor to a Triton launcher (it has no storage); the Functions check is_transformed and
then take dispatcher ops (which batch by looping) or out-of-place torch ops instead.
"""
import torch

_functorch = torch._C._functorch


def is_transformed(*tensors):
    """True when any of `tensors` (None entries ignored) is batched or functorch-wrapped. (Never
    in a graph torch.compile traces: its gradients are plain there, and Dynamo cannot trace the
    functorch queries.)"""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is not None and (_functorch.is_legacy_batchedtensor(t) or _functorch.is_functorch_wrapped_tensor(t)):
            return True
    return False
