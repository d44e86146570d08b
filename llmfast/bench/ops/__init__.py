"""Benchmarked ops, one module each; every module here registers its OpSpec(s) on import
(llmfast.bench.spec.ops() imports them all). To add an op, add a file."""
