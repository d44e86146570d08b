"""Runs the providers of each op over its shapes and modes and returns result records.

One record per (op, shape, provider, mode): median/p20/p80 time, effective GB/s (or TFLOP/s),
% of the measured copy ceiling, peak extra memory (CUDA), the forward's error against
llmfast.reference, and speed-ups against torch eager and torch.compile measured in the same
run. A provider that fails records the error and the run goes on; one that cannot run a shape
(spec.Unavailable, or a torch.compile failure) is recorded as skipped. A provider that writes
over its inputs (Provider.clobbers_inputs) runs on a private copy of them.
"""
import sys
import traceback

import torch

from . import timing
from .spec import Unavailable, mode_fn, providers_for

# Forward output error against llmfast.reference, as max|out - ref| / max(1, max|ref|), above
# which a result is flagged: a fast wrong kernel must not pass for a fast one.
ERR_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _err_text(exc):
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


def _forward_error(outputs, reference):
    if not isinstance(outputs, (tuple, list)):
        outputs = (outputs,)
    worst = 0.0
    for out, ref in zip(outputs, reference):
        out = out.detach().float()
        ref = ref.detach().float()
        if out.shape != ref.shape:
            return float("inf")
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
        diff = (out - ref).abs().max().item() if ref.numel() else 0.0
        if diff != diff:  # NaN
            return float("inf")
        worst = max(worst, diff / scale)
    return worst


def _free(device):
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception:  # a sticky CUDA error: every later call records it as its error
            pass


def _measure_provider(spec, provider, case, reference, shape, dtype, device, modes, quick, copy_gbps, log,
                      verbose):
    elt = torch.empty((), dtype=dtype).element_size()
    base = {
        "op": spec.name, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
        "provider": provider.name, "family": provider.family,
    }
    if provider.note:
        base["note"] = provider.note
    try:
        if provider.clobbers_inputs:
            case = case.clone()  # it writes over its inputs: the next providers need them intact
        forward = provider.build(spec, case)
        outputs = forward(case.args)  # first call compiles / autotunes
        max_err = _forward_error(outputs, reference)
        del outputs
    except Exception as exc:
        case = None
        _free(device)
        status = "skipped" if provider.family == "torch.compile" or isinstance(exc, Unavailable) else "error"
        what = "torch.compile failed: " if provider.family == "torch.compile" else ""
        log(f"  {provider.name}: {status}: {what}{_err_text(exc)}")
        if verbose:
            traceback.print_exc()
        return [dict(base, mode=m, status=status, error=what + _err_text(exc)) for m in modes]

    records = []
    for mode in modes:
        rec = dict(base, mode=mode)
        fn = None
        try:
            fn = mode_fn(forward, case, mode)
            for _ in range(2):  # compiles the backward, warms autotuners and caches
                fn()
            timing.synchronize(device)
            t = timing.measure(fn, device, quick=quick)
            mem = timing.peak_extra_bytes(fn, device)
        except Exception as exc:
            fn = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rec.update(status="error", error=_err_text(exc))
            log(f"  {provider.name} {mode}: error: {rec['error']}")
            if verbose:
                traceback.print_exc()
            records.append(rec)
            continue
        fn = None  # frees the retained graph of the bwd mode before the next mode
        rec.update(status="ok", **t)
        ms = t["ms"]
        nbytes = spec.bytes(shape, elt, mode) if spec.bytes else None
        nflops = spec.flops(shape, mode) if spec.flops else None
        rec["bytes"] = nbytes
        rec["gbps"] = nbytes / (ms * 1e-3) / 1e9 if nbytes else None
        rec["pct_of_copy"] = 100.0 * rec["gbps"] / copy_gbps if rec["gbps"] and copy_gbps else None
        rec["flops"] = nflops
        rec["tflops"] = nflops / (ms * 1e-3) / 1e12 if nflops else None
        rec["peak_extra_mb"] = mem / 2**20 if mem is not None else None
        rec["max_err"] = max_err
        rec["err_ok"] = max_err <= ERR_TOL.get(dtype, 1e-4)
        records.append(rec)
        rate = f"{rec['gbps']:.1f} GB/s" if rec["gbps"] else (f"{rec['tflops']:.1f} TFLOP/s" if rec["tflops"] else "")
        if spec.report_memory and rec["peak_extra_mb"] is not None:
            rate += f"  peak +{rec['peak_extra_mb']:.0f} MB"
        log(f"  {provider.name:18s} {mode:8s} {ms:9.4f} ms  {rate}")
    return records


def add_speedups(records):
    """speedup_vs_torch / speedup_vs_compile on every ok record: the peer's median time over
    this record's, same op, shape, dtype and mode, same run."""
    groups = {}
    for r in records:
        groups.setdefault((r["op"], tuple(r["shape"]), r["dtype"], r["mode"]), []).append(r)
    for group in groups.values():
        ms = {r["provider"]: r["ms"] for r in group if r.get("status") == "ok"}
        for r in group:
            if r.get("status") != "ok":
                continue
            for peer, key in (("torch", "speedup_vs_torch"), ("torch.compile", "speedup_vs_compile")):
                r[key] = ms[peer] / r["ms"] if peer in ms else None


def run_op(spec, device, dtype, *, quick=False, shapes=None, only=None, modes=None,
           copy_gbps=None, log=None, verbose=False):
    """Benchmarks one op. Returns (records, skipped), skipped mapping provider -> reason."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    modes = [m for m in spec.modes if not modes or m in modes]
    providers, skipped = providers_for(spec, device, only)
    for name, why in skipped.items():
        log(f"{spec.name}: provider {name} skipped: {why}")
    records = []
    for shape in shapes or spec.shapes_for(device, quick):
        shape = tuple(shape)
        log(f"{spec.name} {'x'.join(map(str, shape))} {dtype} on {device}")
        torch.manual_seed(0)
        try:
            case = spec.make_case(shape, dtype, device)
            with torch.no_grad():
                reference = spec.reference({k: v.detach() if isinstance(v, torch.Tensor) else v
                                            for k, v in case.args.items()})
        except Exception as exc:  # e.g. out of memory for the inputs themselves
            _free(device)
            log(f"  inputs: error: {_err_text(exc)}")
            for p in providers:
                for m in modes:
                    records.append({"op": spec.name, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                                    "provider": p.name, "family": p.family, "mode": m,
                                    "status": "error", "error": "inputs: " + _err_text(exc)})
            continue
        for p in providers:
            records += _measure_provider(spec, p, case, reference, shape, dtype, device, modes,
                                         quick, copy_gbps, log, verbose)
            _free(device)
        del case, reference
        _free(device)
    add_speedups(records)
    return records, skipped
