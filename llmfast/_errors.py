"""Exceptions raised for bad arguments.

They subclass both the Python exception a reader expects (ValueError / TypeError) and
RuntimeError, which is what torch itself raises for the same mistakes, so code written
against torch's functions keeps catching them.
"""


class LlmfastValueError(ValueError, RuntimeError):
    """An argument has the wrong shape, size or value."""


class LlmfastTypeError(TypeError, RuntimeError):
    """An argument has the wrong dtype or device."""


class LlmfastIndexError(IndexError, RuntimeError):
    """A class index (a cross-entropy target) is out of range (IndexError, as torch raises)."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine or for this input."""
