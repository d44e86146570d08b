"""pytest-benchmark benchmarks of llmfast, in files named bench_*.py.

    python -m pytest benchmarks -q                                # every provider, a few shapes
    python -m pytest benchmarks -q -k "rms_norm and fwd+bwd"
    python -m pytest benchmarks --benchmark-json=/tmp/bench.json  # machine-readable

CUDA: bf16, a subset of PERF.md's shapes; CPU: float32, small shapes. The cases, providers and
byte counts are llmfast.bench's (one definition); `python -m llmfast.bench` is the full report
(L2-flushed CUDA-event timing, ceilings, charts). Each timed call ends with a device
synchronize, so pytest-benchmark's wall-clock times are GPU-complete.
"""
import os
import sys

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)  # the checkout's llmfast, also under a bare `pytest`


def pytest_collect_file(file_path, parent):
    # Collect bench_*.py as test modules (pytest's default python_files is test_*.py). Files
    # named on the command line are collected by pytest itself, so they are left to it.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bench_dtype(bench_device):
    return torch.bfloat16 if bench_device.type == "cuda" else torch.float32
