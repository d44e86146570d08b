"""Test configuration shared by every test module.

Without a CUDA device the Triton kernels run in Triton's CPU interpreter; TRITON_INTERPRET
must be set before triton (and llmfast) is imported, which is why it is set here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import llmfast  # noqa: E402


def _triton_language_snapshot():
    """triton.language's namespaces as they are before any kernel runs: (namespace, its dict)."""
    try:
        import triton.language as tl
    except ImportError:
        return []
    spaces = [tl, tl.core, tl.math, getattr(tl, "standard", None), tl.core.tensor,
              getattr(tl.core, "tensor_descriptor_base", None)]
    return [(ns, dict(vars(ns))) for ns in spaces if ns is not None]


_TRITON_LANGUAGE = _triton_language_snapshot()


@pytest.fixture(autouse=True)
def _undo_triton_interpreter_patches():
    """Triton's interpreter (3.8) swaps triton.language's builtins for interpreted ones during a
    launch and puts them back afterwards, except when a kernel calls one of triton.language's own
    @jit helpers (tl.sum, tl.max, ...): that call patches triton.language.core and never restores
    it. A later real compilation in the same process (tests/test_triton_fast_launch.py compiles
    for sm_90) then fails inside Triton's code generator. Each test starts from the namespaces as
    they were before any kernel ran."""
    for ns, saved in _TRITON_LANGUAGE:
        current = vars(ns)
        for name, value in saved.items():
            if current.get(name) is not value:
                setattr(ns, name, value)
        if isinstance(ns, type):  # attributes the interpreter added to a class (e.g. __repr__)
            for name in [n for n in current if n not in saved and n != "__annotations__"]:
                delattr(ns, name)
    yield


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Where the triton backend runs: CUDA tensors, or CPU tensors in Triton's interpreter.
TRITON_DEVICES = [d for d in DEVICES if d == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"]


def backends_for(device):
    """Backends that can run on `device` here (besides 'reference', which tests compare to)."""
    names = []
    for name in llmfast.available_backends():
        if name == "cuda" and device == "cuda":
            names.append(name)
        elif name == "triton" and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
            names.append(name)
        elif name == "cpu" and device == "cpu":
            names.append(name)
        elif name == "reference":
            names.append(name)
    return names


def device_backend_params():
    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in backends_for(d)]


@pytest.fixture
def poison():
    """Makes torch.empty (also inside C++/CUDA launchers and Triton wrappers) return memory
    filled with NaN, so an output element a kernel forgot to write fails the comparison."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def pytest_collection_modifyitems(config, items):
    """LLMFAST_TEST_SHARD=i/n keeps every n-th collected test starting at the i-th, so that n
    processes share one run (scripts/gpu_run.sh runs the GPU tests so: Triton compiles on the
    CPU, and one process would leave most of the machine's cores idle)."""
    shard = os.environ.get("LLMFAST_TEST_SHARD")
    if not shard:
        return
    index, count = (int(part) for part in shard.split("/"))
    config.hook.pytest_deselected(items=[it for pos, it in enumerate(items) if pos % count != index])
    items[:] = [it for pos, it in enumerate(items) if pos % count == index]
