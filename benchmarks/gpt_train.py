"""End-to-end training step of GPT-2 small (124M) built from llmfast's layers, against the same
model in plain torch (nanoGPT with scaled_dot_product_attention), eager and under torch.compile.

    python benchmarks/gpt_train.py                 # CUDA: B=16, T=1024, bf16 autocast, fused AdamW
    python benchmarks/gpt_train.py --quick         # smoke test: a tiny config, a few steps (CPU too)
    python benchmarks/gpt_train.py --variants llmfast,torch-sdpa --steps 50

Variants (PERF.md, "End to end: GPT-2 small"):
  llmfast                 llmfast.models.GPT eager: fused add+LayerNorm, FlashAttention-style
                          attention, fused linear + cross-entropy (no logits), backend 'auto'
  llmfast+compile         the same under torch.compile
  torch-sdpa              nanoGPT in plain torch: torch LayerNorm, F.scaled_dot_product_attention,
                          full logits + F.cross_entropy
  torch-sdpa+compile      the same under torch.compile
Every variant starts from the same weights (the twin loads the llmfast model's state_dict) and
trains on the same batch of random tokens (data loading is not part of the step), so their
first losses agree to bf16 rounding.

A step is forward + backward + AdamW(fused) step + zero_grad, under torch.autocast (bf16 by
default) with float32 parameters. Timing: CUDA events between consecutive steps (the GPU
timeline, which includes any time the GPU waits for the CPU to launch work), no sync inside
the timed steps; median and p20/p80 over --steps steps after --warmup steps (compilation
happens in the warm-up). On the CPU, time.perf_counter around each step. Peak memory: the CUDA
caching allocator's max_memory_allocated over warm-up and timed steps (weights, gradients,
optimizer state and activations; None on the CPU). Model FLOPs per token as nanoGPT's MFU
estimate (6 * non-embedding parameters + 12 * layers * width * T), reported as TFLOP/s and as
a fraction of a measured bf16 8192^3 matmul.

The JSON (--out, default benchmarks/results/gpt2_<device tag>.json) carries llmfast.bench's
header (GPU name, versions, date, commit: git rev-parse HEAD, else LLMFAST_GIT_COMMIT) and one
record per variant. CPU results are smoke tests, not measurements: do not commit them.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)  # the checkout's llmfast

import llmfast  # noqa: E402
from llmfast.bench import _env  # noqa: E402
from llmfast.models import GPT, GPTConfig  # noqa: E402
from llmfast.reference.gpt import GPT as TorchGPT  # noqa: E402  (nanoGPT with SDPA)

VARIANTS = ("llmfast", "llmfast+compile", "torch-sdpa", "torch-sdpa+compile")
# fp16 is left out: it needs a GradScaler, which would be one more difference between variants
DTYPES = {"bf16": torch.bfloat16, "fp32": None}


# --- one variant ---------------------------------------------------------------------------------
def _optimizer(model, device, lr):
    """nanoGPT's AdamW: weight decay on the matrices only, fused kernels (where torch has them
    for this device; the record says which ran)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True), "AdamW(fused=True)"
    except (RuntimeError, ValueError) as exc:
        if device.type == "cuda":
            raise
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95)), f"AdamW (fused unavailable: {exc})"


def _quantile(values, q):
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(name, cfg, state_dict, x, y, args, device, flops_per_step):
    amp_dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    if name.startswith("llmfast"):
        model = GPT(cfg)
    else:
        model = TorchGPT(cfg)
    model.load_state_dict(state_dict, strict=True)
    model.to(device).train()
    opt, opt_name = _optimizer(model, device, args.lr)
    fwd = torch.compile(model, mode=args.compile_mode) if name.endswith("+compile") else model

    def step():
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = fwd(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        losses.append(step())
    _sync(device)
    warmup_s = time.perf_counter() - t0

    times = []
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
        events[0].record()
        for i in range(args.steps):
            losses.append(step())
            events[i + 1].record()
        torch.cuda.synchronize(device)
        times = [events[i].elapsed_time(events[i + 1]) for i in range(args.steps)]
        peak = torch.cuda.max_memory_allocated(device)
    else:
        for _ in range(args.steps):
            t = time.perf_counter()
            losses.append(step())
            times.append((time.perf_counter() - t) * 1e3)
        peak = None
    losses = [float(v) for v in losses]

    ms = statistics.median(times)
    tokens = x.numel()
    record = {
        "variant": name,
        "status": "ok",
        "ms_per_step": ms,
        "p20_ms": _quantile(times, 0.2),
        "p80_ms": _quantile(times, 0.8),
        "tokens_per_s": tokens / (ms * 1e-3),
        "peak_memory_bytes": peak,
        "peak_memory_gb": peak / 1e9 if peak is not None else None,
        "warmup_s": warmup_s,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "optimizer": opt_name,
        "flops_per_step": flops_per_step,
        "model_tflops": flops_per_step / (ms * 1e-3) / 1e12,
    }
    del model, fwd, opt, step
    return record


def _cleanup(device):
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny config and few steps: a smoke test (any device)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--no-bias", action="store_true", help="GPTConfig(bias=False)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype (fp32: no autocast)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--backend", default="auto", help="llmfast backend for the llmfast variants (llmfast.use_backend)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpt2_<device tag>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.quick:
        args.batch_size, args.seq_len, args.n_layer, args.n_head, args.n_embd = 2, 64, 2, 2, 64
        args.vocab_size = 512
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; expected a subset of {', '.join(VARIANTS)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    cfg = GPTConfig(block_size=args.seq_len, vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                    n_embd=args.n_embd, dropout=0.0, bias=not args.no_bias)
    torch.manual_seed(0)
    reference_model = GPT(cfg)
    state_dict = reference_model.state_dict()
    flops_per_step = reference_model.flops_per_token(args.seq_len) * args.batch_size * args.seq_len
    del reference_model
    g = torch.Generator().manual_seed(1)
    # GPT-2's 50257 tokens; the vocabulary is padded to 50304
    data = torch.randint(0, min(50257, cfg.vocab_size), (args.batch_size, args.seq_len + 1), generator=g)
    x, y = data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)

    matmul_tflops = _env.matmul_ceiling_tflops(device, quick=args.quick) if device.type == "cuda" else None
    header = _env.header(device, copy_gbps=None, matmul_tflops=matmul_tflops, quick=args.quick)
    header["timing"] = ("CUDA events between consecutive training steps, no sync inside the timed steps; "
                        "median with p20/p80" if device.type == "cuda" else
                        "time.perf_counter per training step; median with p20/p80")
    result = {
        "benchmark": "gpt2_train",
        "header": header,
        "config": {**vars(cfg), "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "autocast_dtype": args.dtype, "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
                   "llmfast_backend": args.backend, "compile_mode": args.compile_mode,
                   "llmfast_available_backends": llmfast.available_backends()},
        "records": [],
    }

    for name in variants:
        print(f"[{name}] running ...", flush=True)
        try:
            with llmfast.use_backend(args.backend if name.startswith("llmfast") else "auto"):
                rec = run_variant(name, cfg, state_dict, x, y, args, device, flops_per_step)
        except Exception as exc:  # one failing variant should not lose the others' numbers
            traceback.print_exc()
            rec = {"variant": name, "status": "error", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        _cleanup(device)
        result["records"].append(rec)

    ok = {r["variant"]: r for r in result["records"] if r["status"] == "ok"}
    for rec in ok.values():
        rec["fraction_of_matmul_ceiling"] = rec["model_tflops"] / matmul_tflops if matmul_tflops else None
        # speedup > 1: this variant is faster than the peer run in the same process
        rec["speedup_vs"] = {peer: ok[peer]["ms_per_step"] / rec["ms_per_step"]
                             for peer in ok if peer != rec["variant"]}

    out = args.out or os.path.join(_ROOT, "benchmarks", "results", f"gpt2_{_env.device_tag(device)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)

    gpu = header["gpu"] or header["cpu"]
    print(f"\nGPT ({cfg.n_layer} layers, width {cfg.n_embd}, vocab {cfg.vocab_size}) B={args.batch_size} "
          f"T={args.seq_len} autocast {args.dtype} on {gpu}, torch {torch.__version__}")
    print("| variant | ms/step (p20-p80) | tokens/s | peak memory | model TFLOP/s | first / last loss |")
    print("|---|---|---|---|---|---|")
    for rec in result["records"]:
        if rec["status"] != "ok":
            print(f"| {rec['variant']} | error: {rec['error']} | | | | |")
            continue
        mem = f"{rec['peak_memory_gb']:.1f} GB" if rec["peak_memory_gb"] is not None else "n/a"
        print(f"| {rec['variant']} | {rec['ms_per_step']:.1f} ({rec['p20_ms']:.1f}-{rec['p80_ms']:.1f}) | "
              f"{rec['tokens_per_s'] / 1e3:.0f}k | {mem} | {rec['model_tflops']:.1f} | "
              f"{rec['first_loss']:.4f} / {rec['last_loss']:.4f} |")
    print(f"\nwrote {out}")
    return 0 if all(r["status"] == "ok" for r in result["records"]) else 1


if __name__ == "__main__":
    sys.exit(main())
