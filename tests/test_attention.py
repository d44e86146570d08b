"""Scaled dot-product attention: every kernel backend on the machine (cuda and triton on a GPU;
cpu and Triton's interpreter without one, where tests/test_cuda_emulation.py runs the CUDA
kernels through the SIMT emulator with these same checks) against the reference, by the
FlashAttention rule, for values and gradients (query, key, value and an additive mask); plus
the reference against torch, dropout, layouts, bad input, opcheck and torch.compile.

The FlashAttention rule: with gold = the reference in float64 and torch_err = the error of the
same formula computed by PyTorch in the input's own precision (reference.attention with
compute_dtype=dtype: fp16 matmuls and softmax), a kernel's max error must be at most
2 * torch_err + a small atol (relative to the largest gold value).

Shape grid, chosen to break lazy kernels in Triton's CPU interpreter (32 x 32 tiles there) while
keeping B * H <= 4 and S <= 257 so the file runs in a few minutes: S = 1 (decoding), 17 (less
than one tile), 128 (whole tiles), 257 (one element past whole tiles); D = 16, 40, 64, 72, 128
(padded to 16, 64, 64, 128, 128 in the kernel: 40 and 72 exercise the head-dim masks) plus 256
and Dv != D; causal with Sq > Sk and Sq < Sk (torch's top-left alignment); GQA and MQA;
key-padding, general boolean and additive masks, with rows whose keys are all masked; sliding
windows and softcap. The interpreter runs fp16 and fp32 (its bf16 tl.dot is wrong); GPU runs add
bf16.
"""
import math
import zlib

import pytest
import torch

import llmfast
import llmfast.functional as LF
from conftest import DEVICES, backends_for
from llmfast.reference.attention import attention as reference_attention

KERNEL_PARAMS = [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in backends_for(d)
                 if b in ("cuda", "triton", "cpu")]
NN_PARAMS = [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in backends_for(d)
             if b in ("cuda", "triton", "cpu", "reference")]
ALL_DTYPES = [torch.float16, torch.float32, torch.bfloat16]
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])
DTYPE_IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731

# atol of the FlashAttention rule, relative to max |gold|.
ATOL = {torch.float32: 2e-6, torch.float16: 5e-5, torch.bfloat16: 5e-4}

# (id, B, Hq, Hkv, Sq, Sk, D, Dv, is_causal, mask kind, window_size, softcap)
CASES = [
    ("decode_s1", 2, 2, 2, 1, 128, 64, 64, False, None, None, None),
    ("s1_d16", 1, 2, 2, 1, 1, 16, 16, False, None, None, None),
    ("s17_d40", 1, 2, 2, 17, 17, 40, 40, False, None, None, None),
    ("s128_d64_causal", 1, 2, 2, 128, 128, 64, 64, True, None, None, None),
    ("s257_d72", 1, 2, 2, 257, 257, 72, 72, False, None, None, None),
    ("s257_d128_causal", 1, 1, 1, 257, 257, 128, 128, True, None, None, None),
    ("causal_sq_gt_sk", 1, 2, 2, 257, 128, 64, 64, True, None, None, None),
    ("causal_sq_lt_sk", 1, 2, 2, 17, 257, 40, 40, True, None, None, None),
    ("gqa_causal", 1, 4, 2, 65, 97, 64, 64, True, None, None, None),
    ("mqa", 1, 4, 1, 33, 47, 32, 32, False, None, None, None),
    ("key_padding_dead_batch", 2, 2, 1, 48, 70, 64, 64, False, "key_padding", None, None),
    ("bool_mask_dead_rows", 1, 2, 2, 40, 50, 16, 16, False, "bool", None, None),
    ("additive_mask_grad", 1, 2, 2, 33, 65, 64, 64, False, "additive", None, None),
    ("additive_inf_causal_gqa", 1, 2, 1, 70, 70, 40, 40, True, "additive_inf", None, None),
    ("window", 1, 2, 2, 100, 120, 64, 64, False, None, (16, 8), None),
    ("window_causal_softcap", 1, 2, 2, 90, 90, 72, 72, True, None, (20, -1), 5.0),
    ("window_dead_rows", 1, 1, 1, 80, 40, 16, 16, False, None, (3, 0), None),
    ("wide_window", 1, 1, 1, 200, 190, 16, 16, False, None, (70, 45), None),
    ("left_window_only", 1, 2, 2, 150, 160, 16, 16, False, None, (40, -1), None),
    ("dv_ne_d", 1, 2, 2, 50, 60, 64, 32, False, None, None, None),
    ("d256", 1, 1, 1, 40, 40, 256, 256, True, None, None, None),
    # a few queries (decoding, speculative decoding): the cpu forward reads keys by rows
    ("few_queries_gqa_mask_grad", 2, 4, 2, 5, 150, 40, 40, False, "additive", None, None),
    ("few_queries_window_softcap", 1, 2, 2, 9, 130, 64, 64, True, None, (20, 3), 3.0),
    ("decode_key_padding", 2, 2, 2, 1, 100, 32, 32, False, "key_padding", None, None),
    ("two_queries_causal_sq_lt_sk", 1, 2, 1, 2, 70, 16, 16, True, None, None, None),
    ("few_queries_gqa_head_mask", 1, 4, 1, 5, 90, 32, 32, False, "bool", None, None),
    ("decode_gqa_16_heads_window", 2, 16, 2, 1, 200, 64, 64, False, None, (50, 0), None),
]


def _mask(kind, B, Hq, Sq, Sk, dtype, device):
    """A mask of `kind`, with rows whose keys are all masked for the *_dead / inf kinds."""
    if kind is None:
        return None
    if kind == "key_padding":  # (B, 1, 1, Sk); batch 0 has no visible key at all
        m = torch.rand(B, 1, 1, Sk, device=device) > 0.3
        m[0] = False
        return m
    if kind == "bool":  # (B, Hq, Sq, Sk); query 3 of every head sees nothing
        m = torch.rand(B, Hq, Sq, Sk, device=device) > 0.2
        m[:, :, 3] = False
        return m
    if kind == "additive":  # (Sq, Sk) broadcast over batch and heads, needs a gradient
        return (torch.randn(Sq, Sk, device=device) * 2).to(dtype).requires_grad_()
    if kind == "additive_inf":  # (B, 1, Sq, Sk) with -inf entries and one fully -inf row
        m = torch.randn(B, 1, Sq, Sk, device=device)
        m[torch.rand_like(m) < 0.2] = float("-inf")
        m[:, :, 5] = float("-inf")
        return m.to(dtype).requires_grad_()
    raise ValueError(kind)


def _fa_rule(actual, gold, lowp, dtype, what):
    assert actual.shape == gold.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(gold.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten element?)"
    err = (actual.double() - gold).abs().max().item()
    torch_err = (lowp.double() - gold).abs().max().item()
    bound = 2 * torch_err + ATOL[dtype] * max(1.0, gold.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > 2 x torch's {torch_err:.3g} + atol = {bound:.3g}"


def _check(device, backend, dtype, case, seed_text=None):
    name, B, Hq, Hkv, Sq, Sk, D, Dv, causal, mask_kind, window, softcap = case
    torch.manual_seed(zlib.crc32(repr((seed_text or name, str(dtype))).encode()))
    q = torch.randn(B, Hq, Sq, D, device=device).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, device=device).to(dtype)
    v = torch.randn(B, Hkv, Sk, Dv, device=device).to(dtype)
    mask = _mask(mask_kind, B, Hq, Sq, Sk, dtype, device)
    mask_grad = mask is not None and mask.dtype != torch.bool
    kw = dict(is_causal=causal, enable_gqa=Hq != Hkv, window_size=window, softcap=softcap)
    gout = torch.randn(B, Hq, Sq, Dv, device=device).to(dtype)

    def leaves(cast):
        ts = [t.detach().to(cast or t.dtype).requires_grad_() for t in (q, k, v)]
        m = mask.detach().to(cast or mask.dtype).requires_grad_() if mask_grad else mask
        return ts, m

    def grads(out, ts, m):
        wrt = ts + ([m] if mask_grad else [])
        return torch.autograd.grad(out, wrt, gout.to(out.dtype))

    (qg, kg, vg), mg = leaves(torch.float64)
    gold, gold_lse = reference_attention(qg, kg, vg, mg, **kw)
    gold_grads = grads(gold, [qg, kg, vg], mg)
    (ql, kl, vl), ml = leaves(None)
    lowp, _ = reference_attention(ql, kl, vl, ml, compute_dtype=dtype, **kw)
    lowp_grads = grads(lowp, [ql, kl, vl], ml)

    (qk, kk, vk), mk = leaves(None)
    with llmfast.use_backend(backend):
        out, lse = LF.scaled_dot_product_attention(qk, kk, vk, mk, return_lse=True, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    _fa_rule(out, gold, lowp, dtype, f"{name} out")
    dead = torch.isneginf(gold_lse)
    assert torch.equal(torch.isneginf(lse), dead), f"{name}: lse is -inf exactly for the fully masked rows"
    torch.testing.assert_close(lse[~dead].double(), gold_lse[~dead], atol=1e-4, rtol=1e-4)
    assert (out[dead] == 0).all(), f"{name}: fully masked rows must be 0"
    kernel_grads = grads(out, [qk, kk, vk], mk)
    for what, a, g, lo in zip(("dq", "dk", "dv", "dmask"), kernel_grads, gold_grads, lowp_grads):
        _fa_rule(a, g, lo, dtype, f"{name} {what}")
    assert (kernel_grads[0][dead] == 0).all(), f"{name}: fully masked rows get a zero dq"


# Triton's interpreter (the CPU runs of the triton backend) computes bf16 tl.dot wrongly, so
# bf16 runs only on GPUs there; the C++ CPU kernels take every dtype.
MATCH_PARAMS = [pytest.param(d, b, dt, id=f"{d}-{b}-{DTYPE_IDS(dt)}") for d in DEVICES for b in backends_for(d)
                if b in ("cuda", "triton", "cpu") for dt in (ALL_DTYPES if b == "cpu" else DTYPES)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("device,backend,dtype", MATCH_PARAMS)
def test_matches_reference(device, backend, dtype, case, poison):
    _check(device, backend, dtype, case)


@pytest.mark.parametrize("D", [16, 40, 64, 72, 128])
@pytest.mark.parametrize("S", [1, 17, 128, 257])
@pytest.mark.parametrize("device,backend", KERNEL_PARAMS)
def test_sequence_by_head_dim_grid(device, backend, S, D, poison):
    """The full S x D grid, one head, fp16, non-causal (the cases above cover the rest)."""
    _check(device, backend, torch.float16, (f"grid_{S}_{D}", 1, 1, 1, S, S, D, D, False, None, None, None))


# --- the reference itself ---------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_reference_matches_torch(device):
    """Where torch's function is defined (no extras), the reference is torch's semantics:
    causal top-left with Sq != Sk, bool / additive masks, GQA, scale, fully masked rows (torch
    >= 2.5 gives zeros there too)."""
    torch.manual_seed(3)
    F = torch.nn.functional
    for sq, sk in [(5, 9), (9, 5), (7, 7)]:
        q = torch.randn(2, 4, sq, 16, device=device, dtype=torch.float64)
        k = torch.randn(2, 2, sk, 16, device=device, dtype=torch.float64)
        v = torch.randn(2, 2, sk, 8, device=device, dtype=torch.float64)
        bool_mask = torch.rand(2, 1, sq, sk, device=device) > 0.3
        bool_mask[1, 0, 2] = False
        add_mask = torch.randn(sq, sk, device=device, dtype=torch.float64)
        for kw in [dict(is_causal=True), dict(attn_mask=bool_mask), dict(attn_mask=add_mask, scale=0.3), {}]:
            expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
            actual = llmfast.reference.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
            torch.testing.assert_close(actual, expected, msg=lambda m: f"{sq}x{sk} {list(kw)}: {m}")


def test_reference_extras():
    """window_size (-1, 0) is is_causal; softcap caps the scores before the mask."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    ref = llmfast.reference.scaled_dot_product_attention
    torch.testing.assert_close(ref(q, k, v, window_size=(-1, 0)), ref(q, k, v, is_causal=True))
    torch.testing.assert_close(ref(q, k, v, window_size=(-1, -1)), ref(q, k, v))
    capped = ref(q * 10, k, v, softcap=2.0)
    s = 2.0 * torch.tanh((q * 10) @ k.transpose(-1, -2) / math.sqrt(8) / 2.0)
    torch.testing.assert_close(capped, s.softmax(-1) @ v)
    out, lse = ref(q, k, v, return_lse=True)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(8), -1))


@pytest.mark.parametrize("device,backend", KERNEL_PARAMS)
def test_flash_attention_style_arguments(device, backend):
    """Arguments as FlashAttention's API and tests pass them: softcap=0.0 is off; window sides
    as one-element integer tensors (torch.randint) and any negative value as unbounded."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 11, 16, device=device) for _ in range(3))
    with llmfast.use_backend(backend):
        torch.testing.assert_close(LF.scaled_dot_product_attention(q, k, v, softcap=0.0),
                                   LF.scaled_dot_product_attention(q, k, v))
        window = torch.randint(0, 11, (2,))
        expected = LF.scaled_dot_product_attention(q, k, v, window_size=tuple(int(w) for w in window))
        torch.testing.assert_close(LF.scaled_dot_product_attention(q, k, v, window_size=window), expected)
        torch.testing.assert_close(LF.scaled_dot_product_attention(q, k, v, window_size=tuple(window)), expected)
        torch.testing.assert_close(LF.scaled_dot_product_attention(q, k, v, window_size=(-5, 2)),
                                   LF.scaled_dot_product_attention(q, k, v, window_size=(-1, 2)))
    torch.testing.assert_close(
        expected, llmfast.reference.scaled_dot_product_attention(q, k, v, window_size=tuple(int(w) for w in window)),
        atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(llmfast.reference.scaled_dot_product_attention(q, k, v, softcap=0.0),
                               llmfast.reference.scaled_dot_product_attention(q, k, v))


# --- dropout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", KERNEL_PARAMS)
@pytest.mark.parametrize("Hq,Hkv,Sq,causal", [(2, 2, 40, True), (8, 2, 3, False)], ids=["mha", "gqa_few_queries"])
def test_dropout_replays_with_the_reference(device, backend, Hq, Hkv, Sq, causal):
    """Recovers the kernel's dropout pattern (value = identity makes the output the dropped,
    rescaled probabilities), then checks output and gradients against the reference with that
    pattern, and the kept fraction. Grouped-query decoding stacks the query heads of a group in
    one tile: each row must still draw its own head's pattern (which the backward redraws)."""
    p, B, Sk, D = 0.25, 1, 48, 32
    torch.manual_seed(5)
    q = torch.randn(B, Hq, Sq, D, device=device)
    k, v = (torch.randn(B, Hkv, Sk, D, device=device) for _ in range(2))
    eye = torch.eye(Sk, device=device).expand(B, Hkv, Sk, Sk)
    gqa = dict(enable_gqa=Hq != Hkv)
    with llmfast.use_backend(backend):
        torch.manual_seed(11)
        probs = LF.scaled_dot_product_attention(q, k, eye, dropout_p=p, is_causal=causal, **gqa)
        torch.manual_seed(11)
        qk, kk, vk = (t.clone().requires_grad_() for t in (q, k, v))
        out = LF.scaled_dot_product_attention(qk, kk, vk, dropout_p=p, is_causal=causal, **gqa)
        torch.manual_seed(12)
        other = LF.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal, **gqa)
    keep = probs != 0
    band = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    band = band.tril() if causal else band
    kept = keep[..., band].float().mean().item()
    assert abs(kept - (1 - p)) < 0.05, f"kept fraction {kept:.3f}, expected {1 - p}"
    assert not torch.allclose(out, other), "another seed must give another pattern"
    if Hq != Hkv:
        assert not torch.equal(keep[:, 0], keep[:, 1]), "each query head draws its own pattern"

    ql, kl, vl = (t.double().requires_grad_() for t in (q, k, v))
    gold, _ = reference_attention(ql, kl, vl, None, p, causal, dropout_mask=keep, **gqa)
    torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5)
    gout = torch.randn_like(out)
    for a, g in zip(torch.autograd.grad(out, (qk, kk, vk), gout),
                    torch.autograd.grad(gold, (ql, kl, vl), gout.double())):
        torch.testing.assert_close(a.double(), g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", KERNEL_PARAMS + [pytest.param("cpu", "reference", id="cpu-reference")])
def test_dropout_of_one_drops_everything(device, backend):
    """dropout_p=1.0 is allowed, as in torch: the output and every gradient are zero."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, s, 16, device=device, requires_grad=True) for s in (5, 7, 7))
    with llmfast.use_backend(backend):
        out = LF.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    # torch's math path on the CPU (its CUDA kernels are not all zero at p = 1).
    gold = torch.nn.functional.scaled_dot_product_attention(*(t.detach().cpu() for t in (q, k, v)), dropout_p=1.0)
    assert out.shape == gold.shape and torch.equal(out, torch.zeros_like(out)) and torch.equal(gold, out.cpu())
    for g in torch.autograd.grad(out, (q, k, v), torch.randn_like(out)):
        assert torch.equal(g, torch.zeros_like(g))


# --- layouts and edge cases -------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", KERNEL_PARAMS)
def test_non_contiguous_views_of_fused_qkv(device, backend, poison):
    """q, k, v as views of one fused (B, S, 3 * H * D) projection (torch's strides for
    x.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)), and a key whose head dim is not the
    innermost (stride != 1)."""
    torch.manual_seed(6)
    B, S, H, D = 2, 37, 2, 40
    qkv = torch.randn(B, S, 3 * H * D, device=device).half().requires_grad_()
    q, k, v = qkv.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    k_t = torch.randn(B, H, D, S, device=device).half().transpose(-1, -2).requires_grad_()
    assert not q.is_contiguous() and k_t.stride(-1) != 1
    for key in (k, k_t):
        with llmfast.use_backend(backend):
            out = LF.scaled_dot_product_attention(q, key, v, is_causal=True)
        expected = llmfast.reference.scaled_dot_product_attention(q, key, v, is_causal=True)
        torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (qkv, key), g)
        want = torch.autograd.grad(expected, (qkv, key), g)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("layout", ["bshd", "sbhd", "bhsd"])
@pytest.mark.parametrize("device,backend", NN_PARAMS)
def test_output_follows_the_query_layout(device, backend, layout):
    """As torch's fused CPU kernels: the output has the query's memory order, so a (B, S, H, D)
    projection's attention output transposes back to a view (no copy), through the fast path
    and the general one (mask, return_lse); values and gradients unchanged."""
    torch.manual_seed(16)
    B, H, S, D = 2, 3, 9, 16
    perm = {"bshd": (0, 2, 1, 3), "sbhd": (1, 2, 0, 3), "bhsd": (0, 1, 2, 3)}[layout]
    shape = [(B, H, S, D)[i] for i in perm]
    q, k, v = (torch.randn(shape, device=device).permute(*[perm.index(i) for i in range(4)]).requires_grad_()
               for _ in range(3))
    mask = torch.rand(S, S, device=device) > 0.2
    mask[:, 0] = True
    theirs = torch.nn.functional.scaled_dot_product_attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu())
    with llmfast.use_backend(backend):
        outs = [LF.scaled_dot_product_attention(q, k, v, is_causal=True),
                LF.scaled_dot_product_attention(q, k, v, mask, return_lse=True)[0]]
    for out, kw in zip(outs, [dict(is_causal=True), dict(attn_mask=mask)]):
        assert out.stride() == theirs.stride()
        if layout == "bshd":
            out.transpose(1, 2).view(B, S, H * D)  # raises for another layout
        expected = llmfast.reference.scaled_dot_product_attention(q, k, v, **kw)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        g = torch.randn(B, H, S, D, device=device)
        for a, e in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g)):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device,backend", NN_PARAMS)
def test_broadcast_query_output_layout_is_torchs(device, backend):
    """A query of lower rank than key and value, or an expanded one, is broadcast (stride 0):
    its broadcast dims have no memory order and keep their place, the others are ordered as
    usual, with torch's strides (so out.view works where it does on torch's)."""
    torch.manual_seed(17)
    k, v = torch.randn(2, 4, 5, 8, device=device), torch.randn(2, 4, 5, 8, device=device)
    queries = [torch.randn(3, 8, device=device), torch.randn(4, 3, 8, device=device),
               torch.randn(2, 1, 3, 8, device=device).expand(2, 4, 3, 8),
               torch.randn(1, 3, 4, 8, device=device).transpose(1, 2).expand(2, 4, 3, 8)]
    for q in queries:
        with llmfast.use_backend(backend):
            out = LF.scaled_dot_product_attention(q, k, v)
        expected = torch.nn.functional.scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu())
        assert out.stride() == expected.stride(), tuple(q.shape)
        if expected.is_contiguous():
            out.view(-1, 8)
        torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", NN_PARAMS)
def test_query_layout_compiles_with_dynamic_shapes(device, backend):
    """The layout rule traces under torch.compile(fullgraph=True, dynamic=True) (symbolic
    strides), for two sequence lengths, with eager's values and layout."""
    torch._dynamo.reset()

    def f(x):
        B, S, _ = x.shape
        q = x.view(B, S, 2, 8).transpose(1, 2)
        return LF.scaled_dot_product_attention(q, q, q, is_causal=True)

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for S in (5, 9):
        x = torch.randn(2, S, 16, device=device)
        with llmfast.use_backend(backend):
            got, want = compiled(x), f(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got.stride() == want.stride()


@pytest.mark.parametrize("device,backend", KERNEL_PARAMS)
@pytest.mark.parametrize("Sq", [1, 2, 3, 16, 17])
def test_few_queries_read_cache_views(device, backend, Sq, poison):
    """Decoding reads keys and values from a cache: views of a longer preallocated cache (rows
    strided by the whole cache), of a fused projection (rows strided by 3 * H * D), or with the
    head dim not innermost; fp32 ones are read in place by the cpu kernel. Few queries (1 to 16)
    and one more, with dropout too."""
    torch.manual_seed(Sq)
    B, H, Sk, D, cap = 2, 2, 75, 32, 96
    q = torch.randn(B, H, Sq, D, device=device)
    cache = torch.randn(2, B, H, cap, D, device=device)
    fused = torch.randn(B, Sk, 3 * H * D, device=device).view(B, Sk, 3, H, D).permute(2, 0, 3, 1, 4)
    k_t = torch.randn(B, H, D, Sk, device=device).transpose(-1, -2)
    layouts = {"cache": (cache[0, :, :, :Sk], cache[1, :, :, :Sk]), "fused": (fused[1], fused[2]),
               "head_dim_outer": (k_t, fused[2])}
    for name, (k, v) in layouts.items():
        for dtype in (torch.float32, torch.float16):
            qd, kd, vd = (t.to(dtype) if dtype != torch.float32 else t for t in (q, k, v))
            kw = dict(is_causal=Sq > 1)
            with llmfast.use_backend(backend):
                out = LF.scaled_dot_product_attention(qd, kd, vd, **kw)
            gold, _ = reference_attention(*(t.double() for t in (qd, kd, vd)), None, **kw)
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(out.double(), gold, atol=tol, rtol=tol, msg=f"{name} {dtype}")
    if device == "cpu" and backend == "triton":
        return  # 200 dropout runs in Triton's interpreter take a minute; the GPU runs them
    # dropout: the output's mean over seeds is the dropout-free output (unbiased)
    k, v = layouts["cache"]
    with llmfast.use_backend(backend):
        outs = torch.stack([LF.scaled_dot_product_attention(q, k, v, dropout_p=0.3) for _ in range(200)])
    gold, _ = reference_attention(q.double(), k.double(), v.double(), None)
    assert (outs.double().mean(0) - gold).abs().max().item() < 0.25


def test_triton_copies_head_dims_whose_offsets_pass_int32():
    """The Triton kernels compute a head-dim offset (d * stride of the last dimension) in int32:
    a tensor with the head dim laid out outermost in a huge tensor (stride * D >= 2^31) is made
    contiguous first; ordinary strides pass through untouched (no copy). Meta tensors: sizes
    this large cannot be allocated in a test."""
    pytest.importorskip("triton")
    from llmfast.triton import attention as triton_attention

    D = 64
    huge = torch.empty_strided((1, 2, 8, D), (1, 8, 1, 2 ** 31 // D), device="meta")
    fine = torch.empty_strided((1, 2, 8, D), (1, 8, 1, 2 ** 31 // D - 1), device="meta")
    usual = torch.empty((2, 4, 16, D), device="meta").transpose(1, 2)
    got_huge, got_fine, got_usual = triton_attention._head_dim_offsets_fit(huge, fine, usual)
    assert got_huge.is_contiguous() and got_huge.shape == huge.shape
    assert got_fine is fine and got_usual is usual


@pytest.mark.skipif("triton" not in llmfast.available_backends(), reason="Triton is not usable here")
def test_auto_routes_batches_over_the_cuda_grid_limit_to_triton(monkeypatch):
    """The cuda kernels put heads and batch in the grid's y and z (at most 65535 each): under
    'auto' a larger problem goes to the triton kernels instead of failing (limit lowered here
    so that a small problem crosses it)."""
    import llmfast.functional as functional

    seen = []
    original = functional._ops.attention.attention_forward

    def record(backend, *args):
        seen.append(backend)
        return original("triton" if backend == "cuda" else backend, *args)

    monkeypatch.setattr(functional, "resolve", lambda op, device, dtype: "cuda")
    monkeypatch.setattr(functional._ops.attention, "attention_forward", record)
    monkeypatch.setattr(functional, "_CUDA_MAX_GRID_YZ", 3)
    # CUDA tensors where there is a GPU; else CPU tensors in Triton's interpreter.
    q = torch.randn(2, 2, 2, 5, 16, device="cuda" if torch.cuda.is_available() else "cpu")  # batch 4 > 3
    out = LF.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q), atol=1e-5, rtol=1e-5)
    assert seen == ["triton"]
    LF.scaled_dot_product_attention(q[:1], q[:1], q[:1])  # batch 2: within the limit
    assert seen == ["triton", "cuda"]


def check_nan_propagates_as_torch(backend, device, dtype):
    """A NaN in a query row or a key, and a NaN or +inf additive mask entry, make the output rows
    they reach NaN, as in torch: the kernels must not read such a row as fully masked (output 0).
    The NaN pattern and the finite values are compared with torch's own function."""
    torch.manual_seed(11)
    B, H, Sq, Sk, D = 1, 2, 37, 45, 32
    base = [torch.randn(B, H, s, D, device=device, dtype=dtype) for s in (Sq, Sk, Sk)]
    mask = torch.randn(B, H, Sq, Sk, device=device, dtype=dtype)
    cases = []
    q, k, v = (t.clone() for t in base)
    q[0, 0, 3] = float("nan")  # every score of one row NaN (no finite maximum)
    cases.append(("NaN query row", q, k, v, None, False))
    q, k, v = (t.clone() for t in base)
    k[0, 1, 20, 5] = float("nan")  # one key: the rows that see it (causal, top-left: rows >= 20)
    cases.append(("NaN key", q, k, v, None, True))
    m = mask.clone()
    m[0, 0, 5, 9], m[0, 1, 6, 44], m[0, 1, 20, 0] = float("nan"), float("inf"), float("-inf")
    cases.append(("NaN / inf mask entries", *base, m, False))
    for what, q, k, v, m, causal in cases:
        with llmfast.use_backend(backend):
            out, lse = LF.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, return_lse=True)
        cpu = [t.float().cpu() if t is not None else None for t in (q, k, v, m)]
        expected = torch.nn.functional.scaled_dot_product_attention(*cpu[:3], attn_mask=cpu[3], is_causal=causal)
        nan = torch.isnan(expected)
        assert nan.any() and torch.equal(nan.any(-1), nan.all(-1)), f"{what}: the case should reach whole rows"
        assert torch.equal(torch.isnan(out.float().cpu()), nan), f"{backend} {what}: NaN pattern differs from torch's"
        # The row's logsumexp is NaN too (not -inf, which backward would take for a fully masked
        # row and give zero gradients).
        assert torch.equal(torch.isnan(lse.cpu()), nan.all(-1)), f"{backend} {what}: lse of the NaN rows"
        torch.testing.assert_close(out.float().cpu()[~nan], expected[~nan], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("device,backend", KERNEL_PARAMS)
def test_nan_propagates_as_torch(device, backend):
    check_nan_propagates_as_torch(backend, device, torch.float32)
    if device != "cpu" or backend != "triton":  # (the interpreter's 16-bit dot products are slow)
        check_nan_propagates_as_torch(backend, device, torch.float16)


@pytest.mark.parametrize("device,backend", KERNEL_PARAMS)
def test_low_precision_broadcast_mask_gradient_sums_in_fp32(device, backend):
    """A bf16 additive key-padding mask (1, 1, 1, Sk) that requires grad: its gradient sums
    B * H * Sq terms a key; rounded to bf16 term by term (before autograd's sum) it was 2.75x
    further from the float64 truth than torch's. Judged as the FlashAttention rule."""
    interpreted = device == "cpu" and backend == "triton"  # (the interpreter's bf16 dots are wrong)
    dtype = torch.float16 if interpreted else torch.bfloat16
    torch.manual_seed(13)
    B, H, Sq, Sk, D = 4, 4, 16, 256, 32
    q, k, v = (torch.randn(B, H, s, D, device=device).to(dtype) for s in (Sq, Sk, Sk))
    mask = torch.randn(1, 1, 1, Sk, device=device).to(dtype)
    g = torch.randn(B, H, Sq, D, device=device).to(dtype)

    def mask_grad(fn, cast):
        m = mask.detach().to(cast).requires_grad_()
        out = fn(*(t.to(cast) for t in (q, k, v)), attn_mask=m)
        return torch.autograd.grad(out, m, g.to(cast))[0].double()

    truth = mask_grad(torch.nn.functional.scaled_dot_product_attention, torch.float64)
    torch_err = (mask_grad(torch.nn.functional.scaled_dot_product_attention, dtype) - truth).abs().max()
    with llmfast.use_backend(backend):
        ours = mask_grad(LF.scaled_dot_product_attention, dtype)
    assert (ours - truth).abs().max() <= 2 * torch_err + 1e-4 * truth.abs().max(), ((ours - truth).abs().max(), torch_err)


@pytest.mark.parametrize("device,backend", KERNEL_PARAMS)
def test_other_ranks_and_empty(device, backend):
    """(Hq, S, D) 3-D and (B, T, H, S, D) 5-D inputs; empty batch, Sq = 0 and Sk = 0."""
    torch.manual_seed(7)
    ref = llmfast.reference.scaled_dot_product_attention
    with llmfast.use_backend(backend):
        for shape in [(2, 9, 16), (2, 2, 1, 9, 16)]:
            q, k, v = (torch.randn(shape, device=device) for _ in range(3))
            torch.testing.assert_close(LF.scaled_dot_product_attention(q, k, v, is_causal=True),
                                       ref(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
        for qs, ks in [((0, 2, 5, 16), (0, 2, 5, 16)), ((1, 2, 0, 16), (1, 2, 5, 16)), ((1, 2, 5, 16), (1, 2, 0, 16))]:
            q = torch.randn(qs, device=device, requires_grad=True)
            k = torch.randn(ks, device=device, requires_grad=True)
            v = torch.randn(ks, device=device, requires_grad=True)
            out, lse = LF.scaled_dot_product_attention(q, k, v, return_lse=True)
            assert out.shape == qs and (out == 0).all() and torch.isneginf(lse).all()
            out.sum().backward()
            assert q.grad.shape == qs and (q.grad == 0).all() and (k.grad == 0).all()


@pytest.mark.parametrize("device,backend", KERNEL_PARAMS)
def test_lse_gradient(device, backend):
    """lse is differentiable (its gradient enters the backward through delta)."""
    torch.manual_seed(8)
    q, k, v = (torch.randn(1, 2, 20, 16, device=device, requires_grad=True) for _ in range(3))
    with llmfast.use_backend(backend):
        out, lse = LF.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    got = torch.autograd.grad((out.square().sum() + (lse * lse).sum()), (q, k, v))
    out_r, lse_r = llmfast.reference.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    want = torch.autograd.grad((out_r.square().sum() + (lse_r * lse_r).sum()), (q, k, v))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device,backend", KERNEL_PARAMS)
def test_batch_and_head_broadcasting_as_torch(device, backend):
    """Batch dimensions broadcast (missing ones count as 1) and a single query or key head
    broadcasts over the other side's heads, as in torch's math path; gradients reduce back."""
    shapes = [((2, 3, 5, 16), (1, 3, 6, 16)), ((2, 2, 3, 5, 16), (3, 6, 16)), ((3, 5, 16), (2, 3, 6, 16)),
              ((2, 3, 5, 16), (2, 1, 6, 16)), ((2, 1, 5, 16), (2, 3, 6, 16)), ((5, 16), (6, 16)),
              # ranks under 4 that differ: the output has the largest rank, as torch's
              ((2, 5, 16), (6, 16)), ((5, 16), (1, 6, 16))]
    for qs, ks in shapes:
        torch.manual_seed(zlib.crc32(repr((qs, ks)).encode()))
        q, k, v = (torch.randn(*s, device=device, requires_grad=True) for s in (qs, ks, ks))
        with llmfast.use_backend(backend):
            out = LF.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), is_causal=True)
        assert out.shape == ref.shape, (qs, ks)
        torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g.to(out.dtype)), torch.autograd.grad(ref, (q, k, v), g)):
            torch.testing.assert_close(a.double(), b.double(), atol=2e-4, rtol=2e-4)
    # Key and value head counts that differ, one of them 1, broadcast too (torch's matmuls do),
    # without enable_gqa.
    for heads in [(3, 1, 3), (3, 3, 1), (1, 1, 3), (1, 3, 1)]:
        torch.manual_seed(zlib.crc32(repr(heads).encode()))
        q, k, v = (torch.randn(2, h, s, 16, device=device, requires_grad=True) for h, s in zip(heads, (5, 6, 6)))
        with llmfast.use_backend(backend):
            out = LF.scaled_dot_product_attention(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.double() for t in (q, k, v)))
        assert out.shape == ref.shape, heads
        torch.testing.assert_close(out.double(), ref, atol=2e-4, rtol=2e-4)
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g.to(out.dtype)), torch.autograd.grad(ref, (q, k, v), g)):
            torch.testing.assert_close(a.double(), b.double(), atol=2e-4, rtol=2e-4)


# --- backend choice and bad input -------------------------------------------------------------
def test_backend_choice():
    q = torch.randn(1, 2, 5, 16)
    expected = llmfast.reference.scaled_dot_product_attention(q, q, q)
    # auto on CPU tensors: the C++ kernels when llmfast._C is built, else the reference path.
    torch.testing.assert_close(LF.scaled_dot_product_attention(q, q, q), expected)
    big = torch.randn(1, 1, 3, 264)
    torch.testing.assert_close(LF.scaled_dot_product_attention(big, big, big),
                               llmfast.reference.scaled_dot_product_attention(big, big, big))
    if "cpu" in llmfast.available_backends():
        # The C++ kernels have no head-dim limit: a forced 'cpu' serves D = 264 itself.
        with llmfast.use_backend("cpu"):
            torch.testing.assert_close(LF.scaled_dot_product_attention(big, big, big),
                                       llmfast.reference.scaled_dot_product_attention(big, big, big))
        if torch.cuda.is_available():
            with llmfast.use_backend("cpu"), pytest.raises(llmfast.BackendUnavailableError, match="cannot run"):
                LF.scaled_dot_product_attention(q.cuda(), q.cuda(), q.cuda())
    if KERNEL_PARAMS:
        device = KERNEL_PARAMS[0].values[0]
        big = big.to(device)
        for backend, dev in (("triton", "cuda" if torch.cuda.is_available() else "cpu"), ("cuda", "cuda")):
            if (backend, dev) in [tuple(p.values) for p in KERNEL_PARAMS]:
                x = big.to(dev)
                with llmfast.use_backend(backend), pytest.raises(llmfast.BackendUnavailableError,
                                                                 match="query's head dim"):
                    LF.scaled_dot_product_attention(x, x, x)
        with llmfast.use_backend("auto"):
            LF.scaled_dot_product_attention(big, big, big)  # falls back to the reference


@pytest.mark.parametrize("device,backend", KERNEL_PARAMS + [pytest.param("cpu", "reference", id="cpu-reference")])
def test_autocast_casts_inputs_as_torch(device, backend):
    """Under torch.autocast, as torch: float32 q, k, v and a float mask run in the autocast
    dtype, the output comes back in it, the gradients in float32."""
    torch.manual_seed(13)
    # float16 for Triton's interpreter (its bfloat16 tl.dot is wrong) and on the GPU
    dt = torch.bfloat16 if device == "cpu" and backend != "triton" else torch.float16
    q, k, v = (torch.randn(2, 2, s, 16, device=device, requires_grad=True) for s in (9, 11, 11))
    mask = torch.randn(9, 11, device=device)
    with torch.autocast(device, dtype=dt):
        with llmfast.use_backend(backend):
            out = LF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.dtype == want.dtype == dt
    torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=3e-2)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_float64_uses_reference_path():
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: LF.scaled_dot_product_attention(a, b, c, is_causal=True),
                                    (q, k, v))


@pytest.mark.parametrize("device,backend", KERNEL_PARAMS + [pytest.param("cpu", "reference", id="cpu-reference")])
def test_bad_input_names_the_argument(device, backend):
    q = torch.randn(1, 4, 5, 16, device=device)
    k = torch.randn(1, 2, 7, 16, device=device)
    cases = [
        (lambda: LF.scaled_dot_product_attention(q, k, k), "enable_gqa"),
        (lambda: LF.scaled_dot_product_attention(q, torch.randn(1, 3, 7, 16, device=device),
                                                 k[:, :1].expand(1, 3, 7, 16), enable_gqa=True), "multiple"),
        (lambda: LF.scaled_dot_product_attention(q, k[..., :8], k, enable_gqa=True), "key"),
        (lambda: LF.scaled_dot_product_attention(q, k, k[:, :, :6], enable_gqa=True), "value"),
        (lambda: LF.scaled_dot_product_attention(q, k.half(), k, enable_gqa=True), "key"),
        (lambda: LF.scaled_dot_product_attention(q.long(), k, k), "query"),
        (lambda: LF.scaled_dot_product_attention(q, k, k, torch.ones(5, 6, device=device), enable_gqa=True),
         "attn_mask"),
        (lambda: LF.scaled_dot_product_attention(q, k, k, torch.ones(5, 7, dtype=torch.int32, device=device),
                                                 enable_gqa=True), "attn_mask"),
        (lambda: LF.scaled_dot_product_attention(q, k, k, dropout_p=1.5, enable_gqa=True), "dropout_p"),
        (lambda: LF.scaled_dot_product_attention(q, k, k, scale=float("nan"), enable_gqa=True), "scale"),
        (lambda: LF.scaled_dot_product_attention(q, k, k, softcap=-1.0, enable_gqa=True), "softcap"),
        (lambda: LF.scaled_dot_product_attention(q, k, k, window_size=(1.5, 3), enable_gqa=True), "window_size"),
        (lambda: LF.scaled_dot_product_attention(q, k, k, window_size=4, enable_gqa=True), "window_size"),
        (lambda: LF.scaled_dot_product_attention(q, k, k, is_causal=1, enable_gqa=True), "is_causal"),
        (lambda: LF.scaled_dot_product_attention(q.expand(2, 4, 5, 16), torch.randn(3, 2, 7, 16, device=device),
                                                 torch.randn(3, 2, 7, 16, device=device), enable_gqa=True), "broadcast"),
    ]
    with llmfast.use_backend(backend):
        for call, name in cases:
            with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
                call()


@pytest.mark.skipif("cpu" not in llmfast.available_backends(), reason="llmfast._C is not built")
def test_cpu_op_checks_name_the_argument():
    """The C++ op checks its own contract (it can be called without llmfast.functional)."""
    fwd, bwd = torch.ops.llmfast.attention_fwd, torch.ops.llmfast.attention_bwd
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 7, 16)
    cases = [
        (lambda: fwd(q, torch.randn(1, 3, 7, 16), torch.randn(1, 3, 7, 16), None, 1.0, -1, -1, 0.0, 0.0, None),
         "multiple of key's heads"),
        (lambda: fwd(q, k[..., :8], k, None, 1.0, -1, -1, 0.0, 0.0, None), "key must have shape"),
        (lambda: fwd(q, k, k[:, :, :6], None, 1.0, -1, -1, 0.0, 0.0, None), "value must have shape"),
        (lambda: fwd(q, k.half(), k, None, 1.0, -1, -1, 0.0, 0.0, None), "key must have query's dtype"),
        (lambda: fwd(q[0], k, k, None, 1.0, -1, -1, 0.0, 0.0, None), "query must be 4-D"),
        (lambda: fwd(q, k, k, torch.ones(1, 4, 5, 6), 1.0, -1, -1, 0.0, 0.0, None), "attn_mask must have shape"),
        (lambda: fwd(q, k, k, torch.ones(1, 4, 5, 7, dtype=torch.int32), 1.0, -1, -1, 0.0, 0.0, None),
         "attn_mask must be bool or floating"),
        (lambda: fwd(q, k, k, None, 1.0, -1, -1, 0.0, 0.5, None), "seed must be given"),
        (lambda: fwd(q, k, k, None, 1.0, -1, -1, 0.0, 0.5, torch.zeros(2, dtype=torch.int64)), "seed must be"),
        (lambda: fwd(q, k, k, None, 1.0, -2, -1, 0.0, 0.0, None), "window_left"),
        (lambda: bwd(torch.randn(1, 4, 5, 8), q, k, k, torch.randn(1, 4, 5, 16), torch.randn(1, 4, 5), None,
                     None, 1.0, -1, -1, 0.0, 0.0, None, False), "grad_out must have shape"),
    ]
    for call, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            call()


@pytest.mark.skipif("cpu" not in llmfast.available_backends(), reason="llmfast._C is not built")
def test_cpu_kernels_are_deterministic_and_threaded_alike():
    """The backward has no atomics: one thread and all threads give bitwise the same gradients."""
    torch.manual_seed(13)
    q = torch.randn(2, 4, 150, 32, requires_grad=True)
    k, v = (torch.randn(2, 2, 170, 32, requires_grad=True) for _ in range(2))

    def run():
        with llmfast.use_backend("cpu"):
            out = LF.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))

    many = run()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(many, one):
        assert torch.equal(a, b)


def _cpu_attention_run(config, dtype):
    """Output, lse and gradients of one cpu-backend attention call (config: causal, mask kind,
    window, softcap, dropout_p, query heads per kv head)."""
    causal, mask_kind, window, softcap, dropout_p, group = config
    torch.manual_seed(zlib.crc32(repr((config, str(dtype))).encode()))
    B, Hkv, Sq, Sk, D = 2, 2, 150, 170, 40
    q = torch.randn(B, Hkv * group, Sq, D).to(dtype).requires_grad_()
    k, v = (torch.randn(B, Hkv, Sk, D).to(dtype).requires_grad_() for _ in range(2))
    mask = None
    if mask_kind == "additive":
        mask = torch.randn(Sq, Sk).to(dtype).requires_grad_()
    elif mask_kind == "key_padding":
        mask = torch.rand(B, 1, 1, Sk) > 0.3
    torch.manual_seed(5)
    with llmfast.use_backend("cpu"):
        out, lse = LF.scaled_dot_product_attention(q, k, v, mask, dropout_p=dropout_p, is_causal=causal,
                                                   enable_gqa=group > 1, window_size=window,
                                                   softcap=softcap, return_lse=True)
    wrt = [q, k, v] + ([mask] if mask_kind == "additive" else [])
    gout = torch.randn(out.shape).to(dtype)
    return (out, lse, *torch.autograd.grad(out, wrt, gout))


CPU_PLAN_CONFIGS = [
    (False, None, None, None, 0.0, 1),
    (True, None, None, None, 0.0, 3),
    (False, "additive", None, None, 0.0, 2),
    (True, "key_padding", (30, 10), None, 0.2, 1),
    (False, None, (40, -1), 4.0, 0.0, 2),
]


@pytest.mark.skipif("cpu" not in llmfast.available_backends(), reason="llmfast._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize("config", CPU_PLAN_CONFIGS, ids=range(len(CPU_PLAN_CONFIGS)))
def test_cpu_plans_and_tiles_give_bitwise_the_same_results(config, dtype, monkeypatch):
    """The cpu kernels choose their plan from the thread count and the problem: tasks per
    (batch, kv head) (the backward in a single pass) or per tile (the backward in two passes),
    and 64 or 128 queries a forward tile. So that results do not depend on the machine, every
    choice gives the same bits (the results themselves are checked against the reference by
    test_matches_reference)."""
    monkeypatch.setenv("LLMFAST_ATTENTION_CPU_TASKS", "head")
    monkeypatch.setenv("LLMFAST_ATTENTION_CPU_BLOCK_M", "64")
    first = _cpu_attention_run(config, dtype)
    for plan, block_m in (("tile", "128"), ("head", "100"), ("tile", "64")):
        monkeypatch.setenv("LLMFAST_ATTENTION_CPU_TASKS", plan)
        monkeypatch.setenv("LLMFAST_ATTENTION_CPU_BLOCK_M", block_m)
        for what, a, b in zip(("out", "lse", "dq", "dk", "dv", "dmask"), _cpu_attention_run(config, dtype), first):
            assert torch.equal(a, b), f"{what} differs with plan={plan}, block_m={block_m}"


@pytest.mark.skipif("cpu" not in llmfast.available_backends(), reason="llmfast._C is not built")
def test_cpu_forward_block_override_is_checked(monkeypatch):
    monkeypatch.setenv("LLMFAST_ATTENTION_CPU_BLOCK_M", "0")
    q = torch.randn(1, 1, 4, 8)
    with llmfast.use_backend("cpu"), pytest.raises(RuntimeError, match="LLMFAST_ATTENTION_CPU_BLOCK_M"):
        LF.scaled_dot_product_attention(q, q, q)


# --- torch.library: opcheck and torch.compile ---------------------------------------------------
@pytest.mark.parametrize("device,backend", KERNEL_PARAMS)
def test_opcheck(device, backend):
    torch.manual_seed(9)
    if backend == "triton":
        fwd, bwd = torch.ops.llmfast.triton_attention_fwd, torch.ops.llmfast.triton_attention_bwd
    else:
        fwd, bwd = torch.ops.llmfast.attention_fwd, torch.ops.llmfast.attention_bwd
    q = torch.randn(1, 2, 9, 16, device=device, requires_grad=True)
    k = torch.randn(1, 1, 11, 16, device=device, requires_grad=True)
    v = torch.randn(1, 1, 11, 8, device=device, requires_grad=True)
    mask = torch.randn(9, 11, device=device).expand(1, 2, 9, 11).detach().requires_grad_()
    seed = torch.tensor([3], dtype=torch.int64, device=device)
    torch.library.opcheck(fwd, (q, k, v, mask, 0.25, -1, 0, 0.0, 0.0, None))
    torch.library.opcheck(fwd, (q, k, v, None, 0.25, 4, -1, 3.0, 0.2, seed))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), mask.detach(), 0.25, -1, 0, 0.0, 0.0, None)
    torch.library.opcheck(bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                                torch.randn_like(lse), mask.detach(), 0.25, -1, 0, 0.0, 0.0, None, True))


@pytest.mark.parametrize("device,backend", KERNEL_PARAMS)
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()

    def block(q, k, v, mask):
        out = LF.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, softcap=4.0)
        out2, lse = LF.scaled_dot_product_attention(out, k, v, is_causal=True, enable_gqa=True, return_lse=True)
        return out2 * 2 + lse[..., None]

    torch.manual_seed(10)
    q = torch.randn(1, 2, 19, 16, device=device, requires_grad=True)
    k = torch.randn(1, 1, 23, 16, device=device, requires_grad=True)
    v = torch.randn(1, 1, 23, 16, device=device, requires_grad=True)
    mask = torch.randn(19, 23, device=device, requires_grad=True)
    with llmfast.use_backend(backend):
        eager = block(q, k, v, mask)
        g_eager = torch.autograd.grad(eager.square().sum(), (q, k, v, mask))
        compiled = torch.compile(block, fullgraph=True)(q, k, v, mask)
        g_comp = torch.autograd.grad(compiled.square().sum(), (q, k, v, mask))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    for a, e in zip(g_comp, g_eager):
        torch.testing.assert_close(a, e, atol=1e-3, rtol=1e-4)


# --- nn modules -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's, for config 5
@pytest.mark.parametrize("device,backend", NN_PARAMS)
def test_multihead_attention_is_drop_in(device, backend):
    torch.manual_seed(13)
    E, H, N, L, S = 32, 2, 2, 9, 11
    configs = [
        dict(ctor=dict(batch_first=True), self_attn=True, kpm="bool"),
        dict(ctor=dict(kdim=24, vdim=20), self_attn=False, attn_mask="float"),
        dict(ctor=dict(batch_first=True, bias=False), self_attn=True, attn_mask="causal", is_causal=True),
        dict(ctor=dict(), self_attn=False, kpm="bool", attn_mask="bool"),
        dict(ctor=dict(batch_first=True), self_attn=False, kpm="float", attn_mask="bool3d"),
        dict(ctor=dict(), self_attn=True, unbatched=True, kpm="bool"),
        # Unbatched inputs are sequence-first whatever batch_first says (as in torch).
        dict(ctor=dict(batch_first=True), self_attn=False, unbatched=True, kpm="bool", attn_mask="float"),
        dict(ctor=dict(batch_first=True), self_attn=True, unbatched=True),
    ]
    for cfg in configs:
        ours = llmfast.nn.MultiheadAttention(E, H, **cfg["ctor"]).to(device)
        theirs = torch.nn.MultiheadAttention(E, H, **cfg["ctor"]).to(device)
        assert isinstance(ours, torch.nn.MultiheadAttention)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        ours.load_state_dict(theirs.state_dict())
        bf = cfg["ctor"].get("batch_first", False)
        s = L if cfg["self_attn"] else S
        kd, vd = cfg["ctor"].get("kdim", E), cfg["ctor"].get("vdim", E)

        def seq(n, length, dim):
            if cfg.get("unbatched"):
                return torch.randn(length, dim, device=device)
            return torch.randn(n, length, dim, device=device) if bf else torch.randn(length, n, dim, device=device)

        x = seq(N, L, E).requires_grad_()
        if cfg["self_attn"]:
            q = k = v = x
        else:
            q, k, v = x, seq(N, s, kd), seq(N, s, vd)
        kw = {}
        n = 1 if cfg.get("unbatched") else N
        if cfg.get("kpm") == "bool":
            kpm = torch.zeros(n, s, dtype=torch.bool, device=device)
            kpm[-1, -3:] = True  # padding at the end of the last sequence
            kw["key_padding_mask"] = kpm[0] if cfg.get("unbatched") else kpm
        elif cfg.get("kpm") == "float":
            kw["key_padding_mask"] = torch.randn(n, s, device=device)
        if cfg.get("attn_mask") == "float":
            kw["attn_mask"] = torch.randn(L, s, device=device)
        elif cfg.get("attn_mask") == "bool":
            kw["attn_mask"] = torch.rand(L, s, device=device) < 0.2
            kw["attn_mask"][:, 0] = False  # every query keeps a key
        elif cfg.get("attn_mask") == "bool3d":
            kw["attn_mask"] = torch.rand(n * H, L, s, device=device) < 0.2
            kw["attn_mask"][..., 0] = False
        elif cfg.get("attn_mask") == "causal":
            kw["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L, device=device)
        if cfg.get("is_causal"):
            kw["is_causal"] = True
        with llmfast.use_backend(backend):
            out, weights = ours(q, k, v, need_weights=False, **kw)
            g = torch.autograd.grad(out.square().sum(), (x, ours.in_proj_weight if ours.in_proj_weight is not None
                                                        else ours.q_proj_weight))
            out_w, w = ours(q, k, v, **kw)  # need_weights=True: torch's path
        expected, _ = theirs(q, k, v, need_weights=False, **kw)
        g_exp = torch.autograd.grad(expected.square().sum(), (x, theirs.in_proj_weight if theirs.in_proj_weight
                                                              is not None else theirs.q_proj_weight))
        assert weights is None and w is not None
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{cfg}: {m}")
        assert out.stride() == expected.stride(), f"{cfg}: torch's output layout"  # e.g. for out.view(-1, E)
        for a, e in zip(g, g_exp):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=lambda m: f"{cfg} grad: {m}")
        torch.testing.assert_close(out_w, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_refuses_what_torch_refuses(batch_first):
    """Masks and inputs of the wrong shape raise an error naming the argument (torch's module
    raises for each too) rather than being reinterpreted by a view of the same size."""
    torch.manual_seed(15)
    E, H, L, S, N = 16, 4, 5, 7, 3
    ours = llmfast.nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=12)
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=12)
    ours.load_state_dict(theirs.state_dict())

    def seq(length, dim, n=N):
        return torch.randn(n, length, dim) if batch_first else torch.randn(length, n, dim)

    q, k, v = seq(L, E), seq(S, 12), seq(S, E)
    cases = [
        (dict(key_padding_mask=torch.rand(S, N) > 0.5), "key_padding_mask"),  # (S, N) for (N, S): same size
        (dict(key_padding_mask=torch.rand(N, S + 1) > 0.5), "key_padding_mask"),
        (dict(attn_mask=torch.rand(N * H, S, L) > 0.5), "attn_mask"),  # transposed, same size
        (dict(attn_mask=torch.rand(1, S) > 0.5), "attn_mask"),
        (dict(attn_mask=torch.zeros(N, H, L, S)), "attn_mask"),
        (dict(attn_mask=torch.zeros(N, L, S)), "attn_mask"),
        (dict(key=seq(S + 1, 12)), "key and value"),
        (dict(query=seq(L, E, N + 1)), "batch"),
        (dict(query=seq(L, E + 1)), "query"),
        (dict(key=seq(S, E)), "key"),
        (dict(query=torch.randn(L, E)), "key"),  # unbatched query, batched key
    ]
    for kw, name in cases:
        args = dict(query=q, key=k, value=v)
        args.update({a: kw.pop(a) for a in ("query", "key", "value") if a in kw})
        with pytest.raises(Exception):
            theirs(**args, need_weights=False, **kw)
        with pytest.raises((ValueError, TypeError), match=name):
            ours(**args, need_weights=False, **kw)
    out, _ = ours(q, k, v, need_weights=False, key_padding_mask=torch.rand(N, S) > 0.9,
                  attn_mask=torch.zeros(N * H, L, S))
    assert out.shape == (q.shape)


@pytest.mark.parametrize("num_kv_heads", [None, 1])
@pytest.mark.parametrize("device,backend", NN_PARAMS)
def test_causal_self_attention(device, backend, num_kv_heads):
    torch.manual_seed(14)
    B, T, E, H = 2, 13, 32, 2
    block = llmfast.nn.CausalSelfAttention(E, H, num_kv_heads=num_kv_heads).to(device)
    assert set(block.state_dict()) == {"c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"}
    x = torch.randn(B, T, E, device=device, requires_grad=True)
    with llmfast.use_backend(backend):
        y = block(x)
        g = torch.autograd.grad(y.square().sum(), (x, block.c_attn.weight))
    hkv = num_kv_heads or H
    qkv = block.c_attn(x).view(B, T, H + 2 * hkv, E // H)
    q, k, v = (t.transpose(1, 2) for t in (qkv[:, :, :H], qkv[:, :, H:H + hkv], qkv[:, :, H + hkv:]))
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != H)
    expected = block.c_proj(a.transpose(1, 2).reshape(B, T, E))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(g, torch.autograd.grad(expected.square().sum(), (x, block.c_attn.weight))):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    block.dropout = 0.5
    block.train()
    with llmfast.use_backend(backend):
        torch.manual_seed(1)
        y1 = block(x)
        torch.manual_seed(1)
        y2 = block(x)
    torch.testing.assert_close(y1, y2)  # dropout reproducible under torch.manual_seed


# --- the eager fast path of scaled_dot_product_attention ------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "triton", "cpu", "cuda"])
def test_fast_path_equals_general_path(device, backend):
    """Plain 4-D calls take a short path (llmfast.functional._sdpa_fast); window_size=(-1, -1)
    means the same attention but takes the general one. Same outputs and gradients, bit for bit,
    for strided views (a fused QKV projection), causal or not, with and without a scale."""
    if backend != "auto" and backend not in backends_for(device):
        pytest.skip(f"{backend} does not run on {device} here")
    dtype = torch.float16 if device == "cuda" or backend == "triton" else torch.float32
    torch.manual_seed(0)
    qkv = torch.randn(2, 33, 3, 2, 40, device=device, dtype=dtype)
    grad = torch.randn(2, 2, 33, 40, device=device, dtype=dtype)
    for is_causal, scale in ((False, None), (True, None), (True, 0.3)):
        results = []
        for window in (None, (-1, -1)):
            q, k, v = (qkv[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3))
            with llmfast.use_backend(backend):
                out = LF.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, window_size=window)
                grads = torch.autograd.grad(out, (q, k, v), grad)
            assert out.shape == (2, 2, 33, 40) and torch.isfinite(out).all()
            results.append((out, *grads))
        for fast, general in zip(*results):
            torch.testing.assert_close(fast, general, atol=0, rtol=0)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        gold, _ = reference_attention(q.double(), k.double(), v.double(), None, 0.0, is_causal, scale)
        lowp, _ = reference_attention(q, k, v, None, 0.0, is_causal, scale, compute_dtype=dtype)
        _fa_rule(results[0][0], gold, lowp, dtype, f"fast path, causal={is_causal}, scale={scale}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "triton", "cpu", "cuda"])
def test_fast_path_takes_grouped_query_attention(device, backend):
    """enable_gqa=True with key heads dividing query heads (GQA, and MQA with one key head)
    takes the short path too: the same outputs and gradients as the general path, bit for bit."""
    if backend != "auto" and backend not in backends_for(device):
        pytest.skip(f"{backend} does not run on {device} here")
    dtype = torch.float16 if device == "cuda" or backend == "triton" else torch.float32
    torch.manual_seed(0)
    for hkv in (2, 1):
        qkv = torch.randn(2, 17, 4 + 2 * hkv, 24, device=device, dtype=dtype)  # fused projection, (B, S, heads, D)
        grad = torch.randn(2, 4, 17, 24, device=device, dtype=dtype)
        results = []
        for window in (None, (-1, -1)):
            q = qkv[:, :, :4].transpose(1, 2).detach().requires_grad_()
            k = qkv[:, :, 4:4 + hkv].transpose(1, 2).detach().requires_grad_()
            v = qkv[:, :, 4 + hkv:].transpose(1, 2).detach().requires_grad_()
            with llmfast.use_backend(backend):
                if window is None:
                    assert LF._sdpa_fast(q, k, v, 0.0, True, None, True) is not None  # the short path serves it
                out = LF.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, window_size=window)
                grads = torch.autograd.grad(out, (q, k, v), grad)
            results.append((out, *grads))
        for fast, general in zip(*results):
            torch.testing.assert_close(fast, general, atol=0, rtol=0)
        q = qkv[:, :, :4].transpose(1, 2)
        k = qkv[:, :, 4:4 + hkv].transpose(1, 2).repeat_interleave(4 // hkv, dim=1)
        v = qkv[:, :, 4 + hkv:].transpose(1, 2).repeat_interleave(4 // hkv, dim=1)
        gold, _ = reference_attention(q.double(), k.double(), v.double(), None, 0.0, True, None)
        lowp, _ = reference_attention(q, k, v, None, 0.0, True, None, compute_dtype=dtype)
        _fa_rule(results[0][0], gold, lowp, dtype, f"fast path, GQA with {hkv} key heads")
    # without enable_gqa, grouped heads are the general path's to refuse
    q, kv = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    assert LF._sdpa_fast(q, kv, kv, 0.0, False, None, False) is None
    with pytest.raises(ValueError, match="enable_gqa"):
        LF.scaled_dot_product_attention(q, kv, kv)


def test_fast_path_leaves_bad_arguments_to_the_checks():
    """Arguments the short path does not take go to the general path, which names them."""
    q = torch.randn(1, 2, 8, 16)
    for kwargs, match in (({"is_causal": 1}, "is_causal"), ({"enable_gqa": "yes"}, "enable_gqa"),
                          ({"dropout_p": 1.5}, "dropout_p"), ({"scale": float("inf")}, "scale"),
                          ({"return_lse": 0}, "return_lse")):
        with pytest.raises((TypeError, ValueError), match=match):
            LF.scaled_dot_product_attention(q, q, q, **kwargs)
    with pytest.raises((TypeError, ValueError), match="value"):
        LF.scaled_dot_product_attention(q, q, torch.randn(1, 2, 9, 16))
    with pytest.raises((TypeError, ValueError), match="key"):
        LF.scaled_dot_product_attention(q, q.half(), q)
