"""Timing and memory measurement, one entry point for CUDA and the CPU.

CUDA: triton.testing.do_bench (CUDA events, L2 flushed before every call, warm-up 25 ms,
measurement 100 ms) -> median, p20 and p80 in ms. CPU: time.perf_counter around each call for a
fixed time budget after a warm-up -> the same three quantiles; each call is synchronous there.
"""
import functools
import inspect
import time

import torch

CUDA_WARMUP_MS = 25
CUDA_REP_MS = 100
CPU_BUDGET_S = {False: 0.4, True: 0.12}  # per measurement, by `quick`
CPU_MIN_REPS = 5
CPU_MAX_REPS = 1000


def describe(device, quick):
    if device.type == "cuda":
        return (f"triton.testing.do_bench(warmup={CUDA_WARMUP_MS}, rep={CUDA_REP_MS}), CUDA events, "
                "L2 flushed before each call; median with p20/p80")
    return (f"time.perf_counter per call, {CPU_BUDGET_S[quick]} s per measurement after warm-up, "
            f"at least {CPU_MIN_REPS} calls; median with p20/p80")


def _quantile(sorted_values, q):
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@functools.lru_cache(maxsize=None)
def _do_bench_params():
    import triton.testing

    return triton.testing.do_bench, set(inspect.signature(triton.testing.do_bench).parameters)


def _measure_cuda(fn):
    do_bench, params = _do_bench_params()
    kwargs = {"warmup": CUDA_WARMUP_MS, "rep": CUDA_REP_MS}
    if "return_mode" in params:
        kwargs["return_mode"] = "median"
    if "quantiles" in params:
        res = do_bench(fn, quantiles=[0.5, 0.2, 0.8], **kwargs)
        if isinstance(res, (list, tuple)):
            return {"ms": float(res[0]), "p20_ms": float(res[1]), "p80_ms": float(res[2])}
        return {"ms": float(res), "p20_ms": None, "p80_ms": None}
    ms = float(do_bench(fn, **kwargs))
    return {"ms": ms, "p20_ms": None, "p80_ms": None}


def _measure_cpu(fn, budget_s):
    fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < CPU_MIN_REPS or (time.perf_counter() < deadline and len(times) < CPU_MAX_REPS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"ms": _quantile(times, 0.5), "p20_ms": _quantile(times, 0.2), "p80_ms": _quantile(times, 0.8)}


def measure(fn, device, quick=False):
    """Times fn() -> {'ms', 'p20_ms', 'p80_ms'} (milliseconds). fn must already be warm
    (compiled, autotuned): the warm-up here is for caches and clocks, not for compilers."""
    if device.type == "cuda":
        return _measure_cuda(fn)
    return _measure_cpu(fn, CPU_BUDGET_S[quick])


def best_loop_us(fn, iters, reps, sync=None):
    """Host microseconds per call of fn(): the best of `reps` timed loops of `iters` calls
    (interference only ever adds time), after max(10, iters // 10) warm-up calls; sync(), when
    given, ends the warm-up and each loop (e.g. a CUDA synchronize)."""
    for _ in range(max(10, iters // 10)):
        fn()
    if sync is not None:
        sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if sync is not None:
            sync()
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
    return best


def peak_extra_bytes(fn, device):
    """Peak memory allocated during one fn() beyond what was allocated before it, outputs
    included (CUDA caching allocator statistics); None on the CPU, which has no such counter."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return max(peak - before, 0)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
