"""What Triton's launcher costs in Python per launch, before the driver is called: the binder
(argument specialization) and the cache key, for the real launch arguments of llmfast's
attention and norm kernels. Runs without a GPU: the launchers run once with the kernels
replaced by recorders, Triton's driver is replaced by a stub naming an sm_90 target, and
each recorded launch's binder + key is timed (best of 5 loops). The compiled kernel's own
launch (argument packing, cuLaunchKernel) is not included.

Run: python scripts/triton_launch_cost.py   (us per launch; written against Triton 3.8's
JITFunction internals: create_binder, compute_cache_key; the GPU machine's Triton 3.6 may
differ)
"""
import os

os.environ.pop("TRITON_INTERPRET", None)  # the real JITFunction, not the interpreter's

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime import jit  # noqa: E402

import llmfast.triton.attention as ta  # noqa: E402
import llmfast.triton.norm as tn  # noqa: E402
from llmfast.bench.timing import best_loop_us  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


class _Recorder:
    """Stands in for a kernel: records (kernel, grid, args, kwargs) of each launch."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.kernel, grid, args, kwargs))


class _StubDriver:
    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def record_launches():
    log = []
    for module, names in ((ta, ("_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dq_kernel",
                                "_attn_bwd_dkdv_kernel")),
                          (tn, ("_norm_fwd_kernel", "_norm_bwd_kernel", "_sum_partials_kernel"))):
        module._INTERPRET = True  # the launchers' CPU-tensor checks
        for name in names:
            setattr(module, name, _Recorder(getattr(module, name), log))
    q = torch.randn(8, 16, 1024, 64, dtype=torch.bfloat16)
    out, lse = ta.attention_fwd(q, q, q, None, 0.125, -1, 0, 0.0)
    ta.attention_bwd(out, q, q, q, out, lse, None, None, 0.125, -1, 0, 0.0)
    x = torch.randn(8, 768, dtype=torch.bfloat16)
    w = torch.randn(768, dtype=torch.bfloat16)
    _, _, mean, rstd = tn.norm_fwd(x, None, w, w, 1e-5, False)
    tn.norm_bwd(x, None, x, w, mean, rstd, False, True, True)
    return log


def main():
    log = record_launches()
    driver.set_active(_StubDriver())
    total = 0.0
    for kernel, grid, args, kwargs in log:
        _, key_cache, _, _, binder = kernel.create_binder()
        options = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)

        def bookkeeping():
            _, specialization, opts = binder(*args, **options)
            jit.compute_cache_key(key_cache, specialization, opts)

        us = best_loop_us(bookkeeping, iters=3000, reps=5)
        total += us
        print(f"{kernel.fn.__name__:28s} {len(args):3d} args {len(kwargs):3d} kwargs   binder + key {us:6.1f} us")
    print(f"total {total:.1f} us for {len(log)} launches (attention fwd+bwd, LayerNorm fwd+bwd)")


if __name__ == "__main__":
    main()
