"""Which C++ exceptions survive on this machine? Each step runs in a fresh process, so that a
segfault (seen on the H100 machine when llmfast's C++ checks fail) names its step.
Run: python3 scripts/exception_probe.py"""
import subprocess
import sys

PRELUDE = "import torch, llmfast\n"
TRITON_FIRST = ("x = torch.randn(4, 64, device='cuda')\n"
                "with llmfast.use_backend('triton'): llmfast.functional.layer_norm(x, (64,))\n"
                "torch.cuda.synchronize()\n")
TORCH_ERROR = "try:\n    torch.randn(2, 3) @ torch.randn(4, 5)\nexcept RuntimeError: print('caught torch')\n"
OURS_CPU = ("try:\n    torch.ops.llmfast.norm_fwd(torch.randn(4, 8), None, torch.randn(7), None, 1e-5, False)\n"
            "except RuntimeError as e: print('caught ours cpu:', str(e)[:80])\n")
OURS_CUDA = OURS_CPU.replace("torch.randn(4, 8)", "torch.randn(4, 8, device='cuda')").replace(
    "torch.randn(7)", "torch.randn(7, device='cuda')").replace("ours cpu", "ours cuda")
STEPS = {
    "torch error": TORCH_ERROR,
    "llmfast cpu error": OURS_CPU,
    "llmfast cuda error": OURS_CUDA,
    "triton kernel, then torch error": TRITON_FIRST + TORCH_ERROR,
    "triton kernel, then llmfast cpu error": TRITON_FIRST + OURS_CPU,
    "llmfast cpu error twice": OURS_CPU + OURS_CPU,
}
for name, body in STEPS.items():
    proc = subprocess.run([sys.executable, "-c", PRELUDE + body], capture_output=True, text=True)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    err = "" if proc.returncode == 0 else " | " + " / ".join(proc.stderr.strip().splitlines()[:2])
    print(f"{name:40s} rc={proc.returncode} {tail}{err}")
for cmd in (["bash", "-c", "g++ --version | head -1; which g++ gcc; ldd llmfast/_C*.so | grep -E 'stdc|gcc_s|gomp'"],):
    print(subprocess.run(cmd, capture_output=True, text=True).stdout)
