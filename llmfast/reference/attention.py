"""Reference scaled dot-product attention in plain PyTorch: the definition every kernel matches.

    out = softmax(mask(softcap(scale * Q K^T))) V

computed in float32 (float64 for float64 inputs) and rounded once to the query's dtype. The
(S_q, S_k) score matrix is materialised: this is the definition of right, not a fast path.

Semantics (torch.nn.functional.scaled_dot_product_attention's, plus llmfast's extras):
- Layout (..., H, S, D): query (..., Hq, Sq, D), key (..., Hkv, Sk, D), value (..., Hkv, Sk, Dv);
  the output is (..., Hq, Sq, Dv). Without enable_gqa, Hkv must equal Hq; with it, Hq must be a
  multiple of Hkv and query head h reads key/value head h // (Hq // Hkv) (torch's
  repeat_interleave grouping).
- scale defaults to 1 / sqrt(D).
- is_causal: query i sees keys j <= i, aligned top-left on the (Sq, Sk) matrix exactly as torch
  does (torch builds ones(Sq, Sk).tril(diagonal=0)). With Sq > Sk the last rows see all keys;
  with Sq < Sk the last Sk - Sq keys are seen by nobody. (FlashAttention aligns bottom-right;
  torch and llmfast do not.)
- attn_mask broadcastable to (..., Hq, Sq, Sk): boolean (True = takes part, as in torch) or
  additive (floating, added to the scaled scores). torch refuses attn_mask together with
  is_causal; llmfast accepts both and applies both.
- window_size=(left, right) (llmfast extra, FlashAttention's convention): query i sees keys j
  with i - left <= j <= i + right, the diagonal aligned top-left like is_causal; -1 leaves a
  side unbounded, so (-1, 0) is is_causal and (-1, -1) no window. It combines with is_causal
  and attn_mask (a key must pass all of them).
- softcap (llmfast extra, Gemma 2's logit soft-capping): scores = softcap * tanh(scores /
  softcap), applied to the scaled scores before any mask.
- A query row whose keys are all masked (False, -inf, outside the causal band or window) gets a
  zero output, zero gradients and lse = -inf. torch's math path gives the same zeros since
  torch 2.5 (its "safe softmax"); earlier versions gave NaN. An additive mask of large finite
  negatives (e.g. finfo.min) does not mask a row: softmax then averages its keys, as in torch.
- dropout_p > 0 drops attention probabilities with torch.nn.functional.dropout (always, as
  torch's function does; callers pass 0 in eval mode). The kernels draw their own random
  numbers, so only the distribution matches, not the individual mask.
- return_lse=True also returns lse = logsumexp of each row's masked scores, shape (..., Hq, Sq),
  in the accumulation dtype (float32, float64 for float64 inputs), before dropout.
"""
import math

import torch

__all__ = ["scaled_dot_product_attention"]


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def band_mask(sq, sk, is_causal, window_size, device):
    """(Sq, Sk) boolean: True where query i may see key j under is_causal / window_size
    (top-left aligned), or None when neither restricts anything."""
    left, right = window_size if window_size is not None else (-1, -1)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0:
        return None
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              window_size=None, softcap=None, compute_dtype=None, dropout_mask=None):
    """The computation behind scaled_dot_product_attention, returning (out, lse).

    compute_dtype (default: the accumulation dtype) is the dtype of every intermediate: the
    tests pass the input's own low precision to measure what PyTorch's naive computation loses
    in it (the FlashAttention test rule). dropout_mask (broadcastable to the probabilities,
    True = kept) replaces the random draw, so the tests can replay a kernel's dropout pattern.
    """
    acc = compute_dtype or _acc_dtype(query.dtype)
    hq, hkv = (query.shape[-3], key.shape[-3]) if query.dim() >= 3 else (1, 1)
    if enable_gqa and hkv != hq:
        key = key.repeat_interleave(hq // hkv, dim=-3)
        value = value.repeat_interleave(hq // hkv, dim=-3)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    s = torch.matmul(query.to(acc), key.to(acc).transpose(-2, -1)) * scale
    if softcap is not None and softcap != 0:  # 0 = off, as None (FlashAttention's default)
        s = softcap * torch.tanh(s / softcap)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.to(acc)
    band = band_mask(query.shape[-2], key.shape[-2], is_causal, window_size, query.device)
    if band is not None:
        s = s.masked_fill(~band, float("-inf"))
    # Safe softmax: a row with no visible key gets p = 0 (and zero gradients) instead of the
    # NaN of exp(-inf - (-inf)); masked_fill keeps the NaN out of the backward too.
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    lse = torch.logsumexp(s.float() if acc not in (torch.float32, torch.float64) else s, dim=-1, keepdim=True)
    p = torch.softmax(s, dim=-1).masked_fill(dead, 0.0)
    lse = lse.masked_fill(dead, float("-inf")).squeeze(-1)
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        p = torch.nn.functional.dropout(p, dropout_p)
    out = torch.matmul(p, value.to(acc))
    return out.to(query.dtype), lse


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, window_size=None, softcap=None, return_lse=False):
    """torch.nn.functional.scaled_dot_product_attention's semantics in float32 math (see the
    module docstring for the extras window_size, softcap and return_lse, and for fully masked
    rows). Returns out, or (out, lse) with return_lse=True. Arguments are not validated here;
    llmfast.functional.scaled_dot_product_attention validates them."""
    out, lse = attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                         window_size, softcap)
    return (out, lse) if return_lse else out
