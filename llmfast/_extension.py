"""Loads the compiled extension, llmfast._C, if it was built.

`import llmfast` must work where the extension could not be built (a pure-Python checkout,
a machine without a compiler): then the `cpu` and `cuda` backends are simply unavailable.
"""
import glob
import importlib
import os
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which llmfast._C links against)

_C = None
load_error = None
try:
    _C = importlib.import_module("llmfast._C")
except Exception as exc:  # ImportError, or an undefined-symbol OSError from a stale build
    load_error = exc
    if glob.glob(os.path.join(os.path.dirname(__file__), "_C*.so")):
        # A build is there but does not load (built against another torch?): say so, since the
        # cpu and cuda backends silently falling back would hide it.
        warnings.warn(f"llmfast._C exists but failed to load, so the cpu and cuda backends are "
                      f"unavailable: {exc}", RuntimeWarning, stacklevel=2)

has_extension = _C is not None
built_with_cuda = bool(_C is not None and _C.built_with_cuda())
