"""llmfast's benchmark report runner.

    python -m llmfast.bench                       # every op + dispatch overhead, this machine
    python -m llmfast.bench layer_norm --quick    # fewer shapes (and shorter CPU timings)
    python -m llmfast.bench rms_norm --providers llmfast-cuda,torch,liger --modes fwd+bwd
    python -m llmfast.bench --report-only         # rebuild PNGs and summary from the JSON files

For each op (llmfast/bench/ops/, one file per op) it times every provider -- each llmfast
backend that runs on the device, torch eager, torch.compile of the eager function (compiled
per shape, dynamic=False) and Liger-Kernel when installed -- in fwd, bwd and fwd+bwd modes, and
reports median/p20/p80 time, effective GB/s against the PERF.md byte counts, % of the copy
ceiling measured at start, peak extra memory and speed-ups against torch eager and
torch.compile from the same run. CUDA: bf16 and PERF.md's shapes, triton.testing.do_bench.
CPU: float32, small shapes, perf_counter. Results: a table on stdout and, under --out
(default benchmarks/results/), <op>_<tag>.json, <op>_<tag>.png and summary_<tag>.md.
"""
import argparse
import os
import sys

import torch

from . import report
from .spec import MODES, Case, OpSpec, Provider, Unavailable, op_specs, providers_for, register

__all__ = ["main", "run", "op_specs", "register", "OpSpec", "Case", "Provider", "Unavailable",
           "providers_for", "measure_overhead"]

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def measure_overhead(device=None, dtype=None, **kwargs):
    """Dispatch overhead of llmfast LayerNorm vs torch eager at tiny shapes (see overhead.py)."""
    from .overhead import measure_overhead as _measure

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return _measure(device, dtype, **kwargs)


def default_out_dir():
    from ._env import REPO_ROOT

    if os.path.isdir(os.path.join(REPO_ROOT, "benchmarks")):
        return os.path.join(REPO_ROOT, "benchmarks", "results")
    return os.path.join(os.getcwd(), "benchmarks", "results")


def _parse_shapes(text):
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if item:
            shapes.append(tuple(int(v) for v in item.split("x")))
    return shapes


def _parser():
    p = argparse.ArgumentParser(prog="python -m llmfast.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ops", nargs="*", metavar="op",
                   help=f"ops to run (default: all): {', '.join(list(op_specs()) + ['overhead'])}")
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter CPU timings")
    p.add_argument("--out", default=None, help="output directory (default: benchmarks/results/)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="input dtype (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help="default: cuda when available")
    p.add_argument("--providers", default=None,
                   help="comma-separated provider names to keep (llmfast-cuda, llmfast-triton, llmfast-cpu, "
                        "llmfast-reference, torch, torch.compile, liger)")
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--shapes", default=None, help="override shapes, e.g. 8192x8192,2048x65536")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (torch.set_num_threads); 1 is steadier on a busy machine")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG charts")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing; rebuild PNGs and the summary from the JSON files in --out")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failing providers")
    return p


def run(argv=None):
    """The command line, as a function. Returns {op: records}."""
    args = _parser().parse_args(argv)
    registry = op_specs()
    selected = args.ops or list(registry) + ["overhead"]
    unknown = [o for o in selected if o not in registry and o != "overhead"]
    if unknown:
        raise SystemExit(f"llmfast.bench: unknown op(s) {unknown}; known: {list(registry) + ['overhead']}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("llmfast.bench: --device cuda, but no CUDA device is available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    modes = [m.strip() for m in args.modes.split(",")] if args.modes else None
    if modes and any(m not in MODES for m in modes):
        raise SystemExit(f"llmfast.bench: --modes must be a subset of {MODES}")
    only = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    shapes = _parse_shapes(args.shapes) if args.shapes else None
    out_dir = args.out or default_out_dir()

    from . import _env

    tag = _env.device_tag(device)
    if args.report_only:
        for doc in report.load_results(out_dir, tag):
            if doc["op"] != "overhead" and not args.no_plot:
                report.plot(doc, out_dir)
        path = report.write_summary(out_dir, tag, list(registry))
        print(f"summary: {path}")
        return {}

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    load = _env.load_average()
    if device.type == "cpu" and load is not None and load > 0.5 * (os.cpu_count() or 1):
        log(f"note: load average {load} on {os.cpu_count()} cores: CPU timings will be noisy"
            + ("" if torch.get_num_threads() == 1 else " (--threads 1 suffers least)"))
    log(f"llmfast.bench on {_env.device_name(device)} ({tag}), {dtype}; results to {out_dir}")
    copy_gbps = _env.copy_ceiling_gbps(device, quick=args.quick)
    log(f"copy ceiling: {copy_gbps:.1f} GB/s")
    matmul_tflops = _env.matmul_ceiling_tflops(device, quick=args.quick)
    if matmul_tflops:
        log(f"bf16 matmul 8192^3 ceiling: {matmul_tflops:.1f} TFLOP/s")
    header = _env.header(device, copy_gbps=copy_gbps, matmul_tflops=matmul_tflops, quick=args.quick)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the ceilings' buffers (over 4 GiB) back to the driver

    from .runner import run_op

    results, written = {}, []
    for name in selected:
        if name == "overhead":
            continue
        spec = registry[name]
        records, skipped = run_op(spec, device, dtype, quick=args.quick, shapes=shapes, only=only,
                                  modes=modes, copy_gbps=copy_gbps, log=log, verbose=args.verbose)
        results[name] = records
        report.print_table(name, records, header, skipped)
        notes = {p: n for p, n in spec.peer_notes.items() if p not in skipped}
        path = report.write_json(out_dir, name, header, records, skipped=skipped, formula=spec.formula,
                                 notes=notes, shape_names=spec.shape_names, extra=_tuning_extra(name))
        written.append(path)
        if not args.no_plot:
            try:
                written.append(report.plot({"op": name, "header": header, "records": records}, out_dir))
            except Exception as exc:  # a chart must not cost the measurements
                log(f"{name}: chart failed: {type(exc).__name__}: {exc}")
    if "overhead" in selected:
        from .overhead import measure_overhead as _overhead

        log("overhead (dispatch cost at tiny shapes)")
        records = _overhead(device, dtype, quick=args.quick, log=log)
        results["overhead"] = records
        report.print_overhead(records)
        written.append(report.write_json(out_dir, "overhead", header, records, shape_names=("M", "N"),
                                         formula="host wall time per call, loop of calls + one synchronize"))
    written.append(report.write_summary(out_dir, tag, list(registry)))
    print("\nwritten: " + ", ".join(os.path.relpath(p) for p in written if p))
    return results


def _tuning_extra(op):
    """The Triton launch configurations the tuners picked during this op's runs (measured on
    this GPU), stored beside the timings so the choice can be read back and written down."""
    if op != "attention":
        return None
    module = sys.modules.get("llmfast.triton.attention")  # imported only if the triton backend ran
    report_ = module.tuning_report() if module is not None else []
    return {"triton_tuning": report_} if report_ else None


def main(argv=None):
    run(argv)
    return 0
