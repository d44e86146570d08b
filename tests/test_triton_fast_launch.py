"""llmfast/triton/_launch.py against Triton's own launch path, without a GPU: Triton's driver is
replaced by a stub (llmfast/triton/_stub_driver.py), so JITFunction.run really binds,
specializes and compiles (for sm_90, with the ptxas in Triton's wheel) and the stub launcher
records what each path hands the compiled kernel's launcher.

The property that makes the fast path safe: for any arguments, it launches the compiled kernel
that Triton's own path picks for them, with the same launcher arguments.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton import knobs  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from llmfast.triton import _launch  # noqa: E402
from llmfast.triton._stub_driver import StubDriver, release_kernels, same_launch, stub_driver  # noqa: E402


def _toy(x_ptr, y_ptr, n, stride, f, FLAG: tl.constexpr, BLOCK: tl.constexpr, EXTRA: tl.constexpr = 3):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + i * stride, mask=i < n)
    if FLAG:
        v = v * f
    tl.store(y_ptr + i, v + EXTRA, mask=i < n)


def _can_compile():
    fn = JITFunction(_toy)
    try:
        with stub_driver():
            fn[(1,)](torch.zeros(16), torch.zeros(16), 16, 1, 1.0, FLAG=True, BLOCK=16)
            release_kernels(fn)
        return True
    except Exception:  # no ptxas / no CUDA backend in this Triton
        return False


pytestmark = pytest.mark.skipif(not _can_compile(), reason="Triton cannot compile for sm_90 here")


@pytest.fixture
def kernel():
    with stub_driver() as calls:
        fast = _launch.FastJITFunction(JITFunction(_toy))
        yield fast, calls
        release_kernels(fast.jit)


def _variants():
    """Argument lists that Triton specializes differently, and some it does not."""
    x32, y32 = torch.zeros(64), torch.zeros(64)
    x16 = torch.zeros(64, dtype=torch.float16)
    misaligned = torch.zeros(65)[1:]  # data pointer 4 bytes past a 16-byte boundary
    for args, kwargs in [
        ((x32, y32, 64, 1, 2.0), dict(FLAG=True, BLOCK=16)),
        ((x32, y32, 64, 1, 3.5), dict(FLAG=True, BLOCK=16)),  # another float: same kernel
        ((x32, y32, 64, 2, 2.0), dict(FLAG=True, BLOCK=16)),  # stride 2: not specialized to 1
        ((x32, y32, 64, 16, 2.0), dict(FLAG=True, BLOCK=16)),  # stride divisible by 16
        ((x32, y32, 63, 1, 2.0), dict(FLAG=True, BLOCK=16)),  # n not divisible by 16
        ((x32, y32, 2**33, 1, 2.0), dict(FLAG=True, BLOCK=16)),  # an int64 argument
        ((misaligned, y32, 64, 1, 2.0), dict(FLAG=True, BLOCK=16)),
        ((x32, misaligned, 64, 1, 2.0), dict(FLAG=True, BLOCK=16)),
        ((x16, y32, 64, 1, 2.0), dict(FLAG=True, BLOCK=16)),  # another dtype
        ((x32, y32, 64, 1, 2.0), dict(FLAG=False, BLOCK=16)),
        ((x32, y32, 64, 1, 2.0), dict(FLAG=1, BLOCK=16)),  # 1 is not True to Triton
        ((x32, y32, 64, 1, 2.0), dict(FLAG=True, BLOCK=32)),
        ((x32, y32, 64, 1, 2.0), dict(FLAG=True, BLOCK=16, EXTRA=5)),  # a default overridden
        ((x32, y32, 64, 1, 2.0), dict(FLAG=True, BLOCK=16, num_warps=2)),  # an option
        ((x32, y32, 64, 1, 2), dict(FLAG=True, BLOCK=16)),  # an int where a float was
        ((x32, y32, 64, True, 2.0), dict(FLAG=True, BLOCK=16)),  # a bool where an int was
    ]:
        yield args, kwargs


def test_fast_launch_runs_the_kernel_triton_picks_with_the_same_arguments(kernel):
    fast, calls = kernel
    seen = set()
    for _ in range(2):  # the first pass fills the cache through Triton; the second hits it
        for args, kwargs in _variants():
            picked = fast.jit[(3,)](*args, **kwargs)
            expected = calls[-1]
            got = fast[(3,)](*args, **kwargs)
            assert got is picked, (args, kwargs)
            assert same_launch(calls[-1], expected), (args, kwargs)
            assert calls[-1][3:6] == (0, f"function:{fast.jit.fn.__name__}", picked.packed_metadata)
            seen.add(id(picked))
    # Triton compiled most variants apart (not all: it does not specialize on every change)
    assert len(seen) >= 10
    # the fast path keeps one entry per variant but the float change (Triton does not specialize floats)
    n_entries = sum(len(p.entries) for p in fast._plans.values())
    assert n_entries == len(list(_variants())) - 1


def _toy_scaled(x_ptr, y_ptr, n, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * SCALE, mask=i < n)


def test_fast_launch_keys_a_positional_constexpr_float_by_value():
    x, y = torch.zeros(16), torch.zeros(16)
    with stub_driver():
        fast = _launch.FastJITFunction(JITFunction(_toy_scaled))
        try:
            for _ in range(2):
                for scale in (2.0, 3.0):
                    picked = fast.jit[(1,)](x, y, 16, scale, 16)
                    assert fast[(1,)](x, y, 16, scale, 16) is picked
            assert fast.jit[(1,)](x, y, 16, 2.0, 16) is not fast.jit[(1,)](x, y, 16, 3.0, 16)
        finally:
            release_kernels(fast.jit)


def test_check_mode_accepts_triton_s_choice_and_catches_another(kernel, monkeypatch):
    fast, calls = kernel
    monkeypatch.setattr(_launch, "_CHECK", True)
    x, y = torch.zeros(64), torch.zeros(64)
    for args, kwargs in _variants():
        fast[(1,)](*args, **kwargs)
        fast[(1,)](*args, **kwargs)  # checked against JITFunction.warmup: agrees
    # A key that wrongly ignored alignment would reuse the aligned kernel for a misaligned
    # pointer; the check catches it.
    misaligned = torch.zeros(65)[1:]
    entry = next(e for p in fast._plans.values() for k, e in p.entries.items()
                 if k[1] == (64, 1) and k[3] == (0, 0) and k[4] == ("FLAG", "BLOCK") and k[5] == (True, 16))
    for p in fast._plans.values():
        for k in list(p.entries):
            if k[3] == (4, 0):  # key: (device, values, dtypes, pointers' low bits, keywords...)
                p.entries[k] = entry
    with pytest.raises(RuntimeError, match="another compiled kernel"):
        fast[(1,)](misaligned, y, 64, 1, 2.0, FLAG=True, BLOCK=16)


def test_fast_launch_fills_in_constexpr_defaults_in_signature_order(kernel):
    fast, calls = kernel
    x, y = torch.zeros(64), torch.zeros(64)
    fast[(2, 1, 1)](x, y, 64, 1, 2.0, BLOCK=16, FLAG=False)  # keywords out of signature order
    fast[(2, 1, 1)](x, y, 64, 1, 2.0, BLOCK=16, FLAG=False)
    assert calls[-1][:3] == (2, 1, 1)
    assert calls[-1][9:14] == (x, y, 64, 1, 2.0) or all(
        a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(calls[-1][9:14], (x, y, 64, 1, 2.0)))
    assert calls[-1][14:] == (False, 16, 3)


def test_fast_launch_passes_metadata_when_a_hook_listens(kernel):
    fast, calls = kernel
    x, y = torch.zeros(64), torch.zeros(64)
    seen = []
    hook = seen.append
    fast[(1,)](x, y, 64, 1, 2.0, FLAG=True, BLOCK=16)
    fast[(1,)](x, y, 64, 1, 2.0, FLAG=True, BLOCK=16)
    assert calls[-1][6:9] == (None, None, None)  # nobody listens: nothing built
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
        undo = lambda: chain.remove(hook)  # noqa: E731
    else:
        knobs.runtime.launch_enter_hook = hook
        undo = lambda: setattr(knobs.runtime, "launch_enter_hook", chain)  # noqa: E731
    try:
        fast.jit[(1,)](x, y, 64, 1, 2.0, FLAG=True, BLOCK=16)
        expected = calls[-1]
        fast[(1,)](x, y, 64, 1, 2.0, FLAG=True, BLOCK=16)
        assert same_launch(calls[-1], expected, hooks=True)
        assert calls[-1][6] is not None and calls[-1][6].get()["name"] == expected[6].get()["name"]
        assert calls[-1][7] is knobs.runtime.launch_enter_hook
    finally:
        undo()


@pytest.mark.parametrize("case", ["disabled", "callable grid", "runtime keyword", "pre-run hook"])
def test_fast_launch_falls_back_to_triton(kernel, case, monkeypatch):
    fast, calls = kernel
    x, y = torch.zeros(64), torch.zeros(64)
    grid = (1,)
    args, kwargs = (x, y, 64, 1, 2.0), dict(FLAG=True, BLOCK=16)
    if case == "disabled":
        monkeypatch.setattr(_launch, "_ENABLED", False)
    elif case == "callable grid":
        grid = lambda meta: (1,)  # noqa: E731
    elif case == "runtime keyword":
        args, kwargs = (x, y, 64, 1), dict(f=2.0, FLAG=True, BLOCK=16)
    else:
        monkeypatch.setattr(fast.jit, "pre_run_hooks", [lambda *a, **k: None])
    taken = []
    real = fast.jit.run
    monkeypatch.setattr(fast.jit, "run", lambda *a, **k: taken.append(1) or real(*a, **k))
    for _ in range(3):
        fast[grid](*args, **kwargs)
    assert len(taken) == 3  # every launch went through Triton's run
    assert len(calls) == 3


def test_fast_launch_stays_off_for_other_backends():
    from triton.backends.compiler import GPUTarget

    with stub_driver(StubDriver(target=GPUTarget("hip", "gfx942", 64))):
        fast = _launch.FastJITFunction(JITFunction(_toy))
        assert fast._bind_driver() is None and fast._plain
        assert fast.launch.__func__  # and launches then take Triton's path (checked by the flag in launch)


def test_fast_launch_rebinds_when_the_driver_changes(kernel):
    fast, calls = kernel
    x, y = torch.zeros(64), torch.zeros(64)
    fast[(1,)](x, y, 64, 1, 2.0, FLAG=True, BLOCK=16)
    with stub_driver(StubDriver(stream=77)) as calls2:
        fast[(1,)](x, y, 64, 1, 2.0, FLAG=True, BLOCK=16)
        fast[(1,)](x, y, 64, 1, 2.0, FLAG=True, BLOCK=16)
        assert calls2[-1][3] == 77  # the new driver's stream


def test_fast_launch_cache_is_bounded(kernel, monkeypatch):
    fast, _ = kernel
    monkeypatch.setattr(_launch, "_MAX_ENTRIES", 4)
    x, y = torch.zeros(64), torch.zeros(64)
    for n in range(3, 40):
        fast[(1,)](x, y, n, 1, 2.0, FLAG=True, BLOCK=16)
    assert all(len(p.entries) <= 4 for p in fast._plans.values())


def test_fast_jit_leaves_interpreted_kernels_alone():
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = InterpretedFunction(_toy)
    assert _launch.fast_jit(interpreted) is interpreted
    wrapped = _launch.fast_jit(JITFunction(_toy))
    assert isinstance(wrapped, _launch.FastJITFunction) and wrapped.fn is _toy  # JITFunction attributes pass through


def test_llmfast_kernels_are_wrapped_outside_the_interpreter():
    """The kernel modules wrap their launched kernels (checked in a subprocess without
    TRITON_INTERPRET, where they are JIT functions)."""
    import os
    import subprocess
    import sys

    code = ("import llmfast.triton.attention as a, llmfast.triton.norm as n, llmfast.triton.cross_entropy as c\n"
            "from llmfast.triton._launch import FastJITFunction as F\n"
            "ks = [a._attn_fwd_kernel, a._attn_bwd_dq_kernel, a._attn_bwd_dkdv_kernel, a._attn_bwd_delta_kernel,\n"
            "      n._norm_fwd_kernel, n._norm_fwd_looped_kernel, n._norm_bwd_kernel, n._norm_bwd_row_sums_kernel,\n"
            "      n._norm_bwd_cols_kernel, n._sum_partials_kernel, c._ce_fwd_kernel, c._ce_target_weight_kernel,\n"
            "      c._ce_scale_grad_kernel]\n"
            "assert all(isinstance(k, F) for k in ks), [type(k) for k in ks]\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
