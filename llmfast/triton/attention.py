"""Triton FlashAttention-2: scaled dot-product attention forward and backward without the
(Sq, Sk) score matrix.

Contract (llmfast/reference/attention.py is the math): query (B, Hq, Sq, D), key (B, Hkv, Sk, D),
value (B, Hkv, Sk, Dv), any strides, Hq a multiple of Hkv (GQA/MQA: query head h reads key/value
head h // (Hq // Hkv)); attn_mask None or (B, Hq, Sq, Sk) with any strides (0 for broadcast
dims), boolean (True = takes part) or additive (floating); a band window_left / window_right
(-1 = unbounded; is_causal is window_right = 0, top-left aligned as in torch); softcap (0 = off).
D and Dv up to 256. float16 / bfloat16, and float32 computed with exact fp32 dots (no TF32).
Dropout (training): each probability survives with probability 1 - dropout_p, drawn with
Philox (tl.rand) from a one-element int64 seed tensor at an offset that names its (batch, head,
query, key), so the backward kernels redraw the same pattern without storing it; the caller
draws the seed from torch's generator, which makes the pattern reproducible under
torch.manual_seed.

Forward (one program per BLOCK_M queries of one (batch, head)): the query tile stays in
registers while key/value tiles stream past; per tile
    s = softcap(scale * q k^T) (+ mask), in log2 units (exp2 is the fast exponential)
    m_new = max(m, rowmax(s));  p = exp2(s - m_new);  l = l * exp2(m - m_new) + rowsum(p)
    acc = acc * exp2(m - m_new) + p v
and at the end out = acc / l, lse = (m + log2 l) * ln 2 (fp32). Rows with no visible key keep
l = 0: out = 0 and lse = -inf.
Backward (FlashAttention-2, no atomics): delta = rowsum(dO * O) - dlse (preprocess kernel),
then P = exp(s - lse) is recomputed twice: once by programs that own BLOCK_N keys of one kv
head and loop over the query tiles of every query head of its group (dK, dV: deterministic,
GQA sums in registers), once by programs that own BLOCK_M queries (dQ):
    dV += P^T dO;  dP = dO V^T;  dS = P * (dP - delta);  dK += dS^T Q;  dQ += dS K
(times scale, and times 1 - tanh^2 under softcap; with dropout, P and dP of the kept
probabilities are scaled by 1 / (1 - dropout_p) and the dropped ones are zero, while delta
and the dS formula are unchanged). When an additive mask needs a gradient, the dK/dV
programs also write dS, the gradient of the mask, as a (B, Hq, Sq, Sk) tensor: the one case
that materialises Sq x Sk (only then). A second plan (fused_dq tile configurations, timed against
the first on large problems, never under torch.use_deterministic_algorithms) drops the dQ
kernel: the dK/dV programs also add each key tile's share scale * dS K to an fp32 dQ buffer
with atomics, FlashAttention-2's way (5 products instead of 7).

Tiles of keys that are entirely visible to a query tile (inside the causal band / window and
Sk) run without the band predicate; only the boundary tiles pay for it, and tiles entirely
outside the band are skipped.

Memory traffic: the forward reads Q once and K, V once per query tile (ceil(Sq / BLOCK_M)
times; L2 absorbs most of it), writes O and lse once; the backward reads Q, dO, lse, delta
once per key tile and K, V once per query tile, writes dQ, dK, dV once. A mask tensor is read
once per visited tile (a key-padding mask (B, 1, 1, Sk), stride 0 over queries, as one row).
Offsets are 64-bit.

Tiles (queries x keys per program, warps, pipeline stages) come per kernel from a short table
of candidates (_fwd_candidates, _dkdv_candidates, _dq_candidates): the first is the default;
on the first large call of a problem class (B * Hq * Sq * Sk >= 2^24) the others are timed on
that call and the fastest is kept for the class (_tuning.Tuner; LLMFAST_TRITON_AUTOTUNE=0 turns
it off; tuning_report() lists the choices). Under a causal band the query tiles of the forward
and dQ kernels run last-first, so the longest rows start first and the tail of the grid is short.

Launches work on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before triton
was imported (Triton's interpreter, used by the CPU-only tests; its bf16 tl.dot is wrong, so
test there in fp16 / fp32).
"""
import contextlib
import functools
import os
from typing import List, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from llmfast._errors import LlmfastTypeError, LlmfastValueError
from llmfast.triton._launch import fast_jit
from llmfast.triton._tuning import Tuner

__all__ = ["attention_fwd", "attention_bwd", "MAX_HEAD_DIM", "tuning_report"]

MAX_HEAD_DIM = 256  # = llmfast.ops.attention.TRITON_MAX_HEAD_DIM
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634

# mask kinds (constexpr MASK_KIND)
_NO_MASK, _BOOL_MASK, _ADD_MASK = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _tanh(y):
    # tanh from one exp, finite for every y: sign(y) (1 - e^{-2|y|}) / (1 + e^{-2|y|}).
    # (tl has no portable tanh: libdevice's is CUDA-only and absent from the interpreter.)
    e = tl.exp(-2.0 * tl.abs(y))
    th = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0, -th, th)


@triton.jit
def _scores(qk, qi, kj, mask_base, stride_mm, stride_mn, Sq, Sk, qk_scale, cap_scale, window_left, window_right,
            MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, SOFTCAP: tl.constexpr, BAND: tl.constexpr,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Scores of one tile in log2 units, masked with -inf, from the raw dot products qk.

    qi / kj: query / key indices broadcast against qk (either orientation: (M, 1) and (1, N)
    in the forward and dQ kernels, (1, M) and (N, 1) in the dK/dV kernel). Returns (s, t),
    t = tanh(scale * qk / softcap) under SOFTCAP (the backward needs 1 - t^2), else qk.
    Without SOFTCAP qk_scale = scale * log2(e); with it qk_scale = softcap * log2(e) and
    cap_scale = scale / softcap. BAND applies the key bound Sk and the window (interior tiles
    skip it)."""
    if SOFTCAP:
        t = _tanh(qk * cap_scale)
        s = t * qk_scale
    else:
        t = qk
        s = qk * qk_scale
    if MASK_KIND != 0:
        if MASK_ROW:  # key-padding mask: one row for all queries
            mptr = mask_base + kj.to(tl.int64) * stride_mn
            mok = kj < Sk
        else:
            mptr = mask_base + qi.to(tl.int64) * stride_mm + kj.to(tl.int64) * stride_mn
            mok = (qi < Sq) & (kj < Sk)
        if MASK_KIND == 1:
            keep = tl.load(mptr, mask=mok, other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        else:
            bias = tl.load(mptr, mask=mok, other=0.0).to(tl.float32)
            # A large finite mask value (finfo(float32).min, as Hugging Face pads) must stay finite in
            # log2 units: a row masked only by it averages its keys, as in torch, not zeros. (A
            # NaN entry stays NaN, as in torch: tl.maximum would drop it.)
            bias = tl.where((bias < -2.0e38) & (bias != float("-inf")), -2.0e38, bias)
            s = s + bias * 1.4426950408889634
    if BAND:
        ok = kj < Sk
        if HAS_LEFT:
            ok = ok & (kj >= qi - window_left)
        if HAS_RIGHT:
            ok = ok & (kj <= qi + window_right)
        s = tl.where(ok, s, float("-inf"))
    return s, t


@triton.jit
def _dropout_keep(seed, row0, qi, kj, Sk, dropout_p):
    """True where the probability of (query qi, key kj) survives dropout. The random number is
    Philox's at offset (row0 + qi) * Sk + kj, row0 = (b * Hq + h) * Sq, so the forward and both
    backward kernels draw the same numbers in either tile orientation."""
    return tl.rand(seed, (row0 + qi.to(tl.int64)) * Sk + kj) >= dropout_p


@triton.jit
def _key_range(m0, Sk, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key tiles seen by queries [m0, m0 + BLOCK_M): [lo, lo_in) and [hi_in, hi) need the band
    predicate, [lo_in, hi_in) (whole tiles inside the band and below Sk) do not. lo, lo_in and
    hi_in are multiples of BLOCK_N (or equal hi)."""
    lo = 0
    hi = Sk
    lo_in = 0
    hi_in = Sk // BLOCK_N * BLOCK_N
    if HAS_LEFT:
        lo = tl.maximum(m0 - window_left, 0) // BLOCK_N * BLOCK_N
        lo_in = (tl.maximum(m0 + BLOCK_M - 1 - window_left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        lo_in = tl.maximum(lo_in, lo)
    if HAS_RIGHT:
        hi = tl.minimum(hi, m0 + BLOCK_M + window_right)
        hi_in = tl.minimum(hi_in, tl.maximum(m0 + window_right + 1, 0) // BLOCK_N * BLOCK_N)
    hi = tl.maximum(hi, lo)
    lo_in = tl.minimum(lo_in, hi)
    hi_in = tl.maximum(hi_in, lo_in)
    return lo, lo_in, hi_in, hi


@triton.jit
def _query_range(n0, Sq, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query tiles that see keys [n0, n0 + BLOCK_N), split like _key_range. Rows past Sq are
    harmless here (their q and dO load as 0 and their lse as +inf, so P = 0)."""
    lo = 0
    hi = Sq
    lo_in = 0
    hi_in = Sq
    if HAS_RIGHT:
        lo = tl.maximum(n0 - window_right, 0) // BLOCK_M * BLOCK_M
        lo_in = (tl.maximum(n0 + BLOCK_N - 1 - window_right, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        lo_in = tl.maximum(lo_in, lo)
    if HAS_LEFT:
        hi = tl.minimum(hi, n0 + BLOCK_N + window_left)
        hi_in = tl.minimum(hi_in, tl.maximum(n0 + window_left + 1, 0) // BLOCK_M * BLOCK_M)
    hi = tl.maximum(hi, lo)
    lo_in = tl.minimum(lo_in, hi)
    hi_in = tl.maximum(hi_in, lo_in)
    return lo, lo_in, hi_in, hi


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, lo, hi,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
               Sq, Sk, qk_scale, cap_scale, window_left, window_right, seed, row0, dropout_p, keep_scale,
               D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, SOFTCAP: tl.constexpr,
               BAND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Sk
        kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        s, _t = _scores(qk, offs_m[:, None], offs_n[None, :], mask_base, stride_mm, stride_mn, Sq, Sk,
                        qk_scale, cap_scale, window_left, window_right,
                        MASK_KIND, MASK_ROW, SOFTCAP, BAND, HAS_LEFT, HAS_RIGHT)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - -inf) never makes a NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # after the row sum: dropout acts on the normalised probabilities
            keep = _dropout_keep(seed, row0, offs_m[:, None], offs_n[None, :], Sk, dropout_p)
            p = tl.where(keep, p * keep_scale, 0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        # Accumulate in the product itself (the MMA adds into acc; no second tile of adds).
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Forward. Grid (cdiv(Sq, BLOCK_M) * B * Hq,). Traffic: reads its Q tile once and the K, V tiles
# of its key range once, writes its O tile and lse once.
@fast_jit
@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # (B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, DV), any strides
    O,  # (B, Hq, Sq, DV) out
    LSE,  # (B * Hq, Sq) fp32 out, natural log
    MASK,  # (B, Hq, Sq, Sk) uint8 (bool) or float, any strides; dummy when MASK_KIND == 0
    SEED,  # (1,) int64 Philox seed when DROPOUT, else a dummy
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, GROUP, Sq, Sk,
    qk_scale, cap_scale, window_left, window_right, dropout_p, keep_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # 1-D grid, query tiles fastest: programs in flight share a head's K and V in L2, and
    # B * H is not bounded by the 65535 limit of a grid's second dimension.
    n_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    if HAS_RIGHT:  # causal-like band: the last query tiles see the most keys; start them first
        pid_m = n_m - 1 - pid_m
    pid_bh = tl.program_id(0) // n_m
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Sq
    row0 = pid_bh.to(tl.int64) * Sq
    seed = tl.load(SEED) if DROPOUT else 0

    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = MASK + b * stride_mb + h * stride_mh

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    lo, lo_in, hi_in, hi = _key_range(m0, Sk, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, lo, lo_in,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                               Sq, Sk, qk_scale, cap_scale, window_left, window_right, seed, row0, dropout_p,
                               keep_scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, MASK_ROW, SOFTCAP,
                               True, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, lo_in, hi_in,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                               Sq, Sk, qk_scale, cap_scale, window_left, window_right, seed, row0, dropout_p,
                               keep_scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, MASK_ROW, SOFTCAP,
                               False, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, hi_in, hi,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                               Sq, Sk, qk_scale, cap_scale, window_left, window_right, seed, row0, dropout_p,
                               keep_scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, MASK_ROW, SOFTCAP,
                               True, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_PRECISION)

    dead = l_i == 0.0  # no visible key: out = 0, lse = -inf
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.math.log2(tl.where(dead, 1.0, l_i))) * 0.6931471805599453)
    tl.store(O + b * stride_ob + h * stride_oh + rows * stride_om + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=m_ok)


# Backward preprocess. Grid (cdiv(Sq, BLOCK_M) * B * Hq,). Reads O and dO once, writes delta:
# delta = rowsum(dO * O) (- dlse when the lse output has a gradient), fp32.
@fast_jit
@triton.jit
def _attn_bwd_delta_kernel(
    O, DO,  # (B, H, Sq, DV), any strides
    DLSE,  # (B * H, Sq) fp32, or a dummy when HAS_DLSE is False
    DELTA,  # (B * H, Sq) fp32 out
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, Sq,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    # 1-D grid, query tiles fastest: programs in flight share a head's K and V in L2, and
    # B * H is not bounded by the 65535 limit of a grid's second dimension.
    n_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    pid_bh = tl.program_id(0) // n_m
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < Sq) & (offs_dv[None, :] < DV)
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows * stride_om + offs_dv[None, :] * stride_od, mask=ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + pid_bh.to(tl.int64) * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    tl.store(DELTA + pid_bh.to(tl.int64) * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, lo, hi,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
              Sq, Sk, qk_scale, cap_scale, window_left, window_right, seed, row0, dropout_p, keep_scale,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, SOFTCAP: tl.constexpr,
              BAND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Sk
        kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        vt = tl.load(v_base + offs_n[None, :].to(tl.int64) * stride_vn + offs_dv[:, None] * stride_vd,
                     mask=n_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        s, t = _scores(qk, offs_m[:, None], offs_n[None, :], mask_base, stride_mm, stride_mn, Sq, Sk,
                       qk_scale, cap_scale, window_left, window_right,
                       MASK_KIND, MASK_ROW, SOFTCAP, BAND, HAS_LEFT, HAS_RIGHT)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        if DROPOUT:  # dP of the kept probabilities; delta = rowsum(dO * O) already includes it
            keep = _dropout_keep(seed, row0, offs_m[:, None], offs_n[None, :], Sk, dropout_p)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
    return dq


# Backward, dQ. Grid (cdiv(Sq, BLOCK_M) * B * Hq,). Reads its Q, dO tiles, lse and delta once and
# the K, V tiles of its key range once, writes its dQ tile once. With COMPUTE_DELTA it computes
# its rows' delta from O and dO first (and stores it for the dK/dV kernel) instead of reading it.
@fast_jit
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # as in the forward; DO (B, Hq, Sq, DV) any strides
    LSE, DELTA,  # (B * Hq, Sq) fp32; DELTA is written here when COMPUTE_DELTA, else read
    DQ,  # (B, Hq, Sq, D) out
    MASK, SEED,
    O, DLSE,  # COMPUTE_DELTA only: the forward's output (B, Hq, Sq, DV) any strides; dlse as DELTA or a dummy
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    H, GROUP, Sq, Sk,
    scale, qk_scale, cap_scale, window_left, window_right, dropout_p, keep_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COMPUTE_DELTA: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    # 1-D grid, query tiles fastest: programs in flight share a head's K and V in L2, and
    # B * H is not bounded by the 65535 limit of a grid's second dimension.
    n_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    if HAS_RIGHT:  # causal-like band: the last query tiles see the most keys; start them first
        pid_m = n_m - 1 - pid_m
    pid_bh = tl.program_id(0) // n_m
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Sq
    rows = offs_m[:, None].to(tl.int64)

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=float("inf"))
    # A fully masked row has lse = -inf; +inf makes its recomputed P exactly 0.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    if COMPUTE_DELTA:
        # The backward preprocess (_attn_bwd_delta_kernel's arithmetic, so the same bits) done
        # by the program that owns these query rows, saving a kernel launch; the dK/dV kernel,
        # launched after this one, reads what it stores.
        o = tl.load(O + b * stride_ob + h * stride_oh + rows * stride_om + offs_dv[None, :] * stride_od,
                    mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if HAS_DLSE:
            delta -= tl.load(DLSE + pid_bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=0.0)
        tl.store(DELTA + pid_bh.to(tl.int64) * Sq + offs_m, delta, mask=m_ok)
    else:
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * Sq + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = MASK + b * stride_mb + h * stride_mh
    row0 = pid_bh.to(tl.int64) * Sq
    seed = tl.load(SEED) if DROPOUT else 0

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, lo_in, hi_in, hi = _key_range(m0, Sk, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, lo, lo_in,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                   Sq, Sk, qk_scale, cap_scale, window_left, window_right, seed, row0, dropout_p, keep_scale,
                   D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, MASK_ROW, SOFTCAP,
                   True, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, lo_in, hi_in,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                   Sq, Sk, qk_scale, cap_scale, window_left, window_right, seed, row0, dropout_p, keep_scale,
                   D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, MASK_ROW, SOFTCAP,
                   False, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, hi_in, hi,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                   Sq, Sk, qk_scale, cap_scale, window_left, window_right, seed, row0, dropout_p, keep_scale,
                   D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, MASK_ROW, SOFTCAP,
                   True, HAS_LEFT, HAS_RIGHT, DROPOUT, DOT_PRECISION)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqm
             + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, dmask_base, dq_base, offs_n, lo, hi,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, stride_dmm,
                Sq, Sk, scale, qk_scale, cap_scale, window_left, window_right, seed, row0, dropout_p, keep_scale,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, MASK_GRAD: tl.constexpr,
                SOFTCAP: tl.constexpr, BAND: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                DROPOUT: tl.constexpr, FUSED_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Transposed orientation: tiles are (keys, queries), so no (BLOCK_N, BLOCK_M) tile is
    # transposed; only the small Q and dO tiles are.
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Sq
        rows = offs_m.to(tl.int64)
        qt = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                     mask=m_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                     mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        qkt = tl.dot(k, qt, input_precision=DOT_PRECISION)
        st, tt = _scores(qkt, offs_m[None, :], offs_n[:, None], mask_base, stride_mm, stride_mn, Sq, Sk,
                         qk_scale, cap_scale, window_left, window_right,
                         MASK_KIND, MASK_ROW, SOFTCAP, BAND, HAS_LEFT, HAS_RIGHT)
        pt = tl.math.exp2(st - lse2[None, :])
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, row0, offs_m[None, :], offs_n[:, None], Sk, dropout_p)
            dv = tl.dot(tl.where(keep, pt * keep_scale, 0.0).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dpt = tl.where(keep, dpt * keep_scale, 0.0)
        else:
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        if MASK_GRAD:
            tl.store(dmask_base + rows[None, :] * stride_dmm + offs_n[:, None],
                     dst.to(dmask_base.dtype.element_ty), mask=m_ok[None, :] & (offs_n[:, None] < Sk))
        if SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dst = dst.to(qt.dtype)
        dk = tl.dot(dst, tl.trans(qt), dk, input_precision=DOT_PRECISION)
        if FUSED_DQ:  # this key tile's share of dQ = scale * dS K, summed into fp32 by atomics
            dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PRECISION) * scale
            tl.atomic_add(dq_base + rows[:, None] * D + offs_d[None, :], dq,
                          mask=m_ok[:, None] & (offs_d[None, :] < D), sem="relaxed")
    return dk, dv


# Backward, dK and dV. Grid (cdiv(Sk, BLOCK_N) * B * Hkv,): each program owns BLOCK_N keys of one
# kv head and sums over the query tiles of all GROUP query heads that read it. Reads its K, V
# tiles once and the Q, dO tiles, lse and delta of its query range once per query head, writes
# its dK, dV tiles once (and, with MASK_GRAD, dS for the mask).
@fast_jit
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA,
    DK, DV_OUT,  # (B, Hkv, Sk, D), (B, Hkv, Sk, DV) out
    MASK, SEED,
    DMASK,  # (B, Hq, Sq, Sk) contiguous out (zero-initialised) when MASK_GRAD, else a dummy
    DQ_ACC,  # (B, Hq, Sq, D) fp32 contiguous, zero-initialised, summed into when FUSED_DQ; else a dummy
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    HKV, GROUP, Sq, Sk,
    scale, qk_scale, cap_scale, window_left, window_right, dropout_p, keep_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW: tl.constexpr, MASK_GRAD: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, FUSED_DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    n_n = tl.cdiv(Sk, BLOCK_N)  # 1-D grid, key tiles fastest
    pid_n = tl.program_id(0) % n_n
    pid_bh = tl.program_id(0) // n_n
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Sk
    keys = offs_n[:, None].to(tl.int64)
    k = tl.load(K + b * stride_kb + hk * stride_kh + keys * stride_kn + offs_d[None, :] * stride_kd,
                mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + keys * stride_vn + offs_dv[None, :] * stride_vd,
                mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    lo, lo_in, hi_in, hi = _query_range(n0, Sq, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    H = HKV * GROUP
    seed = tl.load(SEED) if DROPOUT else 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * Sq
        delta_base = DELTA + bh * Sq
        mask_base = MASK + b * stride_mb + h * stride_mh
        dmask_base = DMASK + bh * Sq * Sk
        dq_base = DQ_ACC + bh * Sq * D
        row0 = bh * Sq
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, dmask_base, dq_base,
                             offs_n, lo, lo_in, stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                             Sk, Sq, Sk, scale, qk_scale, cap_scale, window_left, window_right, seed, row0, dropout_p,
                             keep_scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, MASK_KIND, MASK_ROW, MASK_GRAD,
                             SOFTCAP, True, HAS_LEFT, HAS_RIGHT, DROPOUT, FUSED_DQ, DOT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, dmask_base, dq_base,
                             offs_n, lo_in, hi_in, stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                             Sk, Sq, Sk, scale, qk_scale, cap_scale, window_left, window_right, seed, row0, dropout_p,
                             keep_scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, MASK_KIND, MASK_ROW, MASK_GRAD,
                             SOFTCAP, False, HAS_LEFT, HAS_RIGHT, DROPOUT, FUSED_DQ, DOT_PRECISION)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, dmask_base, dq_base,
                             offs_n, hi_in, hi, stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                             Sk, Sq, Sk, scale, qk_scale, cap_scale, window_left, window_right, seed, row0, dropout_p,
                             keep_scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, MASK_KIND, MASK_ROW, MASK_GRAD,
                             SOFTCAP, True, HAS_LEFT, HAS_RIGHT, DROPOUT, FUSED_DQ, DOT_PRECISION)
    dk = dk * scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + keys * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_OUT + b * stride_dvb + hk * stride_dvh + keys * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV_OUT.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < DV))


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cached_table(pick):
    """A candidate-table function, memoized (launchers ask on every call) and returning a tuple
    (shared between calls, so it must not be modified)."""
    @functools.lru_cache(maxsize=None)
    def cached(*args, **kwargs):
        return tuple(pick(*args, **kwargs))
    return functools.wraps(pick)(cached)


class _Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    fused_dq: bool = False  # dK/dV only: also sum dQ, by fp32 atomics (no dQ kernel; not deterministic)


# Tiles used in Triton's CPU interpreter: small, so that the tests' short sequences (17, 128,
# 257) still cross several tiles and exercise the interior/boundary split; the interpreter
# pays per operation, not per element, so larger tiles would not test more.
_INTERPRET_TILES = (32, 32)


@_cached_table
def _fwd_candidates(d: int, elt: int, on_gpu: bool) -> List[_Config]:
    """Forward tiles for head dim d (the larger of D and Dv, padded to a power of two) and
    element size elt; the first is the default, the others are measured against it on large
    problems (see _tuning.Tuner).

    The default is FlashAttention-2's shape: 128 queries per program keep the tensor cores
    fed; the (128, d) fp32 accumulator is 64 registers a thread for d = 128 with 8 warps;
    d = 256 halves the query tile to stay out of spills. The alternatives span what Triton's
    own Hopper tutorial searches (64/128 queries, 32-128 keys, 4/8 warps, 2-4 stages), minus
    the shapes that spill registers when compiled for sm_90 (python -m llmfast.triton._aot
    --candidates; tests/test_triton_compile.py). fp32 inputs (exact products on the CUDA
    cores, no tensor cores) take small tiles: larger ones spill kilobytes a thread."""
    if not on_gpu:
        return [_Config(*_INTERPRET_TILES, 1, 1)]
    if elt == 4:
        if d <= 128:
            return [_Config(64, 16, 8, 2), _Config(32, 16, 4, 2), _Config(16, 64, 4, 2)]
        return [_Config(32, 16, 8, 2), _Config(16, 16, 4, 2), _Config(16, 32, 8, 2)]
    if d <= 64:
        return [_Config(128, 64, 4, 3), _Config(128, 128, 8, 3), _Config(128, 64, 4, 4), _Config(64, 64, 4, 3),
                _Config(128, 32, 4, 3)]
    if d <= 128:
        # On the H100 (benchmarks/results/attention_h100.json, triton_tuning) the tuner picked
        # 128 x 128 in 5 of the 6 bf16 classes (D = 128, 2k-8k tokens), 2-4% ahead of 128 x 64.
        # It stays a candidate, not the default: its 224 KB of shared memory (288 KB with an
        # additive mask) does not fit an A100 (163 KB), nor the H100 with the mask.
        return [_Config(128, 64, 8, 3), _Config(128, 128, 8, 3), _Config(128, 64, 8, 4), _Config(64, 64, 4, 3),
                _Config(128, 32, 8, 3)]
    return [_Config(64, 32, 4, 2), _Config(128, 32, 8, 2), _Config(64, 64, 8, 2), _Config(128, 64, 8, 2)]


@_cached_table
def _dkdv_candidates(d: int, elt: int, on_gpu: bool, spill_prone: bool = False) -> List[_Config]:
    """dK/dV tiles: block_n keys owned by a program (K, V, dK, dV stay on chip: 4 x block_n x d,
    dK and dV in fp32), block_m queries per step. First is the default, as _fwd_candidates.

    Entries with fused_dq also compute dQ in the same pass, FlashAttention-2's way: each key
    tile adds its share scale * dS K to an fp32 dQ buffer with atomics, so the backward does 5
    products instead of 7 (no dQ kernel recomputing P and dP) at the price of B*Hq*Sq*D*4 bytes
    and atomic traffic; they are timed against the two-kernel plan (dK/dV plus the dQ kernel)
    and left out when torch.use_deterministic_algorithms is on."""
    if not on_gpu:
        return [_Config(*_INTERPRET_TILES, 1, 1)]
    if elt == 4:
        if d <= 128:
            return [_Config(32, 32, 8, 2), _Config(16, 32, 4, 2), _Config(16, 32, 8, 2)]
        return [_Config(16, 32, 8, 2), _Config(16, 16, 4, 2)]
    # Defaults: 64 keys a program, 32 queries a step, 4 warps, 3 stages: measured fastest on the
    # H100 in every bf16 problem class tuned (D = 64 and 128, 1k-8k tokens, causal or not;
    # benchmarks/results/attention_h100.json), 7-15% ahead of 128-key tiles with 8 warps, and
    # the fused-dQ plan never won. With dropout or GQA (spill_prone) the 4-warp tiles spill
    # (D = 128: 336 and 264 bytes a thread; 64 x 64 up to 456), so there the default is 128
    # keys with 8 warps, the one shape measured spill-free with both; the others stay candidates.
    if d > 128:
        return [_Config(32, 32, 4, 2), _Config(32, 64, 8, 2), _Config(32, 64, 8, 2, True)]
    if d <= 64:
        table = [_Config(32, 64, 4, 3), _Config(64, 64, 4, 3), _Config(32, 128, 8, 3), _Config(64, 128, 8, 2),
                 _Config(64, 64, 8, 2),
                 _Config(32, 128, 8, 3, True), _Config(64, 128, 8, 2, True), _Config(64, 64, 4, 3, True)]
        lean = _Config(32, 128, 8, 3)
    else:
        table = [_Config(32, 64, 4, 3), _Config(32, 64, 4, 2), _Config(32, 128, 8, 2), _Config(64, 64, 8, 2),
                 _Config(32, 128, 8, 2, True), _Config(64, 64, 8, 2, True)]
        lean = _Config(32, 128, 8, 2)
    return _lean_first(lean, table) if spill_prone else table


def _lean_first(lean: _Config, table: List[_Config]) -> List[_Config]:
    """`table` with the spill-free `lean` shape moved to the front (the default)."""
    return [lean] + [c for c in table if c != lean]


@_cached_table
def _dq_candidates(d: int, elt: int, on_gpu: bool, spill_prone: bool = False) -> List[_Config]:
    """dQ tiles: block_m queries owned by a program (Q, dO, dQ on chip), block_n keys per step.
    spill_prone (dropout or GQA) as in _dkdv_candidates."""
    if not on_gpu:
        return [_Config(*_INTERPRET_TILES, 1, 1)]
    if elt == 4:
        if d <= 128:
            return [_Config(32, 32, 8, 2), _Config(16, 32, 4, 2), _Config(32, 16, 4, 2)]
        return [_Config(16, 32, 8, 2), _Config(16, 16, 4, 2)]
    if d <= 64:
        return [_Config(64, 64, 4, 3), _Config(128, 64, 8, 2), _Config(64, 32, 4, 3), _Config(128, 32, 4, 3),
                _Config(64, 64, 8, 2), _Config(128, 64, 8, 3)]
    if d <= 128:
        # 64 x 64 with 4 warps won every D = 128 class on the H100 (8-30% ahead of the rest);
        # with dropout it spills 40 bytes a thread, 8 warps do not.
        table = [_Config(64, 64, 4, 2), _Config(128, 64, 8, 2), _Config(64, 32, 4, 3), _Config(128, 32, 8, 2),
                 _Config(64, 64, 8, 2)]
        return _lean_first(_Config(64, 64, 8, 2), table) if spill_prone else table
    return [_Config(32, 32, 4, 2), _Config(32, 64, 4, 2)]


# One tuner per kernel: what each problem class runs with (see _tuning.Tuner). A problem is
# measured when it is large enough (B * Hq * Sq * Sk >= 2^24, e.g. 8 x 12 heads x 1024^2 for
# GPT-2) that a few timed runs are small next to the work they choose tiles for.
FWD_TUNER = Tuner("attention_fwd")
DKDV_TUNER = Tuner("attention_bwd_dkdv")
DQ_TUNER = Tuner("attention_bwd_dq")
_TUNE_MIN_WORK = 1 << 24


class _TuneKey(NamedTuple):
    """A problem class of the tuners: exact head dims, dtype and flags; lengths by power-of-two
    bucket (so a new sequence length in the same bucket reuses the choice)."""
    D: int
    Dv: int
    dtype: torch.dtype
    gqa: bool
    sq_log2: int
    sk_log2: int
    flags: tuple


def tuning_report():
    """What the attention tuners picked in this process, for the benchmark report: one entry
    per kernel and problem class with the chosen tiles and every candidate's measured time."""
    entries = []
    for tuner in (FWD_TUNER, DKDV_TUNER, DQ_TUNER):
        for key, cfg in tuner.chosen().items():
            timings = tuner.timings(key) or {}
            entries.append({
                "kernel": tuner.name,
                "problem": {"D": key.D, "Dv": key.Dv, "dtype": str(key.dtype).replace("torch.", ""), "gqa": key.gqa,
                            "Sq_bucket": 1 << key.sq_log2, "Sk_bucket": 1 << key.sk_log2,
                            "flags": [str(f) for f in key.flags]},
                "chosen": cfg._asdict(),
                "candidates_ms": [dict(c._asdict(), ms=round(ms, 4)) for c, ms in sorted(timings.items(),
                                                                                          key=lambda kv: kv[1])],
            })
    return entries


def _tune_key(B, Hq, Hkv, Sq, Sk, D, Dv, dtype, *flags):
    return _TuneKey(D, Dv, dtype, Hq != Hkv, (max(Sq, 1) - 1).bit_length(), (max(Sk, 1) - 1).bit_length(), flags)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _device_ctx(device: torch.device):
    """Triton launches on the current CUDA device (and its current stream)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_qkv(op, query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise LlmfastTypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise LlmfastValueError(f"{op}: {name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
        if t.dtype != query.dtype:
            raise LlmfastTypeError(f"{op}: {name} must have query's dtype {query.dtype}, got {t.dtype}")
        if t.device != query.device:
            raise LlmfastTypeError(f"{op}: {name} must be on {query.device}, got {t.device}")
    if query.dtype not in _FLOAT_DTYPES:
        raise LlmfastTypeError(f"{op}: query must be float32, float16 or bfloat16, got {query.dtype}")
    if query.device.type != "cuda" and not _INTERPRET:
        raise LlmfastTypeError(
            f"{op}: query must be a CUDA tensor (or run with TRITON_INTERPRET=1), got {query.device}")
    B, Hq, Sq, D = query.shape
    if key.shape[0] != B or key.shape[3] != D:
        raise LlmfastValueError(f"{op}: key must have shape ({B}, Hkv, Sk, {D}), got {tuple(key.shape)}")
    Hkv, Sk = key.shape[1], key.shape[2]
    if tuple(value.shape[:3]) != (B, Hkv, Sk):
        raise LlmfastValueError(f"{op}: value must have shape ({B}, {Hkv}, {Sk}, Dv), got {tuple(value.shape)}")
    if (Hkv == 0 and Hq != 0) or (Hkv != 0 and Hq % Hkv != 0):
        raise LlmfastValueError(f"{op}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    Dv = value.shape[3]
    for name, d in (("query", D), ("value", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise LlmfastValueError(f"{op}: {name} head dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    return B, Hq, Hkv, Sq, Sk, D, Dv


def _head_dim_offsets_fit(*tensors):
    """Tensors whose head-dim offsets (offs_d * stride, int32 in the kernels) fit in 32 bits;
    a tensor whose last-dimension stride times its size does not (the head dim laid out
    outermost in a huge tensor) is copied contiguous. A unit stride (the usual case) fits."""
    return tuple(t.contiguous() if t.stride(-1) != 1 and t.stride(-1) * t.shape[-1] >= 2 ** 31 else t
                 for t in tensors)


def _dims(query, key, value):
    """(B, Hq, Hkv, Sq, Sk, D, Dv) of arguments already checked (what _check_qkv returns)."""
    (B, Hq, Sq, D), (Hkv, Sk), Dv = query.shape, key.shape[1:3], value.shape[3]
    return B, Hq, Hkv, Sq, Sk, D, Dv


def _mask_args(op, attn_mask, shape, device):
    """(mask tensor for the kernel, MASK_KIND, MASK_ROW, its 4 strides), after checks."""
    if attn_mask is None:
        return None, _NO_MASK, False, (0, 0, 0, 0)
    if tuple(attn_mask.shape) != shape:
        raise LlmfastValueError(f"{op}: attn_mask must have shape {shape} (expand it first), got "
                                f"{tuple(attn_mask.shape)}")
    if attn_mask.device != device:
        raise LlmfastTypeError(f"{op}: attn_mask must be on {device}, got {attn_mask.device}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in _FLOAT_DTYPES and attn_mask.dtype != torch.float64:
        raise LlmfastTypeError(f"{op}: attn_mask must be bool or floating, got {attn_mask.dtype}")
    return _mask_layout(attn_mask, shape)


def _mask_layout(attn_mask, shape):
    """_mask_args without the checks (for arguments llmfast.functional already checked)."""
    if attn_mask is None:
        return None, _NO_MASK, False, (0, 0, 0, 0)
    if attn_mask.dtype == torch.bool:
        kind, mask = _BOOL_MASK, attn_mask.view(torch.uint8)
    else:
        kind, mask = _ADD_MASK, attn_mask
    strides = mask.stride()
    # A key-padding mask (stride 0 over queries, or one query) is read as one row per tile.
    return mask, kind, strides[2] == 0 or shape[2] == 1, strides


def _common_flags(window_left, window_right, softcap, dtype, dropout_p):
    return dict(
        DROPOUT=dropout_p > 0.0,
        SOFTCAP=softcap > 0.0,
        HAS_LEFT=window_left >= 0,
        HAS_RIGHT=window_right >= 0,
        # fp32 inputs get exact fp32 products (torch's default for fp32 matmuls), not TF32.
        DOT_PRECISION="ieee" if dtype == torch.float32 else None,
    )


def _normalize_window(window_left, window_right, Sq, Sk):
    """A side that reaches past every query / key is unbounded (-1): the kernels skip its
    predicate, and the band arithmetic stays far from int32 overflow."""
    window_left, window_right = int(window_left), int(window_right)
    if window_left >= Sq:
        window_left = -1
    if window_right >= Sk:
        window_right = -1
    return window_left, window_right


def _check_dropout(op, dropout_p, seed, device):
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise LlmfastValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return 0.0, None
    if seed is None or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device:
        raise LlmfastValueError(f"{op}: dropout_p > 0 needs seed, a one-element int64 tensor on {device}")
    return dropout_p, seed.reshape(1)


def _keep_scale(dropout_p):
    return 1.0 / (1.0 - dropout_p)


def _scales(scale, softcap):
    """(qk_scale, cap_scale) of _scores."""
    if softcap > 0.0:
        return softcap * _LOG2E, scale / softcap
    return scale * _LOG2E, 1.0


def attention_fwd(query, key, value, attn_mask: Optional[torch.Tensor], scale: float, window_left: int,
                  window_right: int, softcap: float, dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None,
                  checked: bool = True):
    """Forward. query (B, Hq, Sq, D), key (B, Hkv, Sk, D), value (B, Hkv, Sk, Dv), any strides;
    attn_mask None or (B, Hq, Sq, Sk) bool / floating, any strides (expanded views welcome);
    window_left / window_right >= 0 bound the band (-1: unbounded; causal is window_right = 0);
    softcap 0 = off. Returns (out (B, Hq, Sq, Dv) contiguous in query's dtype,
    lse (B, Hq, Sq) fp32, natural log, -inf for rows with no visible key).
    checked=False skips the argument checks, for llmfast's own callers that made the
    arguments (llmfast.functional's eager path; each check costs host time on every call)."""
    op = "llmfast.triton attention_fwd"
    dev = query.device
    if checked:
        B, Hq, Hkv, Sq, Sk, D, Dv = _check_qkv(op, query, key, value)
        dropout_p, seed = _check_dropout(op, dropout_p, seed, dev)
        mask, kind, mask_row, ms = _mask_args(op, attn_mask, (B, Hq, Sq, Sk), dev)
    else:
        B, Hq, Hkv, Sq, Sk, D, Dv = _dims(query, key, value)
        mask, kind, mask_row, ms = _mask_layout(attn_mask, (B, Hq, Sq, Sk))
    query, key, value = _head_dim_offsets_fit(query, key, value)
    out = torch.empty((B, Hq, Sq, Dv), dtype=query.dtype, device=dev)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    if B * Hq * Sq == 0:
        return out, lse
    window_left, window_right = _normalize_window(window_left, window_right, Sq, Sk)
    qk_scale, cap_scale = _scales(scale, softcap)
    flags = _common_flags(window_left, window_right, softcap, query.dtype, dropout_p)
    mask_arg = mask if mask is not None else query
    seed_arg = seed if seed is not None else lse

    def launch(cfg):
        _attn_fwd_kernel[(_cdiv(Sq, cfg.block_m) * B * Hq,)](
            query, key, value, out, lse, mask_arg, seed_arg,
            *query.stride(), *key.stride(), *value.stride(), *out.stride(), *ms,
            Hq, Hq // Hkv, Sq, Sk,
            qk_scale, cap_scale, window_left, window_right, dropout_p, _keep_scale(dropout_p),
            D=D, DV=Dv, BLOCK_D=max(16, _pow2(D)), BLOCK_DV=max(16, _pow2(Dv)),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MASK_KIND=kind, MASK_ROW=mask_row, **flags,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    with _device_ctx(dev):
        key_ = _tune_key(B, Hq, Hkv, Sq, Sk, D, Dv, query.dtype, kind, mask_row, *flags.values())
        FWD_TUNER.run(key_, _fwd_candidates(max(D, Dv), query.element_size(), dev.type == "cuda"), launch,
                      device=dev, large=B * Hq * Sq * Sk >= _TUNE_MIN_WORK)
    return out, lse


def attention_bwd(grad_out, query, key, value, out, lse, grad_lse: Optional[torch.Tensor],
                  attn_mask: Optional[torch.Tensor], scale: float, window_left: int, window_right: int,
                  softcap: float, dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None,
                  mask_grad: bool = False, checked: bool = True):
    """Backward of attention_fwd. grad_out like out (any strides); grad_lse (B, Hq, Sq) fp32 or
    None. Returns (grad_query, grad_key, grad_value) contiguous in the inputs' dtype, and
    grad_mask: (B, Hq, Sq, Sk) in attn_mask's dtype when mask_grad (an additive mask), else
    an empty (0,) tensor. checked=False as in attention_fwd (lse is then the forward's own)."""
    op = "llmfast.triton attention_bwd"
    dev = query.device
    if checked:
        B, Hq, Hkv, Sq, Sk, D, Dv = _check_qkv(op, query, key, value)
        dropout_p, seed = _check_dropout(op, dropout_p, seed, dev)
        for name, t, shape in (("grad_out", grad_out, (B, Hq, Sq, Dv)), ("out", out, (B, Hq, Sq, Dv)),
                               ("lse", lse, (B, Hq, Sq)), ("grad_lse", grad_lse, (B, Hq, Sq))):
            if t is None:
                continue
            if tuple(t.shape) != shape:
                raise LlmfastValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
            if t.device != dev:
                raise LlmfastTypeError(f"{op}: {name} must be on {dev}, got {t.device}")
        lse = lse.to(torch.float32).contiguous()
        mask, kind, mask_row, ms = _mask_args(op, attn_mask, (B, Hq, Sq, Sk), dev)
    else:
        B, Hq, Hkv, Sq, Sk, D, Dv = _dims(query, key, value)
        mask, kind, mask_row, ms = _mask_layout(attn_mask, (B, Hq, Sq, Sk))
    mask_grad = bool(mask_grad) and kind == _ADD_MASK
    query, key, value, out, grad_out = _head_dim_offsets_fit(query, key, value, out, grad_out)
    grad_query = torch.empty((B, Hq, Sq, D), dtype=query.dtype, device=dev)
    grad_key = torch.empty((B, Hkv, Sk, D), dtype=key.dtype, device=dev)
    grad_value = torch.empty((B, Hkv, Sk, Dv), dtype=value.dtype, device=dev)
    # Tiles outside the band are never visited, so the mask gradient starts at zero.
    grad_mask = (torch.zeros((B, Hq, Sq, Sk), dtype=attn_mask.dtype, device=dev) if mask_grad
                 else torch.empty((0,), dtype=query.dtype, device=dev))
    if Sq == 0 or Sk == 0 or B * Hq == 0:
        grad_query.zero_(), grad_key.zero_(), grad_value.zero_()
        return grad_query, grad_key, grad_value, grad_mask

    window_left, window_right = _normalize_window(window_left, window_right, Sq, Sk)
    qk_scale, cap_scale = _scales(scale, softcap)
    flags = _common_flags(window_left, window_right, softcap, query.dtype, dropout_p)
    dims = dict(D=D, DV=Dv, BLOCK_D=max(16, _pow2(D)), BLOCK_DV=max(16, _pow2(Dv)))
    delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    dlse = grad_lse.to(torch.float32).contiguous() if grad_lse is not None else None
    mask_ptr = mask if mask is not None else query
    seed_ptr = seed if seed is not None else delta
    on_gpu = dev.type == "cuda"

    dq_acc = []  # the fp32 dQ buffer of fused_dq plans, made on first use

    def launch_dkdv(cfg):
        if cfg.fused_dq:
            if not dq_acc:
                dq_acc.append(torch.zeros((B, Hq, Sq, D), dtype=torch.float32, device=dev))
            else:
                dq_acc[0].zero_()
        _attn_bwd_dkdv_kernel[(_cdiv(Sk, cfg.block_n) * B * Hkv,)](
            query, key, value, grad_out, lse, delta, grad_key, grad_value, mask_ptr, seed_ptr,
            grad_mask if mask_grad else delta, dq_acc[0] if cfg.fused_dq else delta,
            *query.stride(), *key.stride(), *value.stride(), *grad_out.stride(),
            *grad_key.stride(), *grad_value.stride(), *ms,
            Hkv, Hq // Hkv, Sq, Sk,
            scale, qk_scale, cap_scale, window_left, window_right, dropout_p, _keep_scale(dropout_p),
            **dims, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MASK_KIND=kind, MASK_ROW=mask_row,
            MASK_GRAD=mask_grad, **flags, FUSED_DQ=cfg.fused_dq, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    def launch_dq(cfg):  # also computes delta (COMPUTE_DELTA): launch it before the dK/dV kernel
        _attn_bwd_dq_kernel[(_cdiv(Sq, cfg.block_m) * B * Hq,)](
            query, key, value, grad_out, lse, delta, grad_query, mask_ptr, seed_ptr,
            out, dlse if dlse is not None else delta,
            *query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *grad_query.stride(), *ms,
            *out.stride(),
            Hq, Hq // Hkv, Sq, Sk,
            scale, qk_scale, cap_scale, window_left, window_right, dropout_p, _keep_scale(dropout_p),
            **dims, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, MASK_KIND=kind, MASK_ROW=mask_row,
            **flags, COMPUTE_DELTA=True, HAS_DLSE=dlse is not None, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    def launch_delta():  # the preprocess on its own, for the fused-dQ plans (no dQ kernel)
        block_pre = 64 if on_gpu else 32
        _attn_bwd_delta_kernel[(_cdiv(Sq, block_pre) * B * Hq,)](
            out, grad_out, dlse if dlse is not None else delta, delta,
            *out.stride(), *grad_out.stride(), Hq, Sq,
            DV=Dv, BLOCK_DV=dims["BLOCK_DV"], BLOCK_M=block_pre, HAS_DLSE=dlse is not None,
        )

    with _device_ctx(dev):
        deterministic = torch.are_deterministic_algorithms_enabled()
        key_ = _tune_key(B, Hq, Hkv, Sq, Sk, D, Dv, query.dtype, kind, mask_row, mask_grad, deterministic,
                         *flags.values())
        large = B * Hq * Sq * Sk >= _TUNE_MIN_WORK
        d, elt = max(D, Dv), query.element_size()
        spill_prone = dropout_p > 0.0 or Hq != Hkv
        dq_candidates = _dq_candidates(d, elt, on_gpu, spill_prone=spill_prone)
        dq_cfg = DQ_TUNER.choose(key_, dq_candidates, launch_dq, device=dev, large=large)

        def plan(cfg):  # what a dK/dV candidate costs: itself, plus the dQ kernel (or the preprocess) before it
            if cfg.fused_dq:
                launch_delta()
            else:
                launch_dq(dq_cfg)
            launch_dkdv(cfg)

        candidates = [c for c in _dkdv_candidates(d, elt, on_gpu, spill_prone=spill_prone)
                      if not (c.fused_dq and deterministic)]
        chosen = DKDV_TUNER.choose(key_, candidates, plan, device=dev, large=large)
        if chosen.fused_dq:
            launch_delta()
        else:  # dQ first: it writes the delta that the dK/dV kernel reads
            DQ_TUNER.launch_fitting(key_, dq_cfg, dq_candidates, launch_dq)
        cfg = DKDV_TUNER.launch_fitting(key_, chosen, candidates, launch_dkdv)
        if cfg.fused_dq:
            grad_query.copy_(dq_acc[0])
        elif chosen.fused_dq:  # the fused plan did not fit this GPU: dQ from its own kernel after all
            DQ_TUNER.launch_fitting(key_, dq_cfg, dq_candidates, launch_dq)
    return grad_query, grad_key, grad_value, grad_mask
