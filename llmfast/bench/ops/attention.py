"""Scaled dot-product attention, (B, H, S, D) layout, self-attention (Sq = Sk = S), no mask.

Shapes and flop counts from PERF.md. A shape is (B, H, S, D, causal) with causal 0 or 1 (a
4-tuple given with --shapes means non-causal). Providers: every llmfast backend (cuda and
triton on a GPU; cpu on the CPU), torch eager F.scaled_dot_product_attention
(torch's own backend choice), torch.compile of it, and SDPA restricted to one backend:
'sdpa-flash' (SDPBackend.FLASH_ATTENTION: FlashAttention-2 on CUDA, torch's flash kernel on the
CPU) and 'sdpa-cudnn' (SDPBackend.CUDNN_ATTENTION, CUDA only), skipped where unavailable.
"""
import torch
import torch.nn.functional as F

import llmfast.functional as LF
import llmfast.reference as R

from ..spec import Case, OpSpec, Unavailable, register


def _dims(shape):
    B, H, S, D, *rest = shape
    return B, H, S, D, bool(rest[0]) if rest else False


# --- flops --------------------------------------------------------------------------------------
def _attn_flops(shape, mode):
    B, H, S, D, causal = _dims(shape)
    # forward: Q @ K^T and P @ V, 2*S*S*D flops each per head = 4*B*H*Sq*Sk*D, halved when
    # causal (half of the scores are masked); backward 2.5x forward (five matmuls against two),
    # so fwd+bwd = 3.5x forward (PERF.md)
    fwd = 4 * B * H * S * S * D / (2 if causal else 1)
    return {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode] * fwd


# --- inputs -------------------------------------------------------------------------------------
def _attn_case(shape, dtype, device):
    B, H, S, D, causal = _dims(shape)

    def rand():
        return torch.randn((B, H, S, D), dtype=torch.float32, device=device).to(dtype).requires_grad_()

    args = {"query": rand(), "key": rand(), "value": rand(), "is_causal": causal}
    grad_out = torch.randn((B, H, S, D), dtype=torch.float32, device=device).to(dtype)
    return Case(args, ("query", "key", "value"), (grad_out,))


def _eager(a):
    return (F.scaled_dot_product_attention(a["query"], a["key"], a["value"], is_causal=a["is_causal"]),)


def _llmfast(a):
    return (LF.scaled_dot_product_attention(a["query"], a["key"], a["value"], is_causal=a["is_causal"]),)


_REFERENCE_SCORE_BYTES = 1 << 30  # fp32 scores per reference slice


def _reference(a):
    # llmfast.reference materializes the (S, S) scores in fp32: done a few heads at a time, so
    # the largest shape's reference (32 heads of 8192^2) fits beside everything else.
    q, k, v = a["query"], a["key"], a["value"]
    B, H, S, _ = q.shape
    heads = max(1, min(H, _REFERENCE_SCORE_BYTES // max(1, B * S * S * 4)))
    outs = [R.scaled_dot_product_attention(q[:, h:h + heads], k[:, h:h + heads], v[:, h:h + heads],
                                           is_causal=a["is_causal"])
            for h in range(0, H, heads)]
    return (torch.cat(outs, dim=1),)


# --- SDPA with one backend ----------------------------------------------------------------------
def _sdpa_peer(backend_name, cuda_only):
    def factory(device):
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError as exc:
            raise Unavailable(f"torch.nn.attention is missing ({exc})") from None
        backend = getattr(SDPBackend, backend_name, None)
        if backend is None:
            raise Unavailable(f"this torch has no SDPBackend.{backend_name}")
        if device.type != "cuda" and cuda_only:
            raise Unavailable(f"SDPBackend.{backend_name} needs a CUDA device")
        if device.type == "cuda":
            if backend_name == "FLASH_ATTENTION" and not torch.backends.cuda.is_flash_attention_available():
                raise Unavailable("this torch was built without FlashAttention")
            if backend_name == "CUDNN_ATTENTION" and not torch.backends.cudnn.is_available():
                raise Unavailable("cuDNN is not available")

        def forward(a):
            try:
                with sdpa_kernel(backend):
                    return _eager(a)
            except RuntimeError as exc:  # this backend cannot run this shape / dtype / GPU
                if "no available kernel" in str(exc).lower() or "no viable backend" in str(exc).lower():
                    raise Unavailable(f"SDPBackend.{backend_name} cannot run this case: "
                                      + str(exc).strip().splitlines()[0]) from None
                raise
        return forward
    return factory


_SHAPES_CUDA = [
    (8, 16, 1024, 64, 0), (8, 16, 1024, 64, 1),
    (4, 32, 2048, 128, 0), (4, 32, 2048, 128, 1),
    (2, 32, 4096, 128, 0), (2, 32, 4096, 128, 1),
    (1, 32, 8192, 128, 1),
]

register(OpSpec(
    name="attention",
    order=60,
    shapes={"cuda": _SHAPES_CUDA, "cpu": [(2, 4, 512, 64, 0), (2, 4, 512, 64, 1)]},
    quick_shapes={"cuda": [(8, 16, 1024, 64, 1), (2, 32, 4096, 128, 0), (2, 32, 4096, 128, 1)],
                  "cpu": [(1, 4, 256, 64, 0), (1, 4, 256, 64, 1)]},
    make_case=_attn_case,
    eager=_eager,
    llmfast_fn=_llmfast,
    reference=_reference,
    flops=_attn_flops,
    metric="TFLOP/s",
    formula=("fwd 4*B*H*S*S*D (halved when causal); bwd 2.5x and fwd+bwd 3.5x forward; q, k, v (B, H, S, D), "
             "self-attention, no mask, no dropout"),
    peers={"sdpa-flash": _sdpa_peer("FLASH_ATTENTION", cuda_only=False),
           "sdpa-cudnn": _sdpa_peer("CUDNN_ATTENTION", cuda_only=True)},
    peer_notes={
        "torch": "F.scaled_dot_product_attention with torch's own backend choice",
        "sdpa-flash": "F.scaled_dot_product_attention under sdpa_kernel(SDPBackend.FLASH_ATTENTION) "
                      "(FlashAttention-2 on CUDA)",
        "sdpa-cudnn": "F.scaled_dot_product_attention under sdpa_kernel(SDPBackend.CUDNN_ATTENTION)",
    },
    shape_names=("B", "H", "S", "D", "causal"),
))
