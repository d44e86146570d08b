"""Host time of llmfast's Python layer on a CPU machine, where no GPU measures it.

On the H100 host, small calls are bound by host time (benchmarks/NOTES.md). What llmfast adds
in Python is the same work on any machine, so this measures it here:
- attention: llmfast.functional.scaled_dot_product_attention on the 'triton' backend with every
  Triton kernel replaced by a no-op (so neither the interpreter nor Triton's launcher is
  timed: only llmfast's checks, dispatch, autograd and launcher bookkeeping), forward and
  forward+backward (torch.autograd.grad);
- layer_norm: the 'cpu' backend at 8 x 768 fp32 against torch eager (kernels included; tiny),
  and the 'triton' backend with its kernels stubbed out, as attention's;
Best of 5 loops of 2000 calls, microseconds per call, one thread. Writes JSON to the path given.

Run: TRITON_INTERPRET=1 python scripts/python_path_cost.py OUT.json
"""
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import llmfast  # noqa: E402
import llmfast.functional as LF  # noqa: E402
from llmfast.bench.timing import best_loop_us  # noqa: E402


class _NoKernel:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def attention_cases():
    from llmfast.triton import attention as ta

    for name in ("_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"):
        setattr(ta, name, _NoKernel())
    q, k, v = (torch.randn(2, 2, 16, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
    g = torch.ones(2, 2, 16, 64, dtype=torch.float16)

    def fwd():
        with llmfast.use_backend("triton"):
            return LF.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        torch.autograd.grad(fwd(), (q, k, v), g)

    return {"attention triton (kernels stubbed) fwd": fwd, "attention triton (kernels stubbed) fwd+bwd": fwd_bwd}


def _layer_norm_cases(label, layer_norm):
    """fwd and fwd+bwd of layer_norm(x, w, b) at 8 x 768 fp32."""
    x = torch.randn(8, 768, requires_grad=True)
    w = torch.randn(768, requires_grad=True)
    b = torch.randn(768, requires_grad=True)
    g = torch.ones(8, 768)

    def fwd():
        return layer_norm(x, (768,), w, b)

    return {f"layer_norm 8x768 {label} fwd": fwd,
            f"layer_norm 8x768 {label} fwd+bwd": lambda: torch.autograd.grad(fwd(), (x, w, b), g)}


def _llmfast_layer_norm(backend):
    def layer_norm(*args):
        with llmfast.use_backend(backend):
            return LF.layer_norm(*args)
    return layer_norm


def triton_norm_cases():
    from llmfast.triton import norm as tn

    for name in ("_norm_fwd_kernel", "_norm_fwd_looped_kernel", "_norm_bwd_kernel", "_norm_bwd_row_sums_kernel",
                 "_norm_bwd_cols_kernel", "_sum_partials_kernel"):
        setattr(tn, name, _NoKernel())
    return _layer_norm_cases("triton (kernels stubbed)", _llmfast_layer_norm("triton"))


def norm_cases():
    return {**_layer_norm_cases("cpu", _llmfast_layer_norm("cpu")),
            **_layer_norm_cases("torch", torch.nn.functional.layer_norm)}


def main(out_path):
    torch.set_num_threads(1)
    cases = {**norm_cases(), **triton_norm_cases(), **attention_cases()}
    results = {}
    for name, fn in cases.items():
        results[name] = round(best_loop_us(fn, iters=2000, reps=5), 2)
        print(f"{name:48s} {results[name]:8.1f} us", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = None
    meta = {"what": __doc__.splitlines()[0], "unit": "us per call (best of 5 loops)", "commit": commit,
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    with open(out_path, "w") as f:
        json.dump({"meta": meta, "us": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "python_path_cost.json")
