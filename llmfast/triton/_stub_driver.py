"""A stand-in for Triton's CUDA driver, so that Triton's real launch path (JITFunction.run:
binding, specialization, compilation for sm_90, the compiled-kernel cache) runs on a machine
without a GPU. The stub's kernel launcher records its arguments instead of launching. Used by
tests/test_triton_fast_launch.py and scripts/triton_launch_cost.py to check and time
llmfast/triton/_launch.py against Triton's own path.

    with stub_driver() as launches:   # launches: the list of recorded launcher calls
        kernel[grid](*args)           # compiles for sm_90 (ptxas from Triton's wheel), records
"""
import contextlib

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

__all__ = ["StubLauncher", "StubDriver", "stub_driver", "release_kernels", "same_launch"]


class StubLauncher:
    """A compiled kernel's launcher: appends each call's arguments (grid x, y, z, stream,
    function, packed metadata, launch metadata, enter hook, exit hook, kernel arguments...)
    to `calls` and keeps the last in `last`."""
    calls = []
    last = None

    def __init__(self, src, metadata):
        self.src, self.metadata = src, metadata

    def __call__(self, *args):
        StubLauncher.last = args
        StubLauncher.calls.append(args)


class _StubUtils:
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return object(), f"function:{name}", 64, 0, 1024  # module, function, registers, spills, max threads

    def unload_module(self, module):
        pass


class StubDriver:
    """What JITFunction.run and CompiledKernel ask of a driver, for `target` (default sm_90)."""
    utils = _StubUtils()
    launcher_cls = StubLauncher

    def __init__(self, target=None, device=0, stream=0):
        self.target = target or GPUTarget("cuda", 90, 32)
        self.device, self.stream = device, stream

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return self.stream

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def stub_driver(stub=None):
    """Makes `stub` (default StubDriver()) Triton's active driver for the block and yields the
    list of launcher calls recorded in it."""
    previous = driver._active
    driver.set_active(stub or StubDriver())
    StubLauncher.calls = []
    try:
        yield StubLauncher.calls
    finally:
        driver._active = previous


def release_kernels(*jit_functions):
    """Drops the compiled kernels that `jit_functions` (JITFunctions) made under a stub driver,
    marked unloaded: otherwise their finalizers would ask the real driver, which a machine
    without a GPU does not have, to unload the stub's modules."""
    for fn in jit_functions:
        for cache in getattr(fn, "device_caches", {}).values():
            for kernel in list(cache[0].values()):
                kernel.module = None
            cache[0].clear()


def _quiet(hook):
    return hook is None or not getattr(hook, "calls", True)


def same_launch(a, b, hooks=False):
    """Same grid, stream, function, packed metadata and kernel arguments (the tensors
    themselves, the scalars with their types). With hooks, the launch metadata and hooks too;
    without, both calls' hooks must call nothing (the fast path then passes None throughout)."""
    if len(a) != len(b) or a[:6] != b[:6]:
        return False
    if hooks:
        if (a[6] is None) != (b[6] is None) or (a[6] is not None and a[6].get() != b[6].get()):
            return False
        if a[7] is not b[7] or a[8] is not b[8]:
            return False
    elif not all(_quiet(h) for h in (*a[7:9], *b[7:9])):
        return False
    return all(u is v if isinstance(u, torch.Tensor) else (type(u) is type(v) and u == v)
               for u, v in zip(a[9:], b[9:]))
