"""The overhead report (llmfast/bench/overhead.py and its tables in report.py) on the CPU: every
provider and mode is measured for each op, the rows name the op, and result files written
before the rows named it still render."""
import io

import torch

from llmfast.bench import report
from llmfast.bench.overhead import measure_overhead


def test_overhead_measures_each_op_provider_and_mode():
    cases = (("layer_norm", (2, 16)), ("attention", (1, 2, 8, 16, 1)))
    records = measure_overhead(torch.device("cpu"), torch.float32, quick=True, cases=cases, log=lambda msg: None)
    providers = {r["provider"] for r in records}
    assert {"torch", "llmfast-cpu", "llmfast-reference"} <= providers
    for what, shape in cases:
        rows = [r for r in records if r["what"] == what]
        assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in providers for m in ("fwd", "fwd+bwd")}
        for r in rows:
            assert r["status"] == "ok", r
            assert r["shape"] == list(shape) and r["us"] > 0
            assert abs(r["extra_us_vs_torch"] - (r["us"] - next(
                t["us"] for t in rows if t["provider"] == "torch" and t["mode"] == r["mode"]))) < 1e-9
    out = io.StringIO()
    report.print_overhead(records, file=out)
    text = out.getvalue()
    assert "layer_norm" in text and "attention" in text and "1x2x8x16x1" in text
    md = "\n".join(report._md_overhead({"records": records}))
    assert md.count("| attention |") == 2 and md.count("| layer_norm |") == 2


def test_overhead_rows_without_the_op_name_are_layer_norm():
    """Files written before records named their op (such as session 5's overhead_h100.json)
    measured LayerNorm only."""
    records = [{"op": "overhead", "shape": [8, 768], "dtype": "bfloat16", "provider": p, "mode": m, "status": "ok",
                "us": us, "extra_us_vs_torch": us - 10.0}
               for p, us in (("torch", 10.0), ("llmfast-cuda", 30.0)) for m in ("fwd", "fwd+bwd")]
    md = "\n".join(report._md_overhead({"records": records}))
    assert md.count("| layer_norm | 8 x 768 |") == 2
    assert "30.0 us (+20.0)" in md
