"""Compiles llmfast's Triton kernels for a GPU architecture on any machine (no GPU needed) and
reports what the GPU would run: registers, spilled bytes, shared memory, tensor-core products.

How: each launcher runs on small CPU tensors with its kernels replaced by recorders; every
recorded launch is then specialised as Triton's JIT specialises a real launch (argument types,
16-byte pointer alignment, integers divisible by 16 or equal to 1) and compiled by Triton's own
compiler and ptxas for the chosen target. It must run without TRITON_INTERPRET (the kernels are
then ordinary JIT functions); tests/test_triton_compile.py runs it in a subprocess.

    python -m llmfast.triton._aot                    # default tiles, sm_90
    python -m llmfast.triton._aot --arch 80 --candidates --json out.json

Per launch it reports: `regs` (registers a thread), `stack` (bytes of local memory a thread:
spills), `shared` (dynamic shared memory bytes, against the target's limit), and for attention
`mma` (wgmma on sm_90, mma.sync otherwise) and `async` (cp.async / TMA copies: the loads are
pipelined). Triton here may be newer than on the GPU machine, so this shows what this Triton
makes of the kernels.
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

# The most dynamic shared memory a block may use, by architecture (bytes).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class _Recorder:
    def __init__(self, fn, sink):
        self.fn, self.sink = getattr(fn, "jit", fn), sink  # the JITFunction under a fast_jit wrapper

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.sink.append((self.fn, args, kwargs))
        return record


@contextlib.contextmanager
def recording(module, kernel_names, sink, patches=()):
    """Replaces `module`'s kernels by recorders (appending (jit function, args, kwargs) to sink)
    and applies `patches` ((object, attribute, value) triples) for the block."""
    saved = []
    try:
        for name in kernel_names:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _Recorder(getattr(module, name), sink))
        for obj, attr, value in patches:
            saved.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, value)
        yield sink
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def _on_gpu(fn):
    """A config function called as if the tensors were on a GPU."""
    return lambda d, elt, on_gpu, *rest, **kwargs: fn(d, elt, True, *rest, **kwargs)


def compile_launch(fn, args, kwargs, arch):
    """Compiles one recorded launch for sm_<arch> as the JIT would specialise it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(kernel):
    """{regs, stack, shared, mma, async} of a compiled kernel (cuobjdump -res-usage on its cubin)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    ptx = kernel.asm["ptx"]
    return {
        "regs": int(fields["REG"]),
        "stack": int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
        "shared": int(kernel.metadata.shared),
        "mma": "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "none"),
        "async": ptx.count("cp.async") + ptx.count("cp.async.bulk"),
    }


# --- the launches to compile -----------------------------------------------------------------
def _attention_launches(candidates):
    """(label, launch thunk) pairs: forward and backward of the attention launchers for the
    dtypes, head dims and features that select different kernel specialisations."""
    from llmfast.triton import attention as ta

    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in ((64, 128, 256) if dtype == torch.bfloat16 else (128,)):
            features = ["plain", "causal"]
            if dtype == torch.bfloat16 and d == 128:
                features += ["key_padding", "additive_mask_grad", "softcap_window", "dropout", "gqa"]
            for feature in features:
                cases.append((dtype, d, feature))

    def run(dtype, d, feature):
        B, H, S = 2, 4, 256
        hkv = 2 if feature == "gqa" else H
        q = torch.randn(B, H, S, d, dtype=dtype)
        k = torch.randn(B, hkv, S, d, dtype=dtype)
        mask, left, right, cap, p, seed = None, -1, -1, 0.0, 0.0, None
        if feature in ("causal", "softcap_window", "dropout"):
            right = 0
        if feature == "softcap_window":
            left, cap = 64, 30.0
        if feature == "dropout":
            p, seed = 0.1, torch.zeros(1, dtype=torch.int64)
        if feature == "key_padding":
            mask = (torch.rand(B, 1, 1, S) > 0.1).expand(B, H, S, S)
        if feature == "additive_mask_grad":
            mask = torch.randn(B, H, S, S, dtype=dtype)
        out, lse = torch.empty(B, H, S, d, dtype=dtype), torch.zeros(B, H, S)
        ta.attention_fwd(q, k, k, mask, 0.1, left, right, cap, p, seed)
        ta.attention_bwd(out, q, k, k, out, lse, None, mask, 0.1, left, right, cap, p, seed,
                         mask_grad=feature == "additive_mask_grad")

    patches = [(ta, "_INTERPRET", True)]
    for name in ("_fwd_candidates", "_dkdv_candidates", "_dq_candidates"):
        patches.append((ta, name, _on_gpu(getattr(ta, name))))
    kernels = ["_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"]
    launches = []
    for dtype, d, feature in cases:
        label = f"attention {str(dtype).replace('torch.', '')} D={d} {feature}"
        if not candidates or feature != "plain":
            launches.append((label, ta, kernels, patches, lambda c=(dtype, d, feature): run(*c)))
            continue
        elt = torch.tensor([], dtype=dtype).element_size()
        tables = ((ta.FWD_TUNER, ta._fwd_candidates(d, elt, True)), (ta.DKDV_TUNER, ta._dkdv_candidates(d, elt, True)),
                  (ta.DQ_TUNER, ta._dq_candidates(d, elt, True)))
        for tuner, table in tables:
            for cfg in table:
                def forced(tuner=tuner, cfg=cfg, c=(dtype, d, feature)):
                    with tuner.forced(cfg):
                        run(*c)
                launches.append((f"{label} {tuner.name} {tuple(cfg)}", ta, kernels, patches, forced))
    return launches


def _norm_launches():
    from llmfast.triton import norm as tn

    patches = [(tn, "_INTERPRET", True), (tn, "_bwd_config", _on_gpu(tn._bwd_config)),
               (tn, "_sum_config", _on_gpu(tn._sum_config))]
    kernels = ["_norm_fwd_kernel", "_norm_fwd_looped_kernel", "_norm_bwd_kernel", "_norm_bwd_row_sums_kernel",
               "_norm_bwd_cols_kernel", "_sum_partials_kernel"]
    launches = []
    for n in (1024, 4096, 8192, 16384, 65536):
        for rms in (False, True):
            def run(n=n, rms=rms):
                M = 64
                x = torch.randn(M, n, dtype=torch.bfloat16)
                w = torch.randn(n, dtype=torch.bfloat16)
                b = None if rms else torch.randn(n, dtype=torch.bfloat16)
                out, res_out, mean, rstd = tn.norm_fwd(x, x, w, b, 1e-5, rms)
                tn.norm_bwd(x, None, x, w, mean, rstd, rms, True, not rms)
            launches.append((f"{'rms' if rms else 'layer'}_norm bf16 N={n}", tn, kernels, patches, run))
    return launches


def _cross_entropy_launches():
    from llmfast.triton import cross_entropy as tce

    patches = [(tce, "_interpreting", lambda: True)]
    kernels = ["_ce_fwd_kernel", "_ce_target_weight_kernel", "_ce_scale_grad_kernel"]
    launches = []
    for v in (32000, 50304, 128256):
        def run(v=v):
            M = 64
            logits = torch.randn(M, v, dtype=torch.bfloat16)
            target = torch.randint(0, v, (M,))
            loss, lse, grad = tce.cross_entropy_fwd(logits, target, None, 1, -100, 0.1, 1e-4, None, True)
            tce.cross_entropy_scale_grad_(grad, torch.ones(()))
        launches.append((f"cross_entropy bf16 V={v}", tce, kernels, patches, run))
    return launches


def collect(ops=("attention", "norm", "cross_entropy"), candidates=False):
    """[(label, jit function, args, kwargs)]: every distinct launch of the chosen ops."""
    makers = {"attention": lambda: _attention_launches(candidates), "norm": _norm_launches,
              "cross_entropy": _cross_entropy_launches}
    out, seen = [], set()
    for op in ops:
        for label, module, kernels, patches, run in makers[op]():
            sink = []
            with recording(module, kernels, sink, patches):
                run()
            for fn, args, kwargs in sink:
                key = (fn.__name__, tuple((type(a).__name__, getattr(a, "dtype", a) if not isinstance(a, torch.Tensor)
                                           else (a.dtype, a.data_ptr() % 16 == 0)) for a in args),
                       tuple(sorted((k, str(v)) for k, v in kwargs.items())))
                if key in seen:
                    continue
                seen.add(key)
                out.append((f"{label}: {fn.__name__}", fn, args, kwargs))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80, 86, 89, 90)")
    parser.add_argument("--ops", default="attention,norm,cross_entropy")
    parser.add_argument("--candidates", action="store_true", help="every tuning candidate (attention)")
    parser.add_argument("--only", default="", help="only launches whose label contains this text")
    parser.add_argument("--json", help="write the results to this file ('-': standard output)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("run without TRITON_INTERPRET=1 (the kernels must be JIT functions)")
    limit = SHARED_LIMIT.get(args.arch, SHARED_LIMIT[80])
    results = []
    for label, fn, fargs, kwargs in collect(tuple(args.ops.split(",")), args.candidates):
        if args.only not in label:
            continue
        start = time.time()
        try:
            usage = resource_usage(compile_launch(fn, fargs, kwargs, args.arch))
            usage["fits"] = usage["shared"] <= limit
            error = None
        except Exception as exc:  # a compile error is a result here
            usage, error = {}, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        opts = {k: kwargs.get(k) for k in ("num_warps", "num_stages") if k in kwargs}
        results.append(dict(label=label, arch=args.arch, options=opts, seconds=round(time.time() - start, 1),
                            error=error, **usage))
        if args.json != "-":
            r = results[-1]
            print(f"{label:90s} " + (f"ERROR {error}" if error else
                  f"regs {r['regs']:3d} stack {r['stack']:4d} shared {r['shared']:6d}{'' if r['fits'] else ' (over)'} "
                  f"{r['mma']:8s} async {r['async']:3d}  {r['seconds']}s"), flush=True)
    if args.json:
        text = json.dumps(results, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
