"""Host time of a Triton launch in Python, Triton's own `kernel[grid](...)` against llmfast's
fast path (llmfast/triton/_launch.py), for the real launch arguments of llmfast's attention,
norm and cross-entropy kernels. Runs without a GPU:
- each launcher runs once on CPU tensors with its kernels replaced by recorders;
- Triton's driver is replaced by a stub that names an sm_90 target and whose kernel launcher
  only counts its calls, so each recorded launch goes through Triton's real JITFunction.run
  (binder, cache key, compiled-kernel lookup; the kernels are compiled for sm_90 on first use,
  which takes a minute or two) and through the fast path;
- per launch: the microseconds of each path (best of 9 loops of 2000, the two paths
  interleaved), and whether both hand the
  launcher the same arguments.
What is not timed is the same on both paths: the compiled launcher's argument packing and
cuLaunchKernel.

Run: python scripts/triton_launch_cost.py [OUT.json]   (written against Triton 3.8; the GPU
machine's Triton 3.6 has the same JITFunction.run structure)
"""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the real JITFunction, not the interpreter's

import torch  # noqa: E402
import triton  # noqa: E402

import llmfast.triton.attention as ta  # noqa: E402
import llmfast.triton.cross_entropy as tce  # noqa: E402
import llmfast.triton.norm as tn  # noqa: E402
from llmfast.bench.timing import best_loop_us  # noqa: E402
from llmfast.triton._stub_driver import StubLauncher, release_kernels, same_launch, stub_driver  # noqa: E402


class _Recorder:
    """Stands in for a kernel: records (kernel, grid, args, kwargs) of each launch."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.kernel, grid, args, kwargs))


def record_launches():
    log = []
    kernels = ((ta, ("_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel")),
               (tn, ("_norm_fwd_kernel", "_norm_bwd_kernel", "_sum_partials_kernel")),
               (tce, ("_ce_target_weight_kernel", "_ce_fwd_kernel")))
    saved = []
    for module, names in kernels:
        if hasattr(module, "_INTERPRET"):
            saved.append((module, "_INTERPRET", module._INTERPRET))
            module._INTERPRET = True  # the launchers' CPU-tensor checks
        for name in names:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _Recorder(getattr(module, name), log))
    try:
        q = torch.randn(8, 16, 1024, 64, dtype=torch.bfloat16)
        out, lse = ta.attention_fwd(q, q, q, None, 0.125, -1, 0, 0.0)
        ta.attention_bwd(out, q, q, q, out, lse, None, None, 0.125, -1, 0, 0.0)
        x = torch.randn(8, 768, dtype=torch.bfloat16)
        w = torch.randn(768, dtype=torch.bfloat16)
        _, _, mean, rstd = tn.norm_fwd(x, None, w, w, 1e-5, False)
        tn.norm_bwd(x, None, x, w, mean, rstd, False, True, True)
        logits = torch.randn(64, 32000, dtype=torch.bfloat16)
        os.environ["TRITON_INTERPRET"] = "1"  # the CE launchers read it for their CPU-tensor checks
        tce.cross_entropy_fwd(logits, torch.randint(0, 32000, (64,)), None, 1, -100, 0.0, 0.0, None, True)
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
    return log


def main(out_path=None):
    log = record_launches()
    results = []
    with stub_driver():
        for kernel, grid, args, kwargs in log:
            name = kernel.jit.fn.__name__
            kernel.jit[grid](*args, **kwargs)  # compiles for sm_90
            triton_call = StubLauncher.last
            kernel[grid](*args, **kwargs)  # the fast path's first launch: Triton's, kept
            kernel[grid](*args, **kwargs)  # a fast launch
            same = same_launch(triton_call, StubLauncher.last)
            us_triton = us_fast = float("inf")
            for _ in range(3):  # interleaved, best of all: this machine's noise hits both alike
                us_triton = min(us_triton, best_loop_us(lambda: kernel.jit[grid](*args, **kwargs), iters=2000,
                                                        reps=3))
                us_fast = min(us_fast, best_loop_us(lambda: kernel[grid](*args, **kwargs), iters=2000, reps=3))
            results.append(dict(kernel=name, args=len(args), kwargs=len(kwargs), triton_us=round(us_triton, 2),
                                fast_us=round(us_fast, 2), same_launch=same))
            print(f"{name:28s} {len(args):3d} args {len(kwargs):3d} kwargs   triton {us_triton:6.1f} us   "
                  f"fast {us_fast:6.1f} us   same launch: {same}", flush=True)
        release_kernels(*{kernel.jit for kernel, _, _, _ in log})
    total_t = sum(r["triton_us"] for r in results)
    total_f = sum(r["fast_us"] for r in results)
    print(f"total for {len(results)} launches (attention fwd+bwd, LayerNorm fwd+bwd, CE fwd): "
          f"triton {total_t:.1f} us, fast {total_f:.1f} us")
    if out_path:
        torch_version, triton_version = torch.__version__, triton.__version__
        with open(out_path, "w") as f:
            json.dump(dict(torch=torch_version, triton=triton_version, threads=torch.get_num_threads(),
                           launches=results, total_triton_us=round(total_t, 1), total_fast_us=round(total_f, 1)),
                      f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
