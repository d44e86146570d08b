"""Triton kernels for LayerNorm and RMSNorm, each with an optional fused residual add.

Same contract as the C++ ops in csrc/norm/norm_ops.cpp (norm_fwd / norm_bwd), as plain
Python functions; llmfast/ops/norm.py wraps them as custom ops.

Forward: s = input (+ residual, summed in fp32 and rounded to the input dtype);
  LayerNorm  y = (s - mean) * rstd * w + b,  mean = sum(s)/N, rstd = 1/sqrt(sum((s-mean)^2)/N + eps)
             (the mean taken as s[0] + sum(s - s[0])/N: exact for a constant row)
  RMSNorm    y = s * rstd * w (+ b),          rstd = 1/sqrt(sum(s^2)/N + eps)
Backward, with xhat = (s - mean) * rstd (RMSNorm: s * rstd) and g = dy * w:
  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (RMSNorm drops the mean(g) term)
  dx += grad_residual_out;  dw = sum_rows(dy * xhat);  db = sum_rows(dy)
All statistics and sums are fp32.

Algorithm and memory traffic (the ops are memory bound; one "pass" = M*N*elt bytes):
- Forward, N <= _MAX_FUSED_N (32768): a program holds whole rows in registers (several short
  rows per program), so it reads x once and writes y once: 2 passes (4 with a residual:
  reads x and r, writes s and y).
- Forward, wider rows: a persistent grid walks each row in chunks twice, once for the
  statistics and once to normalize; with ~2 rows per SM in flight the second read is an L2
  hit, so HBM still sees about 2 passes.
- Backward, rows that fit in registers together with the dW/dB accumulators (N <= 8192 with
  both, 16384 with one): a persistent grid of (#SMs * k) programs, each prefetching its next
  row tile while it reduces the current one and keeping dW/dB partial sums in fp32 registers
  across all of its rows: reads s and dy once, writes dx once (3 passes; +1 read of
  grad_residual_out). Each program writes one fp32 row of a (programs, N) workspace, which
  _sum_partials_kernel folds in a fixed order (deterministic) and casts to the weight dtype.
- Backward, wider rows: the row sums mean(g) and mean(g*xhat) come first from a per-row kernel
  (reads s, dy), then a column-tiled kernel computes dx and holds the dW/dB partials of its
  column block in registers (reads s, dy, writes dx): 5 passes instead of 3. A kernel that
  keeps the row in registers would spill, which measured slower.
Row offsets are 64-bit, so M*N may exceed 2^31.

Launches work on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before
triton was imported (Triton's interpreter, used by the CPU-only tests).
"""
import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from llmfast._errors import LlmfastTypeError, LlmfastValueError

from ._device import num_sms
from ._launch import fast_jit

__all__ = ["norm_fwd", "norm_bwd"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Triton reads TRITON_INTERPRET when it is imported, so reading it once here is equivalent.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Widest row (as next_power_of_2(N)) held in registers: the forward holds x; the backward s,
# dy and one or two fp32 accumulators (the two-accumulator limit is half of _MAX_FUSED_BWD_N).
# A program has at most 1024 threads and an SM 64K 32-bit registers, so past these widths
# ptxas spills and the looped kernels are faster (see _fwd_config / _bwd_config).
_MAX_FUSED_N = 32768
_MAX_FUSED_BWD_N = 16384


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    # Plain Python: triton.cdiv / next_power_of_2 are constexpr functions with call overhead,
    # and the launchers below run on every forward and backward.
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _sum_config(n_parts: int, n: int, on_gpu: bool = True):
    """(BLOCK_G, BLOCK_C) of the partial-sum reduction: narrow column blocks so that even
    N = 1024 spreads over a few dozen programs, 4K fp32 values per loop step. (Triton's CPU
    interpreter pays per program, so there one program takes all columns.)"""
    if not on_gpu:
        return _pow2(max(n_parts, 1)), _pow2(n)
    block_c = 32 if n <= 4096 else 128
    block_g = min(_pow2(max(n_parts, 1)), 4096 // block_c)
    return block_g, block_c


class _FwdConfig(NamedTuple):
    looped: bool  # False: whole rows in registers (_norm_fwd_kernel); True: _norm_fwd_looped_kernel
    block: int  # BLOCK_N (in registers) or the column chunk (looped)
    rows: int  # rows per program (in registers)
    num_warps: int
    programs_per_sm: int = 1  # looped: persistent grid = #SMs * programs_per_sm


class _BwdConfig(NamedTuple):
    looped: bool  # False: _norm_bwd_kernel; True: _norm_bwd_row_sums_kernel + _norm_bwd_cols_kernel
    block: int  # BLOCK_N (in registers) or the column block BLOCK_C of the column kernel
    rows: int  # rows per loop step
    num_warps: int
    programs_per_sm: int  # persistent grid = #SMs * programs_per_sm programs
    sums_chunk: int = 0  # looped: column chunk and warps of the row-sums kernel
    sums_warps: int = 0
    prefetch: bool = True  # in registers: load the next tile while reducing the current one
    reload_w: bool = False  # in registers: re-read w every tile instead of holding it


def _fwd_config(n: int) -> _FwdConfig:
    """Forward launch configuration for rows of n elements (measured on H100, bf16).

    Why: in registers, each thread should hold 8-32 values of the row (at least one 16-byte
    bf16 load, few enough that nothing spills), and each program should move several KB so
    that enough bytes are in flight per SM; rows up to 1024 are packed 4+ per program. The
    measured optimum per width was flat within ~2% across these choices (e.g. 16384x1024:
    2310-2340 GB/s for 1-8 rows per program). At 32768 the in-register kernel with 32 warps
    still does not spill (2900 GB/s at 8192x32768 vs 2440 looped); at 65536 it spills and the
    looped kernel with 32K-element chunks (16 warps, 2 programs per SM, so the rows in flight
    stay L2-resident for the second pass) wins: 2330 vs 1640 GB/s at 2048x65536.
    """
    block_n = _pow2(n)
    if block_n > _MAX_FUSED_N:
        return _FwdConfig(True, 32768, 1, 16, 2)
    if block_n <= 1024:
        return _FwdConfig(False, block_n, max(1, min(64, 4096 // block_n)), 4)
    if block_n <= 2048:
        return _FwdConfig(False, block_n, 2, 8)
    if block_n <= 4096:
        return _FwdConfig(False, block_n, 1, 8)
    if block_n <= 16384:
        return _FwdConfig(False, block_n, 1, 16)
    return _FwdConfig(False, block_n, 1, 32)


def _bwd_config(n: int, n_acc: int, on_gpu: bool = True) -> _BwdConfig:
    """Backward launch configuration for rows of n elements and n_acc (0-2) dW/dB accumulators
    (measured on H100, bf16).

    Why: the in-register kernel holds s, dy and the n_acc fp32 accumulators per element, so it
    runs out of registers at half the forward's width when both dW and dB are wanted: up to
    8192 with both, 16384 with one. Past that the two-kernel path (5 passes) beats a spilling
    kernel: at 4096x16384 LayerNorm 1640 GB/s vs 1410 in registers, while RMSNorm (dW only)
    stays in registers at 2270 GB/s. PREFETCH (two tiles in flight per program) gains 5-15%
    wherever it does not spill (at 16384 it spills badly, so it is off there); RELOAD_W frees
    the registers of w at 8192+ (2640 vs 1750 GB/s at 8192x8192 with prefetch). Programs per
    SM is the best measured occupancy; fewer, fatter programs also keep the (programs, N)
    fp32 partial-sum workspace small next to the tensors.
    """
    block_n = _pow2(n)
    if block_n > _MAX_FUSED_BWD_N or (n_acc == 2 and block_n > _MAX_FUSED_BWD_N // 2):
        if not on_gpu:
            # Triton's interpreter pays per program and per step: wide blocks keep CPU tests quick.
            return _BwdConfig(True, 8192, 1, 4, 1, sums_chunk=16384, sums_warps=8)
        return _BwdConfig(True, 1024, 1, 4, 8, sums_chunk=4096, sums_warps=8)
    if block_n <= 1024:
        return _BwdConfig(False, block_n, max(1, min(16, 2048 // block_n)), 4, 4)
    if block_n <= 2048:
        return _BwdConfig(False, block_n, 2, 8, 2)
    if block_n <= 4096:
        return _BwdConfig(False, block_n, 1, 8, 2)
    if block_n <= 8192:
        return _BwdConfig(False, block_n, 1, 16, 1, reload_w=True)
    # 16384 with at most one accumulator (RMSNorm without bias, or no parameter gradients).
    return _BwdConfig(False, block_n, 1, 16, 1, prefetch=False, reload_w=True)


# --------------------------------------------------------------------------------------------
# Kernels. Every (M, N) tensor is contiguous (the launchers check it): row r starts at r * N,
# computed in int64. Absent tensors are replaced by a dummy pointer behind a constexpr flag.
# --------------------------------------------------------------------------------------------
# Forward, rows in registers. Traffic: reads x (and residual) once, writes y (and s) once;
# w and b are read once per program (cached). Grid: cdiv(M, ROWS).
@triton.jit
def _first_of_rows(X, RES, row_offsets, row_mask, HAS_RES: tl.constexpr, s_dtype: tl.constexpr):
    """The normalized value s of each row's first element, in fp32 (x, or x + residual rounded to
    s_dtype as the kernels round it); a load of a line the row's own loads bring in anyway."""
    first = tl.load(X + row_offsets, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_RES:
        first = (first + tl.load(RES + row_offsets, mask=row_mask, other=0.0).to(tl.float32)).to(s_dtype)
    return first.to(tl.float32)


@fast_jit
@triton.jit
def _norm_fwd_kernel(
    X,  # (M, N) input
    RES,  # (M, N) residual, or a dummy when HAS_RES is False
    W,  # (N,) weight or dummy
    B,  # (N,) bias or dummy
    Y,  # (M, N) output
    S,  # (M, N) residual_out = x + residual, or dummy
    MEAN,  # (M,) fp32, written for LayerNorm only
    RSTD,  # (M,) fp32
    M,
    N,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    x = tl.load(X + rows64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(RES + rows64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + rows64 * N + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)

    if RMS:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        xhat = x * rstd[:, None]
    else:
        # mean = s[first] + mean(s - s[first]): exact for a constant row (as torch's Welford
        # mean), which then normalizes to exactly 0 even with a tiny eps (BERT's 1e-12).
        first = _first_of_rows(X, RES, rows.to(tl.int64) * N, row_mask, HAS_RES, S.dtype.element_ty)
        mean = tl.sum(tl.where(mask, x - first[:, None], 0.0), axis=1) / N + first
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
        tl.store(MEAN + rows, mean, mask=row_mask)
        xhat = xc * rstd[:, None]
    tl.store(RSTD + rows, rstd, mask=row_mask)

    y = xhat
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows64 * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


# Forward, looped over column chunks; a persistent grid of G programs walks rows pid,
# pid + G, ... Traffic: reads x (and residual) once from HBM and writes s; a second pass
# re-reads x (or s) and writes y. G is about two programs per SM so the rows in flight
# (G * N * elt bytes) fit in L2 and the second read is an L2 hit. LayerNorm statistics merge
# per-chunk (count, mean, M2) with Chan's formula, as stable as the two-pass variance.
@fast_jit
@triton.jit
def _norm_fwd_looped_kernel(
    X, RES, W, B, Y, S, MEAN, RSTD,  # as _norm_fwd_kernel
    M,
    N,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RMS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    offs = tl.arange(0, CHUNK)
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    for i in range(0, tl.cdiv(M - pid, n_programs)):
        row64 = (pid + i * n_programs).to(tl.int64)
        x_row = X + row64 * N
        s_row = S + row64 * N

        sq_acc = tl.zeros([CHUNK], dtype=tl.float32)  # RMSNorm: running sum of s^2 per lane
        count = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), axis=0)  # LayerNorm: Chan state of
        mean = count  # s - first (exact for a constant row, as in _norm_fwd_kernel)
        m2 = count
        if not RMS:
            first = _first_of_rows(X, RES, row64 * N, row64 < M, HAS_RES, S.dtype.element_ty)
        for start in range(0, N, CHUNK):
            cols = start + offs
            mask = cols < N
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                r = tl.load(RES + row64 * N + cols, mask=mask, other=0.0).to(tl.float32)
                s = (x + r).to(S.dtype.element_ty)
                tl.store(s_row + cols, s, mask=mask)
                x = s.to(tl.float32)
            if RMS:
                sq_acc += x * x
            else:
                n_chunk = tl.minimum(N - start, CHUNK).to(tl.float32)
                mean_chunk = tl.sum(tl.where(mask, x - first, 0.0), axis=0) / n_chunk
                d = tl.where(mask, x - first - mean_chunk, 0.0)
                m2_chunk = tl.sum(d * d, axis=0)
                n_new = count + n_chunk
                delta = mean_chunk - mean
                mean = mean + delta * (n_chunk / n_new)
                m2 = m2 + m2_chunk + delta * delta * (count * n_chunk / n_new)
                count = n_new

        if RMS:
            rstd = tl.rsqrt(tl.sum(sq_acc, axis=0) / N + eps)
        else:
            mean = first + mean
            rstd = tl.rsqrt(m2 / N + eps)
            tl.store(MEAN + row64, mean)
        tl.store(RSTD + row64, rstd)

        for start in range(0, N, CHUNK):
            cols = start + offs
            mask = cols < N
            if HAS_RES:
                # Written above by this program, by the same thread (same layout).
                x = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if RMS:
                y = x * rstd
            else:
                y = (x - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + row64 * N + cols, y.to(Y.dtype.element_ty), mask=mask)


# Backward, rows in registers, persistent grid (G programs, each looping over row tiles
# pid, pid + G, ...). Traffic: reads s and dy (and grad_residual_out) once, writes dx once;
# w once per program; writes a (G, N) fp32 partial-sum row for dW and for dB.
# With PREFETCH the loads of the next tile are issued before the current tile is reduced, so
# each program keeps two tiles in flight instead of idling on load latency every iteration.
@triton.jit
def _norm_bwd_tile_loads(DY, X, MEAN, RSTD, tile, M, N,
                         RMS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    rows = tile * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    # Masked lanes load dy = 0, so they add nothing to the sums.
    x = tl.load(X + rows64 * N + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows64 * N + cols[None, :], mask=mask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
    if RMS:
        mean = rstd  # unused
    else:
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
    return x, dy, mean, rstd


@fast_jit
@triton.jit
def _norm_bwd_kernel(
    DY,  # (M, N) grad_out
    DRES,  # (M, N) grad_residual_out or dummy
    X,  # (M, N) normed input s
    W,  # (N,) weight or dummy
    MEAN,  # (M,) fp32 (LayerNorm) or dummy
    RSTD,  # (M,) fp32
    DX,  # (M, N) grad_input
    DW_PART,  # (G, N) fp32 partial sums of dy * xhat, or dummy
    DB_PART,  # (G, N) fp32 partial sums of dy, or dummy
    M,
    N,
    HAS_DRES: tl.constexpr,
    HAS_W: tl.constexpr,
    RMS: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    PREFETCH: tl.constexpr,
    RELOAD_W: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_W and not RELOAD_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    dw_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)

    n_tiles = tl.cdiv(M, ROWS)
    if PREFETCH:
        x_nxt, dy_nxt, mean_nxt, rstd_nxt = _norm_bwd_tile_loads(
            DY, X, MEAN, RSTD, pid, M, N, RMS, BLOCK_N, ROWS)
    for tile in range(pid, n_tiles, n_programs):
        if PREFETCH:
            x, dy, mean, rstd = x_nxt, dy_nxt, mean_nxt, rstd_nxt
            x_nxt, dy_nxt, mean_nxt, rstd_nxt = _norm_bwd_tile_loads(
                DY, X, MEAN, RSTD, tile + n_programs, M, N, RMS, BLOCK_N, ROWS)
        else:
            x, dy, mean, rstd = _norm_bwd_tile_loads(
                DY, X, MEAN, RSTD, tile, M, N, RMS, BLOCK_N, ROWS)
        rows = tile * ROWS + tl.arange(0, ROWS)
        mask = (rows < M)[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = x.to(tl.float32)
        dy = dy.to(tl.float32)
        rstd = rstd[:, None]
        if RMS:
            xhat = x * rstd
        else:
            xhat = (x - mean[:, None]) * rstd
        if HAS_W:
            if RELOAD_W:
                # Re-read from L1/L2 each tile: frees BLOCK_N registers for the widest rows.
                w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            g = dy * w
        else:
            g = dy
        c1 = tl.sum(g * xhat, axis=1)[:, None] / N
        if RMS:
            dx = (g - xhat * c1) * rstd
        else:
            c2 = tl.sum(g, axis=1)[:, None] / N
            dx = (g - c2 - xhat * c1) * rstd
        if HAS_DRES:
            dx += tl.load(DRES + rows64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * xhat
        if COMPUTE_DB:
            db_acc += dy

    # Every program writes its full partial row (zeros if it had no rows).
    part = pid.to(tl.int64) * N + cols
    if COMPUTE_DW:
        tl.store(DW_PART + part, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB_PART + part, tl.sum(db_acc, axis=0), mask=col_mask)


# Backward for wide rows, step 1 (grid: M): the row sums c1 = mean(g * xhat) and
# c2 = mean(g) in fp32. Traffic: reads s and dy once, writes 2 floats per row.
@fast_jit
@triton.jit
def _norm_bwd_row_sums_kernel(
    DY, X, W, MEAN, RSTD,  # as _norm_bwd_kernel
    C1,  # (M,) fp32 out: mean(g * xhat)
    C2,  # (M,) fp32 out: mean(g)
    N,
    HAS_W: tl.constexpr,
    RMS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNK)
    rstd = tl.load(RSTD + row)
    if RMS:
        mean = 0.0
    else:
        mean = tl.load(MEAN + row)
    gx_acc = tl.zeros([CHUNK], dtype=tl.float32)
    g_acc = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, N, CHUNK):
        cols = start + offs
        mask = cols < N
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            g = g * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        gx_acc += g * ((x - mean) * rstd)
        g_acc += g
    tl.store(C1 + row, tl.sum(gx_acc, axis=0) / N)
    tl.store(C2 + row, tl.sum(g_acc, axis=0) / N)


# Backward for wide rows, step 2 (grid: column blocks x G row groups): dx from the row sums,
# and dW/dB partials held in registers for the program's column block across its rows.
# Traffic: reads s and dy (and grad_residual_out) once, writes dx once, writes a (G, N) fp32
# partial-sum row for dW and dB.
@fast_jit
@triton.jit
def _norm_bwd_cols_kernel(
    DY, DRES, X, W, MEAN, RSTD,  # as _norm_bwd_kernel
    C1,  # (M,) fp32 from _norm_bwd_row_sums_kernel
    C2,  # (M,) fp32
    DX, DW_PART, DB_PART,  # as _norm_bwd_kernel, partials (G, N) with G = grid dim 1
    M,
    N,
    HAS_DRES: tl.constexpr,
    HAS_W: tl.constexpr,
    RMS: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    group = tl.program_id(1)
    n_groups = tl.num_programs(1)
    col_mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    dw_acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)

    n_tiles = tl.cdiv(M, ROWS)
    for tile in range(group, n_tiles, n_groups):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
        c1 = tl.load(C1 + rows, mask=row_mask, other=0.0)[:, None]
        if RMS:
            xhat = x * rstd
        else:
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)[:, None]
            xhat = (x - mean) * rstd
        if HAS_W:
            g = dy * w
        else:
            g = dy
        if RMS:
            dx = (g - xhat * c1) * rstd
        else:
            c2 = tl.load(C2 + rows, mask=row_mask, other=0.0)[:, None]
            dx = (g - c2 - xhat * c1) * rstd
        if HAS_DRES:
            dx += tl.load(DRES + rows64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * xhat
        if COMPUTE_DB:
            db_acc += dy

    part = group.to(tl.int64) * N + cols
    if COMPUTE_DW:
        tl.store(DW_PART + part, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB_PART + part, tl.sum(db_acc, axis=0), mask=col_mask)


# dW / dB from the (G, N) fp32 partial sums: column blocks in parallel, G summed in a fixed
# order (deterministic), result cast to the parameter dtype. Traffic: reads the partials once.
@fast_jit
@triton.jit
def _sum_partials_kernel(
    DW_PART, DB_PART,  # (G, N) fp32, or dummies
    DW, DB,  # (N,) outputs in the parameter dtype, or dummies
    G,
    N,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < N
    dw_acc = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        mask = (g < G)[:, None] & col_mask[None, :]
        offs = g.to(tl.int64)[:, None] * N + cols[None, :]
        if COMPUTE_DW:
            dw_acc += tl.load(DW_PART + offs, mask=mask, other=0.0)
        if COMPUTE_DB:
            db_acc += tl.load(DB_PART + offs, mask=mask, other=0.0)
    if COMPUTE_DW:
        tl.store(DW + cols, tl.sum(dw_acc, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB + cols, tl.sum(db_acc, axis=0).to(DB.dtype.element_ty), mask=col_mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _check_device(t: torch.Tensor, ref: torch.Tensor, op: str, name: str) -> None:
    if t.device != ref.device:
        raise LlmfastTypeError(f"{op}: {name} must be on {ref.device}, got {t.device}")


def _check_matrix(t, op, name):
    if not isinstance(t, torch.Tensor):
        raise LlmfastTypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise LlmfastValueError(f"{op}: {name} must be 2-D (M, N), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise LlmfastTypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device.type != "cuda" and not _INTERPRET:
        raise LlmfastTypeError(
            f"{op}: {name} must be a CUDA tensor (or run with TRITON_INTERPRET=1), got {t.device}")
    if not t.is_contiguous():
        raise LlmfastValueError(f"{op}: {name} must be contiguous")


def _check_like(t, ref, op, name, ref_name):
    if t.shape != ref.shape:
        raise LlmfastValueError(
            f"{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise LlmfastTypeError(f"{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    _check_device(t, ref, op, name)
    if not t.is_contiguous():
        raise LlmfastValueError(f"{op}: {name} must be contiguous")


def _check_param(t, n, ref, op, name):
    if t.dim() != 1 or t.numel() != n:
        raise LlmfastValueError(f"{op}: {name} must have shape ({n},), got {tuple(t.shape)}")
    if t.dtype not in (ref.dtype, torch.float32):
        raise LlmfastTypeError(
            f"{op}: {name} must be {ref.dtype} (the input's dtype) or float32, got {t.dtype}")
    _check_device(t, ref, op, name)
    if not t.is_contiguous():
        raise LlmfastValueError(f"{op}: {name} must be contiguous")


def _check_stat(t, m, ref, op, name):
    if t.dtype != torch.float32:
        raise LlmfastTypeError(f"{op}: {name} must be float32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != m:
        raise LlmfastValueError(f"{op}: {name} must have shape ({m},), got {tuple(t.shape)}")
    _check_device(t, ref, op, name)
    if not t.is_contiguous():
        raise LlmfastValueError(f"{op}: {name} must be contiguous")


def _device_ctx(device: torch.device):
    """Triton launches on the current CUDA device (and its current stream): switch to the
    tensors' device only when it is not the current one."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_fwd_args(input, residual, weight, bias):
    op = "llmfast.triton norm_fwd"
    _check_matrix(input, op, "input")
    N = input.shape[1]
    if residual is not None:
        _check_like(residual, input, op, "residual", "input")
    if weight is not None:
        _check_param(weight, N, input, op, "weight")
    if bias is not None:
        _check_param(bias, N, input, op, "bias")
        if weight is not None and bias.dtype != weight.dtype:
            raise LlmfastTypeError(f"{op}: bias must have the dtype of weight ({weight.dtype}), got {bias.dtype}")


def _check_bwd_args(grad_out, grad_residual_out, x, weight, mean, rstd, rms, weight_grad):
    op = "llmfast.triton norm_bwd"
    _check_matrix(x, op, "normed_input")
    M, N = x.shape
    _check_like(grad_out, x, op, "grad_out", "normed_input")
    if grad_residual_out is not None:
        _check_like(grad_residual_out, x, op, "grad_residual_out", "normed_input")
    if weight is not None:
        _check_param(weight, N, x, op, "weight")
    if weight_grad and weight is None:
        raise LlmfastValueError(f"{op}: weight_grad=True needs a weight, got None")
    if not rms:
        _check_stat(mean, M, x, op, "mean")
    _check_stat(rstd, M, x, op, "rstd")


def norm_fwd(input, residual, weight, bias, eps: float, rms: bool, checked: bool = True):
    """LayerNorm / RMSNorm forward, optionally of input + residual.

    input (M, N) contiguous float32/float16/bfloat16; residual like input or None; weight,
    bias (N,) of input's dtype or float32, or None. Returns (out (M, N) input dtype,
    residual_out (M, N) = input + residual (empty (0,) without residual),
    mean (M,) fp32 (empty (0,) for RMSNorm), rstd (M,) fp32).
    checked=False skips the argument checks, for llmfast's own eager path, which has checked
    (and made contiguous) what it passes: the checks cost host time on every call.
    """
    if checked:
        _check_fwd_args(input, residual, weight, bias)
    M, N = input.shape

    dev = input.device
    out = torch.empty((M, N), dtype=input.dtype, device=dev)
    residual_out = torch.empty((M, N) if residual is not None else (0,), dtype=input.dtype, device=dev)
    mean = torch.empty((0,) if rms else (M,), dtype=torch.float32, device=dev)
    rstd = torch.empty((M,), dtype=torch.float32, device=dev)
    if M == 0:
        return out, residual_out, mean, rstd
    if N == 0:
        # Statistics of an empty row, as torch.native_layer_norm reports them.
        mean.zero_()
        rstd.fill_(float("nan"))
        return out, residual_out, mean, rstd

    dummy = input  # stands in for absent tensors; never read or written (constexpr flags)
    args = (
        input,
        residual if residual is not None else dummy,
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        out,
        residual_out if residual is not None else dummy,
        rstd if rms else mean,
        rstd,
        M,
        N,
        float(eps),
    )
    flags = dict(HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, RMS=bool(rms))
    cfg = _fwd_config(N)
    with _device_ctx(dev):
        if not cfg.looped:
            _norm_fwd_kernel[(_cdiv(M, cfg.rows),)](
                *args, **flags, BLOCK_N=cfg.block, ROWS=cfg.rows, num_warps=cfg.num_warps)
        else:
            grid = (max(1, min(M, num_sms(dev) * cfg.programs_per_sm)),)
            _norm_fwd_looped_kernel[grid](*args, **flags, CHUNK=cfg.block, num_warps=cfg.num_warps)
    return out, residual_out, mean, rstd


def norm_bwd(grad_out, grad_residual_out, normed_input, weight, mean, rstd, rms: bool,
             weight_grad: bool, bias_grad: bool, checked: bool = True):
    """Backward of norm_fwd. Returns (grad_input (M, N) input dtype, including
    grad_residual_out; grad_weight (N,) weight dtype if weight_grad else empty (0,);
    grad_bias (N,) weight dtype (input dtype without weight) if bias_grad else empty (0,)).
    checked=False as in norm_fwd (the statistics are then norm_fwd's own, the gradients
    contiguous and of the outputs' shape and dtype, as autograd hands them on)."""
    if checked:
        _check_bwd_args(grad_out, grad_residual_out, normed_input, weight, mean, rstd, rms, weight_grad)
    x = normed_input
    M, N = normed_input.shape

    dev = x.device
    param_dtype = weight.dtype if weight is not None else x.dtype
    weight_grad, bias_grad = bool(weight_grad), bool(bias_grad)
    grad_input = torch.empty((M, N), dtype=x.dtype, device=dev)
    if M == 0 or N == 0:
        grad_weight = torch.zeros((N if weight_grad else 0,), dtype=param_dtype, device=dev)
        grad_bias = torch.zeros((N if bias_grad else 0,), dtype=param_dtype, device=dev)
        return grad_input, grad_weight, grad_bias
    grad_weight = torch.empty((N if weight_grad else 0,), dtype=param_dtype, device=dev)
    grad_bias = torch.empty((N if bias_grad else 0,), dtype=param_dtype, device=dev)

    dummy = x  # stands in for absent tensors; never read or written (constexpr flags)
    n_acc = int(weight_grad) + int(bias_grad)
    flags = dict(HAS_DRES=grad_residual_out is not None, HAS_W=weight is not None, RMS=bool(rms),
                 COMPUTE_DW=weight_grad, COMPUTE_DB=bias_grad)
    dres = grad_residual_out if grad_residual_out is not None else dummy
    w = weight if weight is not None else dummy
    mean_arg = rstd if rms else mean
    on_gpu = dev.type == "cuda"
    cfg = _bwd_config(N, n_acc, on_gpu)
    sms = num_sms(dev)
    with _device_ctx(dev):
        if not cfg.looped:
            n_parts = max(1, min(_cdiv(M, cfg.rows), sms * cfg.programs_per_sm))
        else:
            col_blocks = _cdiv(N, cfg.block)
            n_parts = max(1, min(_cdiv(M, cfg.rows), _cdiv(sms * cfg.programs_per_sm, col_blocks)))
        # fp32 (n_parts, N) partial sums of dW and dB, one row per program (or row group);
        # every program writes its whole row, so torch.empty is enough.
        parts = torch.empty((n_acc, n_parts, N) if n_acc else (1,), dtype=torch.float32, device=dev)
        dw_part = parts[0] if weight_grad else parts
        db_part = parts[n_acc - 1] if bias_grad else parts

        if not cfg.looped:
            _norm_bwd_kernel[(n_parts,)](
                grad_out, dres, x, w, mean_arg, rstd, grad_input, dw_part, db_part,
                M, N, **flags, BLOCK_N=cfg.block, ROWS=cfg.rows, PREFETCH=cfg.prefetch,
                RELOAD_W=cfg.reload_w, num_warps=cfg.num_warps)
        else:
            sums = torch.empty((2, M), dtype=torch.float32, device=dev)  # mean(g*xhat), mean(g)
            _norm_bwd_row_sums_kernel[(M,)](
                grad_out, x, w, mean_arg, rstd, sums[0], sums[1], N,
                HAS_W=weight is not None, RMS=bool(rms), CHUNK=cfg.sums_chunk, num_warps=cfg.sums_warps)
            _norm_bwd_cols_kernel[(col_blocks, n_parts)](
                grad_out, dres, x, w, mean_arg, rstd, sums[0], sums[1], grad_input, dw_part, db_part,
                M, N, **flags, BLOCK_C=cfg.block, ROWS=cfg.rows, num_warps=cfg.num_warps)

        if n_acc:
            block_g, block_c = _sum_config(n_parts, N, on_gpu)
            _sum_partials_kernel[(_cdiv(N, block_c),)](
                dw_part, db_part, grad_weight if weight_grad else dummy, grad_bias if bias_grad else dummy,
                n_parts, N, COMPUTE_DW=weight_grad, COMPUTE_DB=bias_grad,
                BLOCK_G=block_g, BLOCK_C=block_c, num_warps=4)
    return grad_input, grad_weight, grad_bias
