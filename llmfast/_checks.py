"""Argument checks shared by the functional API. Every message names the function, the
argument and what was expected."""
import torch

from ._errors import LlmfastTypeError, LlmfastValueError

FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(fn, name, value):
    if not isinstance(value, torch.Tensor):
        raise LlmfastTypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")


def floating(fn, name, value):
    tensor(fn, name, value)
    if value.dtype not in FLOATING:
        raise LlmfastTypeError(
            f"{fn}: {name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {value.dtype}"
        )


def same_device(fn, name, value, ref_name, ref):
    if value.device != ref.device:
        raise LlmfastTypeError(f"{fn}: {name} must be on the same device as {ref_name} ({ref.device}), got {value.device}")


def shape_tuple(fn, name, value):
    if isinstance(value, int):
        return (value,)
    if isinstance(value, torch.Size):
        return tuple(value)
    try:
        shape = tuple(value)
    except TypeError:
        raise LlmfastTypeError(f"{fn}: {name} must be an int or a sequence of ints, got {type(value).__name__}") from None
    if not all(isinstance(d, int) for d in shape):
        raise LlmfastTypeError(f"{fn}: {name} must be an int or a sequence of ints, got {value!r}")
    return shape
