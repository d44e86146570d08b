"""Launches llmfast's Triton kernels with less host time than Triton's own `kernel[grid](...)`.

Why: on every launch, Triton's JITFunction.run binds and specializes each argument, formats a
string cache key from the result, looks the compiled kernel up and checks the kernel's globals
before it calls the compiled kernel's launcher. llmfast's kernels take 9 to 68 arguments; that
path costs 7 to 26 us of Python a launch on this project's CPU machine, the fast path 4 to 12
(scripts/triton_launch_cost.py), and a slow GPU host multiplies both: there small problems are
bound by host time (benchmarks/NOTES.md).

How: `fast_jit(jit_function)` wraps a @triton.jit kernel; `wrapped[grid](*args, **kwargs)` is
called exactly as the kernel is. The wrapper keys compiled kernels by everything Triton
specializes a launch on, computed with as little Python as possible:
- a tensor: its dtype and whether its data pointer is 16-byte aligned (Triton's "D");
- an int: its value (Triton specializes on == 1, divisibility by 16 and the int32 range, all
  functions of the value);
- a float: only that it is a float (Triton never specializes a runtime float argument; a
  constexpr float, positional or keyword, counts by value);
- anything else (bool, None, str, dtype, ...): its type and value;
- the keyword arguments (the constexprs and options such as num_warps): names, types and values;
- the current device.
The first launch with a key goes through Triton (which compiles if it must) and returns the
compiled kernel; the wrapper keeps it, with the parameters Triton would fill in by default. Later
launches with the same key call that kernel's launcher directly with the argument list Triton
itself passes (every parameter in signature order, constexprs included: the convention of
Triton 3.3 to 3.8 at least). Since equal keys imply equal specializations, a hit runs the very
kernel Triton would have chosen.

Triton's own path is taken, always, when: Triton runs in its interpreter (no wrapping at all);
the kernel has pre-run hooks; the grid is a callable; a keyword names a parameter that is not
a constexpr; the compiled kernel does not have the attributes this relies on (another Triton).
Not re-checked on the fast path: that the kernel's global variables have not changed (llmfast's
kernels read module constants only) and Triton knobs changed after a kernel was first launched
(debug mode, say): they apply to kernels compiled afterwards. `fast_launch_enabled(False)`
(or LLMFAST_TRITON_FAST_LAUNCH=0) switches the fast path off, for comparisons;
LLMFAST_TRITON_FAST_LAUNCH=check keeps it on and checks each fast launch against Triton's own
choice of compiled kernel (scripts/gpu_run.sh runs the GPU tests so).
"""
import functools
import inspect
import operator
import os

import torch

try:
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - triton is a dependency of this package
    JITFunction = None

__all__ = ["fast_jit", "fast_launch_enabled", "FastJITFunction"]

_ENABLED = os.environ.get("LLMFAST_TRITON_FAST_LAUNCH", "1") != "0"
# LLMFAST_TRITON_FAST_LAUNCH=check: every fast launch also asks Triton (JITFunction.warmup: its
# binder and cache, no launch) which compiled kernel it would run, and raises if that is not the
# one launched. For test runs on a GPU's Triton; it costs Triton's own bookkeeping again.
_CHECK = os.environ.get("LLMFAST_TRITON_FAST_LAUNCH", "1") == "check"
# Entries per kernel before the cache starts over: a key holds every int argument's value, so
# a run over many shapes would otherwise grow it without bound.
_MAX_ENTRIES = 4096


try:
    from triton.runtime import driver as _triton_driver
except ImportError:  # pragma: no cover
    _triton_driver = None


def _active_driver():
    """Triton's active driver object, without creating one (None before the first launch)."""
    return getattr(_triton_driver, "_active", None)


def fast_launch_enabled(enabled=None):
    """Returns whether the fast path is on; with a bool, switches it and returns the old state."""
    global _ENABLED
    old = _ENABLED
    if enabled is not None:
        _ENABLED = bool(enabled)
    return old


def _getter(positions):
    """args -> tuple of the args at `positions`, at C speed."""
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*positions)


class _ArgPlan:
    """For one tuple of argument types: which arguments are tensors, which are keyed by value
    (every one but the tensors and the runtime floats; a constexpr float counts by value), and
    the compiled kernels launched with arguments of these types (`entries`, by the rest of the
    key)."""
    __slots__ = ("tensors", "values", "entries")

    def __init__(self, types, constexpr_positions):
        tensor = torch.Tensor
        self.tensors = _getter([i for i, t in enumerate(types) if issubclass(t, tensor)])
        self.values = _getter([i for i, t in enumerate(types)
                               if not issubclass(t, tensor) and (t is not float or i in constexpr_positions)])
        self.entries = {}


class _Entry:
    __slots__ = ("run", "function", "packed_metadata", "kernel", "tail")

    def __init__(self, kernel, tail):
        self.kernel = kernel
        self.run = kernel.run
        self.function = kernel.function
        self.packed_metadata = kernel.packed_metadata
        self.tail = tail


class FastJITFunction:
    """A @triton.jit kernel launched through a cache of its compiled kernels (module docstring).
    `jit` is the wrapped JITFunction; `wrapped[grid](*args, **kwargs)` launches."""

    def __init__(self, jit):
        self.jit = jit
        params = list(jit.params)
        self._names = [p.name for p in params]
        self._constexpr = {p.name for p in params if p.is_constexpr}
        self._constexpr_positions = {i for i, p in enumerate(params) if p.is_constexpr}
        self._defaults = {p.name: p.default for p in params}
        self._plans = {}  # argument types -> _ArgPlan (which holds the compiled kernels)
        self._plain = False  # set when the fast path cannot serve this kernel on this Triton
        self._driver = None  # (get_current_device, get_current_stream, knobs.runtime, HookChain type)

    def __getattr__(self, name):  # the JITFunction's own attributes (fn, arg_names, params, ...)
        return getattr(self.jit, name)

    def __getitem__(self, grid):
        return functools.partial(self.launch, grid)

    def launch(self, grid, *args, **kwargs):
        """Launches the kernel on `grid` with `args` and `kwargs`, as kernel[grid](*args, **kwargs)."""
        if not _ENABLED or self._plain or type(grid) is not tuple or self.jit.pre_run_hooks:
            return self.jit[grid](*args, **kwargs)
        drv = self._driver
        if drv is None or drv[4] is not _active_driver():
            drv = self._bind_driver()
            if drv is None:
                return self.jit[grid](*args, **kwargs)
        types = tuple(map(type, args))
        plan = self._plans.get(types)
        if plan is None:
            if len(self._plans) >= _MAX_ENTRIES:
                self._plans.clear()
            plan = self._plans[types] = _ArgPlan(types, self._constexpr_positions)
        tensors = plan.tensors(args)
        kw_values = tuple(kwargs.values())
        device = drv[0]()
        # The key besides the argument types (the plan's): values, tensor dtypes, the pointers'
        # low 4 bits (0 = 16-byte aligned), keyword names, values and types (True is not 1).
        key = (device, plan.values(args), tuple([t.dtype for t in tensors]),
               tuple([t.data_ptr() & 15 for t in tensors]), tuple(kwargs), kw_values, tuple(map(type, kw_values)))
        try:
            entry = plan.entries.get(key)
        except TypeError:  # an unhashable argument: Triton's path
            return self.jit[grid](*args, **kwargs)
        if entry is None:
            return self._first_launch(plan.entries, key, grid, args, kwargs)
        if _CHECK:
            self._check(entry, grid, args, kwargs)
        n = len(grid)
        stream = drv[1](device)
        bound = (*args, *entry.tail) if entry.tail else args
        rt, chain = drv[2], drv[3]
        enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
        if ((enter is None or (type(enter) is chain and not enter.calls))
                and (leave is None or (type(leave) is chain and not leave.calls))):
            # no hook to call: no metadata either (Triton builds it only for hooks to read)
            metadata = enter = leave = None
        else:
            metadata = entry.kernel.launch_metadata(grid, stream, *bound)
        entry.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, entry.function,
                  entry.packed_metadata, metadata, enter, leave, *bound)
        return entry.kernel

    def _check(self, entry, grid, args, kwargs):
        picked = self.jit.warmup(*args, grid=grid, **kwargs)
        if hasattr(picked, "result"):
            picked = picked.result()
        if picked is not entry.kernel:
            raise RuntimeError(
                f"llmfast fast Triton launch: {self.jit.fn.__name__} would launch another compiled kernel than "
                f"Triton picks for these arguments (argument types {[type(a).__name__ for a in args]}, keywords "
                f"{kwargs}); please report this, and set LLMFAST_TRITON_FAST_LAUNCH=0 meanwhile")

    def _bind_driver(self):
        from triton import knobs
        from triton.runtime import driver

        active = driver.active
        if active.get_current_target().backend != "cuda":
            # other backends specialize on more than the key holds (AMD: tensor sizes)
            self._plain = True
            return None
        self._driver = (active.get_current_device, active.get_current_stream, knobs.runtime,
                        getattr(knobs, "HookChain", None), _active_driver())
        return self._driver

    def _first_launch(self, entries, key, grid, args, kwargs):
        kernel = self.jit[grid](*args, **kwargs)
        tail = self._tail(len(args), kwargs)
        if tail is None or kernel is None:
            return kernel
        if hasattr(kernel, "result"):  # a compile future
            kernel = kernel.result()
        try:
            entry = _Entry(kernel, tail)
        except AttributeError:  # compiled kernels of another make: Triton's path from now on
            self._plain = True
            return kernel
        if len(entries) >= _MAX_ENTRIES:
            entries.clear()
        entries[key] = entry
        return kernel

    def _tail(self, n_args, kwargs):
        """The values Triton binds to the parameters after the positional ones, in signature
        order, or None when the fast path must not serve these keywords."""
        names = self._names
        if n_args > len(names):
            return None
        for k in kwargs:
            if k in self._defaults and k not in self._constexpr:
                return None  # a runtime argument by keyword: its value is not in the key
            if k in names[:n_args]:
                return None  # given twice: Triton raises
        tail = []
        for name in names[n_args:]:
            if name in kwargs:
                tail.append(kwargs[name])
            else:
                default = self._defaults[name]
                if default is inspect.Parameter.empty:
                    return None  # missing: Triton raises
                tail.append(default)
        return tuple(tail)


def fast_jit(kernel):
    """Wraps a @triton.jit kernel in a FastJITFunction; returns it unchanged when it is not a
    JITFunction (Triton's interpreter)."""
    if JITFunction is None or type(kernel) is not JITFunction:
        return kernel
    try:
        return FastJITFunction(kernel)
    except AttributeError:  # a Triton whose JITFunction lacks what the wrapper reads: its own path
        return kernel
