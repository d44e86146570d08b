"""llmfast: fused GPU kernels (CUDA C++ and Triton) for training transformer language models.

    import llmfast
    import llmfast.functional as LF      # mirrors torch.nn.functional
    import llmfast.nn as lnn             # drop-in subclasses of torch.nn modules

    llmfast.available_backends()         # e.g. ['cuda', 'triton', 'cpu', 'reference']
    with llmfast.use_backend("triton"):  # force one backend
        ...
"""
from . import _extension
from ._backend import BACKENDS, available_backends, current_backend, use_backend
from ._errors import BackendUnavailableError, LlmfastIndexError, LlmfastTypeError, LlmfastValueError
from . import functional, nn, reference  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "available_backends",
    "current_backend",
    "use_backend",
    "functional",
    "nn",
    "reference",
    "BackendUnavailableError",
    "LlmfastIndexError",
    "LlmfastTypeError",
    "LlmfastValueError",
]
