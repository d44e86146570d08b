"""Loads the compiled extension, llmfast._C, if it was built.

`import llmfast` must work where the extension could not be built (a pure-Python checkout,
a machine without a compiler): then the `cpu` and `cuda` backends are simply unavailable.
"""
import importlib

import torch  # noqa: F401  (loads libc10/libtorch, which llmfast._C links against)

_C = None
load_error = None
try:
    _C = importlib.import_module("llmfast._C")
except Exception as exc:  # ImportError, or an undefined-symbol OSError from a stale build
    load_error = exc

has_extension = _C is not None
built_with_cuda = bool(_C is not None and _C.built_with_cuda())
