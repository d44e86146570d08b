"""Access to peer libraries (Liger-Kernel), each optional.

A peer that is not installed, or cannot run on the device, raises spec.Unavailable with the
reason, which the report prints instead of a result.
"""
import functools

from .spec import Unavailable


@functools.lru_cache(maxsize=None)
def _import_liger_ops():
    try:
        import liger_kernel.ops as liger_ops  # the package namespace picks the device's implementation
    except ImportError as exc:
        raise Unavailable(f"liger_kernel is not installed ({exc})") from None
    return liger_ops


def liger_function(name, submodule, device):
    """Liger-Kernel's autograd.Function `name` (e.g. 'LigerLayerNormFunction'), from
    liger_kernel.ops, else from liger_kernel.ops.<submodule> (older releases)."""
    if device.type != "cuda":
        raise Unavailable("Liger-Kernel's Triton kernels need a CUDA device")
    ops = _import_liger_ops()
    fn = getattr(ops, name, None)
    if fn is None:
        import importlib

        try:
            fn = getattr(importlib.import_module(f"liger_kernel.ops.{submodule}"), name)
        except (ImportError, AttributeError) as exc:
            raise Unavailable(f"liger_kernel has no {name} ({exc})") from None
    return fn
