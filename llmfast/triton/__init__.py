"""Triton implementations of the llmfast ops (one module per op)."""
