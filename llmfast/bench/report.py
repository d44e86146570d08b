"""Turns result records into a printed table, JSON result files, PNG charts and a markdown
summary.

Files under the output directory (default benchmarks/results/), per device tag ('h100', 'cpu'):
  <op>_<tag>.json     {"op", "formula", "metric", "report_memory",
                       "header": {gpu, versions, date, commit, ceilings},
                       "providers_skipped", "records": [...]}
  <op>_<tag>.png      effective GB/s (TFLOP/s for compute-bound ops) per shape and provider,
                      fwd+bwd and fwd, copy (matmul) ceiling line
  summary_<tag>.md    markdown tables for the README, rebuilt from every <op>_<tag>.json present,
                      so a run of one op keeps the other ops' sections

The rate of an op is its OpSpec.metric: 'GB/s' (counted bytes, % of the copy ceiling) or
'TFLOP/s' (counted flops, % of the bf16 matmul ceiling). Ops with OpSpec.report_memory show
each cell's peak extra memory too.
"""
import glob
import json
import math
import os
import sys

FAMILY_ORDER = {"llmfast": 0, "torch": 1, "torch.compile": 2, "peer": 3}
PLOT_MODES = ("fwd+bwd", "fwd")
MODE_ORDER = ("fwd+bwd", "fwd", "bwd")


# --- helpers ------------------------------------------------------------------------------------
def shape_str(shape, sep="x"):
    return sep.join(str(s) for s in shape)


def fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms >= 0.1 else f"{ms:.4f}"


def providers_in(records):
    """Provider names in table order: llmfast backends, torch, torch.compile, peers."""
    seen = {}
    for r in records:
        seen.setdefault(r["provider"], (FAMILY_ORDER.get(r.get("family"), 9), len(seen)))
    return sorted(seen, key=lambda p: seen[p])


def best_llmfast(group):
    """The fastest ok llmfast record of one (shape, mode) group; the reference backend counts
    only when no kernel backend ran."""
    ok = [r for r in group if r.get("family") == "llmfast" and r.get("status") == "ok"]
    kernels = [r for r in ok if r["provider"] != "llmfast-reference"]
    pool = kernels or ok
    return min(pool, key=lambda r: r["ms"]) if pool else None


def _groups(records):
    """(shape, mode) -> {provider: record}, in shape order then MODE_ORDER."""
    shapes = []
    for r in records:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    out = {}
    for shape in shapes:
        for mode in MODE_ORDER:
            group = {r["provider"]: r for r in records if r["shape"] == shape and r["mode"] == mode}
            if group:
                out[(tuple(shape), mode)] = group
    return out


def fmt_rate(x):
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else (f"{x:.1f}" if x >= 1 else f"{x:.2f}")


def _ratio(x):
    return f"{x:.2f}x" if x else "-"


def op_display(op, doc=None, records=()):
    """(metric, report_memory) of an op: from its result file's doc when it says, else from the
    registered OpSpec, else guessed from the records (TFLOP/s only when they count flops and no
    bytes)."""
    doc = doc or {}
    metric, memory = doc.get("metric"), doc.get("report_memory")
    if metric is None or memory is None:
        try:
            from .spec import op_specs

            spec = op_specs().get(op)
        except Exception:  # the report must not depend on every op module importing
            spec = None
        if metric is None:
            flops_only = any(r.get("tflops") for r in records) and not any(r.get("gbps") for r in records)
            metric = spec.metric if spec else ("TFLOP/s" if flops_only else "GB/s")
        if memory is None:
            memory = bool(spec and spec.report_memory)
    return metric, bool(memory)


def _rate_key(metric):
    return "tflops" if metric == "TFLOP/s" else "gbps"


def pct_of_ceiling(r, header, metric):
    """% of the copy ceiling (GB/s ops) or of the bf16 matmul ceiling (TFLOP/s ops), or None."""
    if r is None:
        return None
    if metric == "TFLOP/s":
        ceiling = header.get("matmul_ceiling_tflops")
        return 100.0 * r["tflops"] / ceiling if r.get("tflops") and ceiling else None
    return r.get("pct_of_copy")


def fmt_mb(mb):
    if mb is None:
        return None
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _clean(obj):
    """JSON-safe: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# --- printed table ------------------------------------------------------------------------------
def _cell(r, rate_key, memory=False):
    if r is None:
        return "-"
    if r.get("status") != "ok":
        return r.get("status", "error")
    rate = r.get(rate_key)
    flag = "" if r.get("err_ok", True) else "!"
    text = f"{fmt_ms(r['ms'])} {fmt_rate(rate)}" if rate is not None else fmt_ms(r["ms"])
    if memory and r.get("peak_extra_mb") is not None:
        text += " " + fmt_mb(r["peak_extra_mb"]).replace(" ", "")
    return text + flag


def print_table(op, records, header, skipped=None, file=None):
    file = file or sys.stdout
    if not records:
        print(f"\n{op}: no results", file=file)
        return
    metric, memory = op_display(op, records=records)
    rate_key = _rate_key(metric)
    unit = metric
    dev = header.get("gpu") or f"cpu ({header.get('cpu')}, {header.get('cpu_threads')} threads)"
    if metric == "TFLOP/s":
        ceiling = header.get("matmul_ceiling_tflops")
        ceiling_text = f"  (bf16 matmul ceiling {ceiling:.0f} TFLOP/s)" if ceiling else ""
    else:
        ceiling = header.get("copy_ceiling_gbps")
        ceiling_text = f"  (copy ceiling {ceiling:.0f} GB/s)" if ceiling else ""
    print(f"\n== {op}  {records[0]['dtype']}  on {dev}" + ceiling_text + " ==", file=file)
    for name, why in (skipped or {}).items():
        print(f"   {name}: skipped ({why})", file=file)
    provs = providers_in(records)
    groups = _groups(records)
    memory = memory and any(r.get("peak_extra_mb") is not None for r in records)
    cells = [len(_cell(g.get(p), rate_key, memory)) for g in groups.values() for p in provs]
    width = max(16, *(len(p) for p in provs), *cells)
    sw = max(12, *(len(shape_str(shape)) for shape, _ in groups))
    head = f"{'shape':>{sw}} {'mode':>8} | " + " | ".join(f"{p:>{width}}" for p in provs)
    head += f" | {'best llmfast':>18} {'vs eager':>8} {'vs compile':>10}"
    units = "ms " + unit + (" peak+" if memory else "")
    print(f"{'':>{sw}} {'':>8} | " + " | ".join(f"{units:>{width}}" for _ in provs), file=file)
    print(head, file=file)
    print("-" * len(head), file=file)
    for (shape, mode), group in groups.items():
        row = f"{shape_str(shape):>{sw}} {mode:>8} | "
        row += " | ".join(f"{_cell(group.get(p), rate_key, memory):>{width}}" for p in provs)
        best = best_llmfast(list(group.values()))
        if best:
            row += (f" | {best['provider']:>18} {_ratio(best.get('speedup_vs_torch')):>8} "
                    f"{_ratio(best.get('speedup_vs_compile')):>10}")
        else:
            row += f" | {'-':>18} {'-':>8} {'-':>10}"
        print(row, file=file)
    errors = {(r["provider"], r.get("error")) for r in records if r.get("status") != "ok" and r.get("error")}
    for prov, err in sorted(errors, key=str):
        print(f"   {prov}: {err}", file=file)
    if any(r.get("status") == "ok" and not r.get("err_ok", True) for r in records):
        print("   ! forward output differs from llmfast.reference beyond tolerance (see max_err)", file=file)


def _overhead_what(group):
    """The op an overhead row measured (records before 'what' existed measured LayerNorm)."""
    return next(iter(group.values())).get("what", "layer_norm")


def print_overhead(records, file=None):
    file = file or sys.stdout
    if not records:
        return
    print(f"\n== overhead: host time per call, {records[0]['dtype']} (us; +extra vs torch eager) ==",
          file=file)
    provs = providers_in(records)
    print(f"{'op':>10} {'shape':>14} {'mode':>8} | " + " | ".join(f"{p:>22}" for p in provs), file=file)
    for (shape, mode), group in _groups(records).items():
        cells = []
        for p in provs:
            r = group.get(p)
            if r is None or r.get("status") != "ok":
                cells.append(f"{(r or {}).get('status', '-'):>22}")
            elif p == "torch":
                cells.append(f"{r['us']:>22.1f}")
            else:
                cells.append(f"{r['us']:>12.1f} ({r.get('extra_us_vs_torch', 0):+7.1f})")
        print(f"{_overhead_what(group):>10} {shape_str(shape):>14} {mode:>8} | " + " | ".join(cells), file=file)


# --- files --------------------------------------------------------------------------------------
def write_json(out_dir, op, header, records, *, skipped=None, formula="", notes=None, shape_names=None, extra=None):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{op}_{header['device_tag']}.json")
    metric, memory = op_display(op, records=records)
    if metric == "TFLOP/s" and header.get("matmul_ceiling_tflops"):
        records = [dict(r, pct_of_matmul=pct_of_ceiling(r, header, metric)) if r.get("tflops") else r
                   for r in records]
    doc = {"op": op, "formula": formula, "shape_names": list(shape_names or ()), "header": header,
           "providers_skipped": skipped or {}, "provider_notes": notes or {}, "records": records}
    if op != "overhead":
        doc.update(metric=metric, report_memory=memory)
    doc.update(extra or {})
    with open(path, "w") as f:
        json.dump(_clean(doc), f, indent=1)
        f.write("\n")
    return path


def load_results(out_dir, tag):
    docs = []
    for path in sorted(glob.glob(os.path.join(out_dir, f"*_{tag}.json"))):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and "records" in doc and doc.get("header", {}).get("device_tag") == tag:
            docs.append(doc)
    return docs


def plot(doc, out_dir):
    """PNG of effective GB/s (TFLOP/s for compute-bound ops) per shape and provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in doc["records"] if r.get("status") == "ok"]
    modes = [m for m in PLOT_MODES if any(r["mode"] == m for r in records)]
    if not modes:
        return None
    rate_key = _rate_key(op_display(doc["op"], doc, records)[0])
    unit = "effective GB/s" if rate_key == "gbps" else "TFLOP/s"
    header = doc["header"]
    provs = providers_in(doc["records"])
    shapes = []
    for r in doc["records"]:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(7, 1.6 * len(shapes) * max(1, len(provs)) / 3), 4 * len(modes)),
                             squeeze=False)
    width = 0.8 / max(1, len(provs))
    for ax, mode in zip(axes[:, 0], modes):
        for i, prov in enumerate(provs):
            xs, ys = [], []
            for j, shape in enumerate(shapes):
                rec = next((r for r in records if r["shape"] == shape and r["mode"] == mode and r["provider"] == prov), None)
                if rec and rec.get(rate_key):
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(rec[rate_key])
            ax.bar(xs, ys, width, label=prov)
        if rate_key == "gbps" and header.get("copy_ceiling_gbps"):
            ax.axhline(header["copy_ceiling_gbps"], color="black", linestyle="--", linewidth=1,
                       label=f"copy ceiling {header['copy_ceiling_gbps']:.0f} GB/s")
        if rate_key == "tflops" and header.get("matmul_ceiling_tflops"):
            ax.axhline(header["matmul_ceiling_tflops"], color="black", linestyle="--", linewidth=1,
                       label=f"matmul ceiling {header['matmul_ceiling_tflops']:.0f} TFLOP/s")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([shape_str(s) for s in shapes])
        ax.set_ylabel(unit)
        dtype = records[0]["dtype"] if records else ""
        ax.set_title(f"{doc['op']} {mode}, {dtype}, {header.get('gpu') or 'cpu'}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = os.path.join(out_dir, f"{doc['op']}_{header['device_tag']}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _md_cell(r, metric="GB/s", memory=False):
    if r is None:
        return "-"
    if r.get("status") != "ok":
        return r.get("status", "error")
    if metric == "TFLOP/s":
        parts = [f"{fmt_rate(r['tflops'])} TF"] if r.get("tflops") else []
    else:
        parts = [f"{fmt_rate(r['gbps'])} GB/s"] if r.get("gbps") else ([f"{fmt_rate(r['tflops'])} TF"] if r.get("tflops") else [])
    if memory and r.get("peak_extra_mb") is not None:
        parts.append(f"+{fmt_mb(r['peak_extra_mb'])}")
    rate = f" ({', '.join(parts)})" if parts else ""
    flag = "" if r.get("err_ok", True) else " (!)"
    return f"{fmt_ms(r['ms'])} ms{rate}{flag}"


def _md_op(doc, op_order):
    header = doc["header"]
    records = doc["records"]
    provs = providers_in(records)
    dtype = records[0]["dtype"] if records else ""
    metric, memory = op_display(doc["op"], doc, records)
    lines = [f"## {doc['op']}, {dtype}", ""]
    if doc.get("formula"):
        lines += [f"{'Flops' if metric == 'TFLOP/s' else 'Bytes'}: {doc['formula']}.", ""]
    if memory and any(r.get("peak_extra_mb") is not None for r in records):
        lines += ["Cells add the peak memory allocated during one call beyond what was allocated before "
                  "it, outputs and gradients included (+MB / +GB).", ""]
    meta = f"Run {header.get('date')}, commit {str(header.get('git_commit'))[:12]}"
    meta += " (uncommitted changes)" if header.get("git_dirty") else ""
    meta += ", quick run" if header.get("quick") else ""
    lines += [meta + ".", ""]
    for name, why in doc.get("providers_skipped", {}).items():
        lines.append(f"- {name}: not run ({why})")
    for name, note in doc.get("provider_notes", {}).items():
        lines.append(f"- {name}: {note}")
    if doc.get("providers_skipped") or doc.get("provider_notes"):
        lines.append("")
    groups = _groups(records)
    for mode in MODE_ORDER:
        keys = [k for k in groups if k[1] == mode]
        if not keys:
            continue
        lines.append(f"### {doc['op']} {mode}")
        lines.append("")
        names = doc.get("shape_names") or []
        ceiling_col = "% of matmul ceiling" if metric == "TFLOP/s" else "% of copy ceiling"
        cols = [f"shape ({', '.join(names)})" if names else "shape"] + provs + ["best llmfast", "vs torch", "vs torch.compile", ceiling_col]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for key in keys:
            group = groups[key]
            best = best_llmfast(list(group.values()))
            pct = pct_of_ceiling(best, header, metric)
            row = [shape_str(key[0], " x ")] + [_md_cell(group.get(p), metric, memory) for p in provs]
            row += [best["provider"] if best else "-",
                    _ratio(best.get("speedup_vs_torch")) if best else "-",
                    _ratio(best.get("speedup_vs_compile")) if best else "-",
                    f"{pct:.0f}%" if pct else "-"]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _md_overhead(doc):
    records = doc["records"]
    provs = providers_in(records)
    lines = ["## Dispatch overhead (op `overhead`)", "",
             f"{records[0]['dtype'] if records else ''}, host time per call in microseconds "
             "(loop of calls, one synchronize), difference to torch eager in brackets. Attention shapes are "
             "(B, H, S, D, causal).", ""]
    cols = ["op", "shape", "mode"] + provs
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for (shape, mode), group in _groups(records).items():
        row = [_overhead_what(group), shape_str(shape, " x "), mode]
        for p in provs:
            r = group.get(p)
            if r is None or r.get("status") != "ok":
                row.append((r or {}).get("status", "-"))
            elif p == "torch":
                row.append(f"{r['us']:.1f} us")
            else:
                row.append(f"{r['us']:.1f} us ({r.get('extra_us_vs_torch', 0):+.1f})")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines


def write_summary(out_dir, tag, op_order=()):
    docs = load_results(out_dir, tag)
    if not docs:
        return None
    order = {name: i for i, name in enumerate(op_order)}
    docs.sort(key=lambda d: (d["op"] == "overhead", order.get(d["op"], len(order)), d["op"]))
    latest = max(docs, key=lambda d: d["header"].get("date") or "")["header"]
    dev = latest.get("gpu") or f"CPU ({latest.get('cpu')}, {latest.get('cpu_threads')} threads)"
    lines = [f"# llmfast benchmarks: {dev}", ""]
    if not latest.get("gpu") and latest.get("load_avg_1min") is not None:
        lines += [f"CPU run: load average {latest['load_avg_1min']} on {latest.get('cpu_count')} cores at start "
                  "(figures from a busy machine are noisy).", ""]
    lines.append(f"torch {latest.get('torch')}, triton {latest.get('triton')}, CUDA {latest.get('cuda')}, "
                 f"Liger-Kernel {latest.get('liger_kernel') or 'not installed'}; "
                 f"timing: {latest.get('timing')}.")
    lines.append("")
    ceil = [f"device copy {latest['copy_ceiling_gbps']:.0f} GB/s (bytes read + written)"] if latest.get("copy_ceiling_gbps") else []
    if latest.get("matmul_ceiling_tflops"):
        ceil.append(f"bf16 matmul 8192^3 {latest['matmul_ceiling_tflops']:.0f} TFLOP/s")
    if ceil:
        lines += ["Measured ceilings: " + "; ".join(ceil) + ".", ""]
    lines += ["Cells: median time (effective GB/s = counted bytes / median time). Speed-ups are the best "
              "llmfast backend's against torch eager and torch.compile measured in the same run. "
              "Generated by `python -m llmfast.bench` from the JSON files beside this one.", ""]
    if any(d["op"] != "overhead" and op_display(d["op"], d, d["records"])[0] == "TFLOP/s" for d in docs):
        lines += ["Ops counted in flops (compute-bound) show TFLOP/s = counted flops / median time instead, "
                  "and % of the bf16 matmul ceiling.", ""]
    for doc in docs:
        lines += _md_overhead(doc) if doc["op"] == "overhead" else _md_op(doc, order)
    path = os.path.join(out_dir, f"summary_{tag}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path
