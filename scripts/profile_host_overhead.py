"""Where llmfast's host time goes on a GPU machine, for the calls too small for the GPU to
matter (the 'overhead' rows of the benchmark: llmfast-cuda LayerNorm was +64 us forward and
+199 us forward+backward over torch eager on the H100 host; the Triton attention backward at
8 x 16 x 1024 x 64 took ~0.62 ms whether causal or not, about twice its kernels' time).

Prints, per case, the host microseconds per call and the top Python functions by own time
(cProfile, which sees into Triton's launcher).
Run: python3 scripts/profile_host_overhead.py   (needs a CUDA device)"""
import cProfile
import io
import pstats
import time

import torch

import llmfast
import llmfast.functional as LF


def _cases(dev):
    x = torch.randn(8, 768, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(768, device=dev, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(768, device=dev, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = (torch.randn(8, 16, 1024, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    logits = torch.randn(64, 1000, device=dev, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 1000, (64,), device=dev)

    def case(backend, bwd, forward):
        def run():
            with llmfast.use_backend(backend):
                y = forward()
            if bwd:
                y.backward(torch.ones_like(y))
        return run

    out = []
    for bwd in (False, True):
        mode = "fwd+bwd" if bwd else "fwd"
        for backend in ("cuda", "triton"):
            out.append((f"layer_norm 8x768 {backend} {mode}",
                        case(backend, bwd, lambda: LF.layer_norm(x, (768,), w, b))))
            out.append((f"cross_entropy 64x1000 {backend} {mode}",
                        case(backend, bwd, lambda: LF.cross_entropy(logits, target))))
        out.append((f"attention 8x16x1024x64 causal triton {mode}",
                    case("triton", bwd, lambda: LF.scaled_dot_product_attention(q, k, v, is_causal=True))))
    return out


def _host_us(fn, iters=200):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        # Host time only where the GPU keeps up; the synchronize is outside the per-call figure's
        # intent but bounds it (a GPU-bound case shows its GPU time instead).
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / iters * 1e6)
    return best


def main():
    dev = torch.device("cuda")
    report = []
    for name, fn in _cases(dev):
        try:
            us = _host_us(fn)
        except Exception as exc:  # a backend that cannot run here
            report.append(f"{name}: error {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
        top = [line for line in text.getvalue().splitlines() if line.strip()[:1].isdigit()][:8]
        report.append(f"== {name}: {us:.1f} us per call\n" + "\n".join(top))
    print("\n".join(report))


if __name__ == "__main__":
    main()
