"""Attention while decoding: one new query per sequence against a KV cache, forward only.

A shape is (B, Hq, Hkv, Sk, D): B sequences, Hq query heads, Hkv key/value heads (grouped-query
attention when Hkv < Hq), Sk cached keys, head dim D; no mask (every cached key is visible).
The step reads the cache once, so it is counted in bytes: read K and V (2*B*Hkv*Sk*D), read q
and write the output (2*B*Hq*D), times the element size. Inputs do not require grad (inference).
Providers: every llmfast backend, torch eager F.scaled_dot_product_attention (enable_gqa for
GQA) and torch.compile of it.
"""
import torch
import torch.nn.functional as F

import llmfast.functional as LF
import llmfast.reference as R

from ..spec import Case, OpSpec, register


def _bytes(shape, elt, mode):
    B, Hq, Hkv, Sk, D = shape
    return (2 * B * Hkv * Sk * D + 2 * B * Hq * D) * elt


def _case(shape, dtype, device):
    B, Hq, Hkv, Sk, D = shape

    def rand(*size):
        return torch.randn(size, dtype=torch.float32, device=device).to(dtype)

    args = {"query": rand(B, Hq, 1, D), "key": rand(B, Hkv, Sk, D), "value": rand(B, Hkv, Sk, D),
            "enable_gqa": Hq != Hkv}
    return Case(args, (), ())


def _eager(a):
    return (F.scaled_dot_product_attention(a["query"], a["key"], a["value"], enable_gqa=a["enable_gqa"]),)


def _llmfast(a):
    return (LF.scaled_dot_product_attention(a["query"], a["key"], a["value"], enable_gqa=a["enable_gqa"]),)


def _reference(a):
    return (R.scaled_dot_product_attention(a["query"], a["key"], a["value"], enable_gqa=a["enable_gqa"]),)


register(OpSpec(
    name="attention_decode",
    order=65,
    shapes={"cuda": [(8, 32, 8, 4096, 128), (1, 32, 32, 8192, 128), (32, 32, 8, 2048, 128)],
            "cpu": [(1, 32, 32, 4096, 128), (4, 32, 8, 2048, 128)]},
    quick_shapes={"cuda": [(8, 32, 8, 4096, 128)], "cpu": [(1, 8, 8, 1024, 64)]},
    make_case=_case,
    eager=_eager,
    llmfast_fn=_llmfast,
    reference=_reference,
    bytes=_bytes,
    formula="fwd (2*B*Hkv*Sk*D + 2*B*Hq*D)*elt: read the K and V cache, read q, write the output",
    modes=("fwd",),
    shape_names=("B", "Hq", "Hkv", "Sk", "D"),
))
