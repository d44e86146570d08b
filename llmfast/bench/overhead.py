"""Dispatch overhead of llmfast's Python + custom-op layer, on shapes too small for the kernel
to matter (8 x 768 and 1 x 64 LayerNorm, as in a decode step or a tiny model; a 1 x 8 x 128 x 64
causal attention).

Measures host wall time per call, synchronizing once after a loop of calls: with launches
asynchronous and kernels tiny, this is the CPU cost of argument checks, backend resolution,
torch.library dispatch and autograd bookkeeping -- the number to compare with torch eager.
The figure is the minimum over several loops (as timeit does): interference from other
processes only ever adds time. On CUDA, `llmfast-triton-tritonlaunch` is the triton backend
with its launches through Triton's own `kernel[grid](...)` instead of llmfast's fast path.
"""
import sys

import torch

from . import timing
from .spec import llmfast_backends, mode_fn, op_specs

# (op, shape): LayerNorm at a decode-step and a tiny size; a small causal attention (B, H, S, D,
# causal), where the kernels take microseconds and the host's work per call is what shows.
CASES = (("layer_norm", (8, 768)), ("layer_norm", (1, 64)), ("attention", (1, 8, 128, 64, 1)))
MODES = ("fwd", "fwd+bwd")


def _on_backend(spec, backend, fast_launch=True):
    def forward(args):
        import llmfast

        with llmfast.use_backend(backend):
            if fast_launch:
                return spec.llmfast_fn(args)
            from llmfast.triton._launch import fast_launch_enabled

            old = fast_launch_enabled(False)
            try:
                return spec.llmfast_fn(args)
            finally:
                fast_launch_enabled(old)
    return forward


def _providers(spec, device):
    providers = [("torch", spec.eager)]
    for backend in llmfast_backends(device):
        providers.append((f"llmfast-{backend}", _on_backend(spec, backend)))
        if backend == "triton" and torch.device(device).type == "cuda":
            # The same, through Triton's own launcher (llmfast/triton/_launch.py off): what the
            # fast launch path saves.
            providers.append(("llmfast-triton-tritonlaunch", _on_backend(spec, backend, fast_launch=False)))
    return providers


def measure_overhead(device, dtype, *, quick=False, cases=CASES, log=None):
    """Records (op 'overhead') of microseconds per call for torch eager and each llmfast
    backend, forward and forward+backward, with the difference to torch eager; `what` names
    the op measured (layer_norm, attention)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    specs = op_specs()
    iters, reps = (100, 5) if quick else (200, 9)
    records = []
    for what, shape in cases:
        spec = specs[what]
        torch.manual_seed(0)
        case = spec.make_case(tuple(shape), dtype, device)
        group = []
        for name, forward in _providers(spec, device):
            for mode in MODES:
                rec = {"op": "overhead", "what": what, "shape": list(shape),
                       "dtype": str(dtype).replace("torch.", ""), "provider": name, "mode": mode,
                       "measured": f"{what}, host us per call"}
                try:
                    us = timing.best_loop_us(mode_fn(forward, case, mode), iters, reps,
                                             lambda: timing.synchronize(device))
                    rec.update(status="ok", us=us, ms=us / 1e3)
                    log(f"  overhead {what} {'x'.join(map(str, shape))} {name:18s} {mode:8s} {us:8.1f} us")
                except Exception as exc:
                    rec.update(status="error", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                    log(f"  overhead {what} {name} {mode}: error: {rec['error']}")
                group.append(rec)
        base = {r["mode"]: r["us"] for r in group if r["provider"] == "torch" and r["status"] == "ok"}
        for r in group:
            if r["status"] == "ok" and r["mode"] in base:
                r["extra_us_vs_torch"] = r["us"] - base[r["mode"]]
                r["ratio_vs_torch"] = r["us"] / base[r["mode"]]
        records += group
    return records
