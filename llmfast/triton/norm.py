"""Triton kernels for LayerNorm and RMSNorm, each with an optional fused residual add.

Same contract as the C++ ops in csrc/norm/norm_ops.cpp (norm_fwd / norm_bwd), as plain
Python functions; llmfast/ops/norm.py wraps them as custom ops.

Forward: s = input (+ residual, summed in fp32 and rounded to the input dtype);
  LayerNorm  y = (s - mean) * rstd * w + b,  mean = sum(s)/N, rstd = 1/sqrt(sum((s-mean)^2)/N + eps)
  RMSNorm    y = s * rstd * w (+ b),          rstd = 1/sqrt(sum(s^2)/N + eps)
Backward, with xhat = (s - mean) * rstd (RMSNorm: s * rstd) and g = dy * w:
  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (RMSNorm drops the mean(g) term)
  dx += grad_residual_out;  dw = sum_rows(dy * xhat);  db = sum_rows(dy)
All statistics and sums are fp32.

Algorithm and memory traffic (the ops are memory bound; the figures count tensor-sized passes,
one pass = M*N*elt bytes):
- N up to _MAX_FUSED_N: a program holds whole rows in registers, so the forward reads x once
  and writes y once (2 passes; +1 read and +1 write with a residual) and the backward reads s
  and dy once and writes dx once (3 passes). The backward runs a persistent grid of about
  (#SMs * k) programs; each keeps its dW/dB partial sums in fp32 registers across all of its
  rows and writes them once to an fp32 (programs, N) workspace, summed by torch afterwards.
- Larger N (a row no longer fits in registers): the forward walks each row in chunks twice,
  once for the statistics and once to normalize; the second read of the row mostly hits L2
  (one row per SM in flight). The backward splits into a per-row kernel that computes the two
  row sums mean(g) and mean(g*xhat) (reads s, dy) and a column-tiled kernel that computes dx
  and the dW/dB partials (reads s, dy, writes dx): 5 passes instead of 3.
Row offsets are 64-bit, so M*N may exceed 2^31.

Launches work on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before
triton was imported (Triton's interpreter, used by the CPU-only tests).
"""
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from llmfast._errors import LlmfastTypeError, LlmfastValueError

__all__ = ["norm_fwd", "norm_bwd"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Widest row (as next_power_of_2(N)) held in registers. A program holds BLOCK_N fp32 values of
# x (backward: also dy, w and the dW/dB accumulators) across at most 1024 threads with 64K
# registers per SM, so past this width the kernels spill; the looped kernels take over.
_MAX_FUSED_N = 65536
_MAX_FUSED_BWD_N = 16384
# Column chunk of the looped kernels (elements per loop step of one row).
_LOOP_CHUNK = 4096


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # Triton's CPU interpreter runs programs one after another: a few programs are enough
    # to exercise the persistent loops and the workspace reduction.
    return 4


class _FwdConfig(NamedTuple):
    looped: bool  # False: whole rows in registers (_norm_fwd_kernel); True: _norm_fwd_looped_kernel
    block: int  # BLOCK_N (in registers) or the column chunk (looped)
    rows: int  # rows per program (in registers)
    num_warps: int


class _BwdConfig(NamedTuple):
    looped: bool  # False: _norm_bwd_kernel; True: _norm_bwd_row_sums_kernel + _norm_bwd_cols_kernel
    block: int  # BLOCK_N (in registers) or the column block BLOCK_C of the column kernel
    rows: int  # rows per loop step
    num_warps: int
    programs_per_sm: int  # persistent grid = #SMs * programs_per_sm programs
    sums_chunk: int = 0  # looped: column chunk and warps of the row-sums kernel
    sums_warps: int = 0


def _fwd_config(n: int) -> _FwdConfig:
    """Forward launch configuration for rows of n elements.

    Why: each thread should hold 8-32 fp32 values of x (at least one 16-byte load of bf16,
    few enough to stay clear of spills), and each program should move at least ~8 KB so that
    enough bytes are in flight per SM; short rows are therefore packed several per program.
    num_warps grows with the row: 4 warps (128 threads) up to 2048, 32 warps (1024 threads,
    the most a program can have) at 32768 and above.
    """
    block_n = triton.next_power_of_2(n)
    if block_n > _MAX_FUSED_N:
        return _FwdConfig(True, _LOOP_CHUNK, 1, 8)
    if block_n <= 1024:
        return _FwdConfig(False, block_n, max(1, min(64, 4096 // block_n)), 4)
    if block_n <= 2048:
        return _FwdConfig(False, block_n, 2, 4)
    if block_n <= 8192:
        return _FwdConfig(False, block_n, 1, 8)
    if block_n <= 16384:
        return _FwdConfig(False, block_n, 1, 16)
    return _FwdConfig(False, block_n, 1, 32)


def _bwd_config(n: int) -> _BwdConfig:
    """Backward launch configuration for rows of n elements.

    Why: the backward holds x, dy and the two fp32 accumulators per element, about twice the
    forward's registers, so it uses more warps for the same row; programs per SM sets the
    persistent grid to fill the SMs (occupancy) while keeping the (programs, N) fp32 dW/dB
    workspace small next to the tensors themselves.
    """
    block_n = triton.next_power_of_2(n)
    if block_n > _MAX_FUSED_BWD_N:
        return _BwdConfig(True, 1024, 1, 4, 4, _LOOP_CHUNK, 8)
    if block_n <= 1024:
        return _BwdConfig(False, block_n, max(1, min(16, 2048 // block_n)), 4, 8)
    if block_n <= 2048:
        return _BwdConfig(False, block_n, 1, 4, 8)
    if block_n <= 4096:
        return _BwdConfig(False, block_n, 1, 8, 4)
    if block_n <= 8192:
        return _BwdConfig(False, block_n, 1, 16, 2)
    return _BwdConfig(False, block_n, 1, 32, 1)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
# Forward, rows in registers. Traffic: reads x (and residual) once, writes y (and s) once;
# w and b are read once per program (cached). Grid: cdiv(M, ROWS).
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
    stride_x,
    stride_res,
    stride_y,
    stride_s,
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

    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(RES + rows64 * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + rows64 * stride_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)

    if RMS:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        xhat = x * rstd[:, None]
    else:
        mean = tl.sum(x, axis=1) / N
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
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


# Forward, looped over column chunks, one row per program (grid: M). Traffic: reads x (and
# residual) once from HBM and writes s; a second pass re-reads x (or s) -- mostly from L2,
# one row per SM is in flight -- and writes y. LayerNorm statistics merge per-chunk
# (count, mean, M2) with Chan's formula, which is as stable as the two-pass variance.
@triton.jit
def _norm_fwd_looped_kernel(
    X, RES, W, B, Y, S, MEAN, RSTD,  # as _norm_fwd_kernel
    N,
    stride_x,
    stride_res,
    stride_y,
    stride_s,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    RMS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    s_row = S + row * stride_s
    offs = tl.arange(0, CHUNK)

    sq_acc = tl.zeros([CHUNK], dtype=tl.float32)  # RMSNorm: running sum of s^2 per lane
    count = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), axis=0)  # LayerNorm: Chan merge state
    mean = count
    m2 = count
    for start in range(0, N, CHUNK):
        cols = start + offs
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(RES + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(S.dtype.element_ty)
            tl.store(s_row + cols, s, mask=mask)
            x = s.to(tl.float32)
        if RMS:
            sq_acc += x * x
        else:
            n_chunk = tl.minimum(N - start, CHUNK).to(tl.float32)
            mean_chunk = tl.sum(x, axis=0) / n_chunk
            d = tl.where(mask, x - mean_chunk, 0.0)
            m2_chunk = tl.sum(d * d, axis=0)
            n_new = count + n_chunk
            delta = mean_chunk - mean
            mean = mean + delta * (n_chunk / n_new)
            m2 = m2 + m2_chunk + delta * delta * (count * n_chunk / n_new)
            count = n_new

    if RMS:
        rstd = tl.rsqrt(tl.sum(sq_acc, axis=0) / N + eps)
    else:
        rstd = tl.rsqrt(m2 / N + eps)
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)

    for start in range(0, N, CHUNK):
        cols = start + offs
        mask = cols < N
        if HAS_RES:
            # Written above by this program: the same thread wrote these addresses.
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
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


# Backward, rows in registers, persistent grid (G programs, each looping over row tiles
# pid, pid + G, ...). Traffic: reads s and dy (and grad_residual_out) once, writes dx once;
# w once per program; writes a (G, N) fp32 partial-sum row for dW and for dB.
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
    stride_dy,
    stride_dres,
    stride_x,
    stride_dx,
    HAS_DRES: tl.constexpr,
    HAS_W: tl.constexpr,
    RMS: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    dw_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)

    n_tiles = tl.cdiv(M, ROWS)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        # Masked lanes load dy = 0, so they add nothing to the sums below.
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
        if RMS:
            xhat = x * rstd
        else:
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)[:, None]
            xhat = (x - mean) * rstd
        if HAS_W:
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
            dx += tl.load(DRES + rows64 * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
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
@triton.jit
def _norm_bwd_row_sums_kernel(
    DY, X, W, MEAN, RSTD,  # as _norm_bwd_kernel
    C1,  # (M,) fp32 out: mean(g * xhat)
    C2,  # (M,) fp32 out: mean(g)
    N,
    stride_dy,
    stride_x,
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
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
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
@triton.jit
def _norm_bwd_cols_kernel(
    DY, DRES, X, W, MEAN, RSTD,  # as _norm_bwd_kernel
    C1,  # (M,) fp32 from _norm_bwd_row_sums_kernel
    C2,  # (M,) fp32
    DX, DW_PART, DB_PART,  # as _norm_bwd_kernel, partials (G, N) with G = grid dim 1
    M,
    N,
    stride_dy,
    stride_dres,
    stride_x,
    stride_dx,
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
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
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
            dx += tl.load(DRES + rows64 * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * xhat
        if COMPUTE_DB:
            db_acc += dy

    part = group.to(tl.int64) * N + cols
    if COMPUTE_DW:
        tl.store(DW_PART + part, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB_PART + part, tl.sum(db_acc, axis=0), mask=col_mask)


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
    if t.device.type != "cuda" and not _interpreting():
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class _on_device:
    """Launch on the tensor's GPU (Triton uses the current device and its current stream)."""

    def __init__(self, t: torch.Tensor):
        self.ctx = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


def norm_fwd(input, residual, weight, bias, eps: float, rms: bool):
    """LayerNorm / RMSNorm forward, optionally of input + residual.

    input (M, N) contiguous float32/float16/bfloat16; residual like input or None; weight,
    bias (N,) of input's dtype or float32, or None. Returns (out (M, N) input dtype,
    residual_out (M, N) = input + residual (empty (0,) without residual),
    mean (M,) fp32 (empty (0,) for RMSNorm), rstd (M,) fp32).
    """
    op = "llmfast.triton norm_fwd"
    _check_matrix(input, op, "input")
    M, N = input.shape
    if residual is not None:
        _check_like(residual, input, op, "residual", "input")
    if weight is not None:
        _check_param(weight, N, input, op, "weight")
    if bias is not None:
        _check_param(bias, N, input, op, "bias")
        if weight is not None and bias.dtype != weight.dtype:
            raise LlmfastTypeError(f"{op}: bias must have the dtype of weight ({weight.dtype}), got {bias.dtype}")

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

    dummy = input
    args = (
        input,
        residual if residual is not None else dummy,
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        out,
        residual_out if residual is not None else dummy,
        mean if not rms else rstd,
        rstd,
    )
    strides = (
        input.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        residual_out.stride(0) if residual is not None else 0,
    )
    flags = dict(HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, RMS=bool(rms))
    cfg = _fwd_config(N)
    with _on_device(input):
        if not cfg.looped:
            grid = (triton.cdiv(M, cfg.rows),)
            _norm_fwd_kernel[grid](*args, M, N, *strides, float(eps), **flags,
                                   BLOCK_N=cfg.block, ROWS=cfg.rows, num_warps=cfg.num_warps)
        else:
            _norm_fwd_looped_kernel[(M,)](*args, N, *strides, float(eps), **flags,
                                          CHUNK=cfg.block, num_warps=cfg.num_warps)
    return out, residual_out, mean, rstd


def norm_bwd(grad_out, grad_residual_out, normed_input, weight, mean, rstd, rms: bool,
             weight_grad: bool, bias_grad: bool):
    """Backward of norm_fwd. Returns (grad_input (M, N) input dtype, including
    grad_residual_out; grad_weight (N,) weight dtype if weight_grad else empty (0,);
    grad_bias (N,) weight dtype (input dtype without weight) if bias_grad else empty (0,))."""
    op = "llmfast.triton norm_bwd"
    _check_matrix(normed_input, op, "normed_input")
    M, N = normed_input.shape
    x = normed_input
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

    dev = x.device
    param_dtype = weight.dtype if weight is not None else x.dtype
    grad_input = torch.empty((M, N), dtype=x.dtype, device=dev)
    grad_weight = torch.empty((0,), dtype=param_dtype, device=dev)
    grad_bias = torch.empty((0,), dtype=param_dtype, device=dev)
    if M == 0 or N == 0:
        if weight_grad:
            grad_weight = torch.zeros((N,), dtype=param_dtype, device=dev)
        if bias_grad:
            grad_bias = torch.zeros((N,), dtype=param_dtype, device=dev)
        return grad_input, grad_weight, grad_bias

    dummy = x
    flags = dict(HAS_DRES=grad_residual_out is not None, HAS_W=weight is not None, RMS=bool(rms),
                 COMPUTE_DW=bool(weight_grad), COMPUTE_DB=bool(bias_grad))
    dres = grad_residual_out if grad_residual_out is not None else dummy
    w = weight if weight is not None else dummy
    mean_arg = mean if not rms else rstd
    strides = (grad_out.stride(0), dres.stride(0), x.stride(0), grad_input.stride(0))
    cfg = _bwd_config(N)
    sms = _num_sms(dev)
    with _on_device(x):
        if not cfg.looped:
            n_programs = max(1, min(triton.cdiv(M, cfg.rows), sms * cfg.programs_per_sm))
            dw_part, db_part = _workspaces(n_programs, N, weight_grad, bias_grad, dev)
            _norm_bwd_kernel[(n_programs,)](
                grad_out, dres, x, w, mean_arg, rstd, grad_input, dw_part, db_part,
                M, N, *strides, **flags, BLOCK_N=cfg.block, ROWS=cfg.rows, num_warps=cfg.num_warps)
        else:
            c1 = torch.empty((M,), dtype=torch.float32, device=dev)
            c2 = torch.empty((M,), dtype=torch.float32, device=dev)
            _norm_bwd_row_sums_kernel[(M,)](
                grad_out, x, w, mean_arg, rstd, c1, c2, N, grad_out.stride(0), x.stride(0),
                HAS_W=weight is not None, RMS=bool(rms), CHUNK=cfg.sums_chunk, num_warps=cfg.sums_warps)
            col_blocks = triton.cdiv(N, cfg.block)
            n_groups = max(1, min(triton.cdiv(M, cfg.rows), triton.cdiv(sms * cfg.programs_per_sm, col_blocks)))
            dw_part, db_part = _workspaces(n_groups, N, weight_grad, bias_grad, dev)
            _norm_bwd_cols_kernel[(col_blocks, n_groups)](
                grad_out, dres, x, w, mean_arg, rstd, c1, c2, grad_input, dw_part, db_part,
                M, N, *strides, **flags, BLOCK_C=cfg.block, ROWS=cfg.rows, num_warps=cfg.num_warps)

    if weight_grad:
        grad_weight = dw_part.sum(0).to(param_dtype)
    if bias_grad:
        grad_bias = db_part.sum(0).to(param_dtype)
    return grad_input, grad_weight, grad_bias


def _workspaces(n_programs, n, weight_grad, bias_grad, device):
    """fp32 (n_programs, n) partial-sum buffers for dW and dB (a 1-element dummy when unused).
    Each program writes its whole row, so torch.empty is enough."""
    def buf(needed):
        shape = (n_programs, n) if needed else (1,)
        return torch.empty(shape, dtype=torch.float32, device=device)

    return buf(weight_grad), buf(bias_grad)
