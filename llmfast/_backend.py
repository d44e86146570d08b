"""Backend selection: which implementation of an op runs.

Backends:
  cuda       CUDA C++ kernels compiled into llmfast._C (CUDA tensors)
  triton     Triton kernels in llmfast/triton/ (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
  cpu        C++ kernels compiled into llmfast._C (CPU tensors)
  reference  plain PyTorch in llmfast/reference/ (any device, any floating dtype): the
             definition of right

`auto` (the default) picks, for CUDA tensors, the faster of cuda/triton for each op as
measured on an H100 (AUTO_CUDA below, numbers in benchmarks/results/), and `cpu` for CPU
tensors. float64 inputs always take the reference path (no kernel is built for them).

The state is read at call time (LLMFAST_BACKEND, and use_backend's per-thread stack), so
torch.compile traces straight through the choice (and guards on it) instead of breaking the
graph.
"""
import contextlib
import importlib.util
import os
import threading

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _extension
from ._errors import BackendUnavailableError

BACKENDS = ("cuda", "triton", "cpu", "reference")

# The auto choice for CUDA tensors, per op, from the H100 run of 2026-11-23
# (benchmarks/results/summary_h100.md; bf16, torch 2.11, triton 3.6):
# - norm: cuda. Forward+backward, the training case, cuda is faster at every shape of
#   LayerNorm, RMSNorm and add+LayerNorm (e.g. LayerNorm 16384 x 4096: 0.263 ms against
#   triton's 0.725 ms); triton wins only some forward-only rows (N = 65536, by up to 25%).
# - cross_entropy: cuda. Faster or within 2% at every shape (8192 x 32000 fwd+bwd: 0.500 ms
#   against 0.716 ms).
# - linear_cross_entropy (the cross-entropy kernels on vocabulary chunks): triton, 2-5% faster
#   forward+backward (16384 x 2048 x 50304: 16.50 ms against 17.28).
# - attention: triton. Its kernels use Hopper's wgmma; the cuda ones (sm_80 mma.sync, 4 warps)
#   run at ~100 TFLOP/s, 3-4x slower (2 x 32 x 4096 x 128 causal fwd+bwd: 3.13 ms against 9.71).
AUTO_CUDA = {
    "norm": "cuda",
    "cross_entropy": "cuda",
    "linear_cross_entropy": "triton",
    "attention": "triton",
}

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Facts about this machine, fixed at import (TRITON_INTERPRET must be set before llmfast and
# triton are imported, as Triton itself requires).
_CUDA_RUNTIME = torch.cuda.is_available()
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Per-thread stacks of names pushed by use_backend(): a `with` block in one thread does not
# change what another thread runs (torch.compile guards on the calling thread's stack).
_local = threading.local()
_default = os.environ.get("LLMFAST_BACKEND", "auto").strip().lower() or "auto"


def _usable(name):
    if name == "cuda":
        return _extension.built_with_cuda and _CUDA_RUNTIME
    if name == "triton":
        return _TRITON_INSTALLED and (_CUDA_RUNTIME or _TRITON_INTERPRET)
    if name == "cpu":
        return _extension.has_extension
    return name == "reference"


_cuda_image = {}  # CUDA device index -> whether llmfast._C has code that device runs


def _cuda_kernels_run_on(device):
    """Whether the CUDA kernels in llmfast._C can run on `device` (a build for sm_80 and
    sm_90a has nothing a T4 or a Blackwell GPU can run). Asked once per device; assumed while
    torch.compile traces (the eager call before it asked)."""
    if torch.compiler.is_compiling():
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _cuda_image.get(index)
    if ok is None:
        ok = _cuda_image[index] = bool(_extension._C.cuda_kernels_run_on(index))
    return ok


def available_backends():
    """Names of the backends usable on this machine, fastest first."""
    return [name for name in BACKENDS if _usable(name)]


def _why_unavailable(name):
    if name == "cuda":
        if not _extension.has_extension:
            return f"llmfast._C could not be loaded ({_extension.load_error})"
        if not _extension.built_with_cuda:
            return "llmfast._C was built without its CUDA kernels"
        return "no CUDA device is available"
    if name == "triton":
        if not _TRITON_INSTALLED:
            return "triton is not installed"
        return "there is no CUDA device (set TRITON_INTERPRET=1 to run Triton on the CPU)"
    if name == "cpu":
        return f"llmfast._C could not be loaded ({_extension.load_error})"
    return "unknown reason"


def _check_name(name, where):
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"{where}: unknown backend {name!r}; expected one of 'auto', " + ", ".join(map(repr, BACKENDS))
        )


@contextlib.contextmanager
def use_backend(name):
    """Force one backend inside a `with` block (or as a decorator).

    >>> with llmfast.use_backend("triton"):
    ...     y = llmfast.functional.layer_norm(x, (768,))
    """
    name = str(name).strip().lower()
    _check_name(name, "use_backend")
    if name != "auto" and not _usable(name):
        raise BackendUnavailableError(f"use_backend({name!r}): backend unavailable: {_why_unavailable(name)}")
    stack = getattr(_local, "forced", None)
    if stack is None:
        stack = _local.forced = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def current_backend():
    """The backend name in force: a forced one, else LLMFAST_BACKEND, else 'auto'."""
    stack = getattr(_local, "forced", None)
    return stack[-1] if stack else _default


def resolve(op, device, dtype):
    """The backend that runs `op` for an input on `device` with `dtype`. Under torch.func
    transforms (vmap, grad, jacrev, ...) and forward-mode AD (torch.autograd.forward_ad dual
    levels) every op takes the reference path, whose plain torch ops support them (the kernels'
    autograd Functions do not: they would drop the tangents)."""
    name = current_backend()
    if name != "auto" and name not in BACKENDS:  # (a bad LLMFAST_BACKEND fails every call, not some)
        _check_name(name, "LLMFAST_BACKEND")
    if dtype not in _KERNEL_DTYPES:
        return "reference"
    if not torch.compiler.is_compiling() and (
        torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0
    ):
        return "reference"
    if name == "auto":
        if device.type == "cuda":
            preferred = AUTO_CUDA.get(op, "triton")
            for candidate in (preferred, "cuda", "triton"):
                if _usable(candidate) and (candidate != "cuda" or _cuda_kernels_run_on(device)):
                    return candidate
            return "reference"
        if device.type == "cpu" and _usable("cpu"):
            return "cpu"
        return "reference"
    if name == "reference":
        return name
    if not _usable(name):
        raise BackendUnavailableError(f"llmfast {op}: backend {name!r} is unavailable: {_why_unavailable(name)}")
    serves = {
        "cuda": device.type == "cuda",
        "triton": device.type == "cuda" or (device.type == "cpu" and _TRITON_INTERPRET),
        "cpu": device.type == "cpu",
    }[name]
    if not serves:
        raise BackendUnavailableError(
            f"llmfast {op}: backend {name!r} cannot run on a {device.type} tensor "
            f"(cuda and triton need CUDA tensors, cpu needs CPU tensors; 'reference' runs anywhere)"
        )
    if name == "cuda" and not _cuda_kernels_run_on(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise BackendUnavailableError(
            f"llmfast {op}: the CUDA kernels in llmfast._C were not built for this GPU "
            f"({torch.cuda.get_device_name(device)}, sm_{major}{minor}); rebuild with LLMFAST_CUDA_ARCHS naming "
            f"it, or use the 'triton' backend"
        )
    return name
