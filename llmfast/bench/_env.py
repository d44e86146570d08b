"""Facts about the machine a benchmark ran on, and its measured ceilings.

The header of every result file comes from here: device name and tag, library versions, date,
git commit, and the two ceilings every figure is compared with -- a large device-to-device copy
(GB/s, bytes read + written) and, on CUDA, a bf16 8192^3 matmul (TFLOP/s).
"""
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess

import torch

from . import timing

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def device_tag(device):
    """Short file-name tag: 'h100' for 'NVIDIA H100 80GB HBM3', 'rtx4090', ..., 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    words = re.split(r"[\s\-_/]+", torch.cuda.get_device_name(device).lower())
    words = [w for w in words if w and w not in ("nvidia", "geforce", "tesla", "quadro")]
    for i, word in enumerate(words):
        if any(c.isdigit() for c in word):
            prefix = words[i - 1] if i > 0 and words[i - 1].isalpha() else ""
            return re.sub(r"[^a-z0-9]", "", prefix + word) or "cuda"
    return re.sub(r"[^a-z0-9]", "", "".join(words)) or "cuda"


def load_average():
    """1-minute load average at the start (None where unsupported): CPU timings on a busy
    machine are noisy, most of all with several intra-op threads."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def copy_ceiling_gbps(device, quick=False):
    """Bandwidth of one large copy, bytes read + written, the denominator of '% of ceiling'.
    2 GiB of bf16 on CUDA as in PERF.md (well past L2); 256 MiB of float32 on the CPU."""
    if device.type == "cuda":
        src = torch.randn((2 << 30) // 2, dtype=torch.bfloat16, device=device)
    else:
        src = torch.randn(((128 if quick else 256) << 20) // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = timing.measure(lambda: dst.copy_(src), device, quick=quick)["ms"]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def matmul_ceiling_tflops(device, quick=False):
    """bf16 8192^3 matmul on random data (CUDA only; None on the CPU)."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    ms = timing.measure(lambda: a @ b, device, quick=quick)["ms"]
    return 2 * n**3 / (ms * 1e-3) / 1e12


def header(device, *, copy_gbps, matmul_tflops, quick):
    """The header shared by every result file of one run."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    # A copy of the tree shipped to a GPU machine names its commit in LLMFAST_GIT_COMMIT: its
    # .git, where there is one, can be stale (seen: the session's first commit, "dirty").
    commit = os.environ.get("LLMFAST_GIT_COMMIT")
    dirty = None
    if not commit:
        commit = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    commit = commit or "unknown"
    return {
        "device": device.type,
        "device_tag": device_tag(device),
        "gpu": device_name(device) if device.type == "cuda" else None,
        "cpu": device_name(torch.device("cpu")),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": load_average(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "copy_ceiling_gbps": copy_gbps,
        "matmul_ceiling_tflops": matmul_tflops,
        "quick": quick,
        "timing": timing.describe(device, quick),
    }
