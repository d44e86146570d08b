"""Tensor-parallel building blocks on torch.distributed.

The vocabulary-parallel cross-entropy (each rank of a process group holds a slice of the
vocabulary) is used through llmfast.functional.cross_entropy / linear_cross_entropy and
llmfast.nn.CrossEntropyLoss / LinearCrossEntropyLoss with `process_group=...`; its contract is
in llmfast.parallel.cross_entropy's docstring.
"""
from .cross_entropy import (
    VocabParallelCrossEntropyFunction,
    VocabParallelLinearCrossEntropyFunction,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

__all__ = [
    "VocabParallelCrossEntropyFunction",
    "VocabParallelLinearCrossEntropyFunction",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]
