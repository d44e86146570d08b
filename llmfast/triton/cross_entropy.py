"""Triton kernels for cross-entropy with class-index targets: loss, logsumexp and the gradient
of the logits in one pass.

Same contract as the C++ ops in csrc/cross_entropy/cross_entropy_ops.cpp (cross_entropy_fwd,
cross_entropy_fwd_inplace, cross_entropy_scale_grad_), as plain Python functions;
llmfast/ops/cross_entropy.py wraps them as custom ops. The math is
llmfast/reference/cross_entropy.py; per non-ignored row with target t, logits x (soft-capped
first: x = cap * tanh(z / cap)), m = max(x), S = sum exp(x - m), lse = m + log S:

  loss = (1 - eps) w[t] ((m - x[t]) + log S) + eps/V (sum_c w[c] (lse - x[c])) + z w[t] lse^2
  dloss/dx_j = p_j (w[t](1 - eps) + eps/V sum(w) + 2 z w[t] lse) - w[t](1 - eps)[j == t] - eps/V w[j]
  dloss/dz_j = dloss/dx_j * (1 - tanh(z_j / cap)^2)          (with softcap)

with p_j = exp(x_j - m) / S; 'mean' multiplies the gradient by 1 / sum w[t] (read from device
memory: no host synchronisation). (m - x[t]) + log S instead of lse - x[t] keeps every digit
for logits of magnitude 1e4.

Algorithm and memory traffic (the op is memory bound):
- V up to _MAX_SINGLE_PASS_V: one program per row holds the whole row in registers: reads the
  logits once, writes the gradient once (2*M*V*elt bytes).
- Larger V: one program per row walks the row twice in chunks, an online max/sum pass and a
  gradient pass; the second read of the row mostly comes from L2 (the CUDA kernel in
  csrc/cross_entropy/ splits such rows over a thread-block cluster instead and reads them once).
- Ignored rows (target == ignore_index, or out of [0, V) on the GPU) are not read: their
  gradient row is written with zeros, their loss and lse are 0.
- The scale kernel reads and writes only rows whose upstream-gradient factor is not exactly 1.
Row offsets are 64-bit, so M*V may exceed 2^31.

Launches work on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before triton
was imported (Triton's interpreter, used by the CPU-only tests). On CPU tensors the targets are
range-checked on the host first, as the C++ CPU kernel does.
"""
import os

import torch
import triton
import triton.language as tl

from llmfast._errors import LlmfastIndexError, LlmfastTypeError, LlmfastValueError

from ._device import num_sms
from ._launch import fast_jit

__all__ = ["cross_entropy_fwd", "cross_entropy_fwd_inplace", "cross_entropy_scale_grad_"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Widest row (as next_power_of_2(V)) held in registers by one program: 32768 fp32 values over
# 1024 threads is 32 registers a thread for the row, about the most that avoids spills.
_MAX_SINGLE_PASS_V = 32768
# Chunk of the two-pass kernel (elements per loop step) and its warps.
_LOOP_CHUNK = 8192
_LOOP_WARPS = 16
# Columns per program of the scale kernel.
_SCALE_BLOCK = 4096


def _single_pass_warps(block_v: int) -> int:
    """Warps for a row of block_v elements in registers: about 32 fp32 values per thread from
    4096 up, at least 4 warps (short rows are cheap anyway)."""
    return max(4, min(32, block_v // 1024))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _softcap(z, cap, inv_cap):
    # cap * tanh(z / cap) from one exp: tanh(y) = sign(y) (1 - e^{-2|y|}) / (1 + e^{-2|y|}),
    # finite for every z (e^{-2|y|} is in [0, 1]); -inf maps to -cap.
    y = z * inv_cap
    e = tl.exp(-2.0 * tl.abs(y))
    th = (1.0 - e) / (1.0 + e)
    return cap * tl.where(y < 0, -th, th)


# Forward (+ gradient), one program per row. Traffic: reads the row once (twice when LOOPED,
# the second time mostly from L2), writes the gradient row once; ignored rows are not read.
@fast_jit
@triton.jit
def _ce_fwd_kernel(
    LOGITS,  # (M, V) contiguous
    TARGET,  # (M,) int64
    W,  # (V,) fp32 class weights, or a dummy when HAS_W is False
    W_SUM,  # (1,) fp32 sum of W (read only with weights and label smoothing)
    GRAD_SCALE,  # (1,) fp32 factor of every gradient row (1 / sum w[t] for 'mean')
    GRAD,  # (M, V) gradient (may be LOGITS itself), or a dummy when COMPUTE_GRAD is False
    LOSS,  # (M,) fp32 per-row loss
    LSE,  # (M,) fp32
    V,
    ignore_index,
    smoothing,
    z_loss,
    cap,
    HAS_W: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_CAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    LOOPED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = LOGITS + row * V
    g_row = GRAD + row * V
    offs = tl.arange(0, BLOCK)
    t = tl.load(TARGET + row)
    valid = (t != ignore_index) & (t >= 0) & (t < V)
    if HAS_CAP:
        inv_cap = 1.0 / cap
    else:
        inv_cap = 1.0

    if valid:
        if HAS_W:
            w_t = tl.load(W + t)
        else:
            w_t = 1.0
        x_t = tl.load(x_row + t).to(tl.float32)
        if HAS_CAP:
            x_t = _softcap(x_t, cap, inv_cap)

        if not LOOPED:
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            if HAS_CAP:
                # Masked lanes stay -inf (the cap would map them to -cap).
                x = tl.where(mask, _softcap(x, cap, inv_cap), float("-inf"))
            m = tl.max(x, axis=0)
            e = tl.exp(x - m)
            s = tl.sum(e, axis=0)
            if HAS_SMOOTHING:
                # sum_c w[c] (m - x[c]): exact terms, no cancellation against m.
                if HAS_W:
                    w = tl.load(W + offs, mask=mask, other=0.0)
                    sw = tl.sum(w * tl.where(mask, m - x, 0.0), axis=0)
                else:
                    sw = tl.sum(tl.where(mask, m - x, 0.0), axis=0)
        else:
            # Online max and sum over chunks; m_safe keeps exp() finite while m is still -inf.
            m = float("-inf")
            s = 0.0
            wx = 0.0  # sum_c w[c] x[c]
            for start in range(0, V, BLOCK):
                cols = start + offs
                mask = cols < V
                x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                if HAS_CAP:
                    x = tl.where(mask, _softcap(x, cap, inv_cap), float("-inf"))
                m_new = tl.maximum(m, tl.max(x, axis=0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
                m = m_new
                if HAS_SMOOTHING:
                    if HAS_W:
                        w = tl.load(W + cols, mask=mask, other=0.0)
                        wx += tl.sum(w * tl.where(mask, x, 0.0), axis=0)
                    else:
                        wx += tl.sum(tl.where(mask, x, 0.0), axis=0)

        log_s = tl.log(s)
        lse = m + log_s
        if HAS_SMOOTHING:
            if HAS_W:
                w_sum = tl.load(W_SUM)
            else:
                w_sum = V * 1.0
            if LOOPED:
                sw = w_sum * m - wx
            loss = (1.0 - smoothing) * w_t * ((m - x_t) + log_s) + (smoothing / V) * (sw + w_sum * log_s)
        else:
            loss = w_t * ((m - x_t) + log_s)
        if HAS_Z:
            loss += z_loss * w_t * lse * lse
        tl.store(LOSS + row, loss)
        tl.store(LSE + row, lse)

        if COMPUTE_GRAD:
            scale = tl.load(GRAD_SCALE)
            coef = w_t * (1.0 - smoothing)
            if HAS_SMOOTHING:
                coef += (smoothing / V) * w_sum
            if HAS_Z:
                coef += 2.0 * z_loss * w_t * lse
            coef_p = scale * coef / s
            coef_t = scale * w_t * (1.0 - smoothing)
            coef_w = scale * smoothing / V
            if not LOOPED:
                g = e * coef_p
                if HAS_SMOOTHING:
                    if HAS_W:
                        g -= coef_w * w
                    else:
                        g -= coef_w
                g = tl.where(offs == t, g - coef_t, g)
                if HAS_CAP:
                    th = tl.where(mask, x * inv_cap, 0.0)
                    g *= 1.0 - th * th
                tl.store(g_row + offs, g.to(GRAD.dtype.element_ty), mask=mask)
            else:
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    mask = cols < V
                    x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                    if HAS_CAP:
                        x = _softcap(x, cap, inv_cap)
                    g = tl.exp(x - m) * coef_p
                    if HAS_SMOOTHING:
                        if HAS_W:
                            g -= coef_w * tl.load(W + cols, mask=mask, other=0.0)
                        else:
                            g -= coef_w
                    g = tl.where(cols == t, g - coef_t, g)
                    if HAS_CAP:
                        th = tl.where(mask, x * inv_cap, 0.0)
                        g *= 1.0 - th * th
                    tl.store(g_row + cols, g.to(GRAD.dtype.element_ty), mask=mask)
    else:
        tl.store(LOSS + row, 0.0)
        tl.store(LSE + row, 0.0)
        if COMPUTE_GRAD:
            zeros = tl.zeros([BLOCK], dtype=GRAD.dtype.element_ty)
            for start in range(0, V, BLOCK):
                cols = start + offs
                tl.store(g_row + cols, zeros, mask=cols < V)


# sum over rows of w[t] for valid targets (the 'mean' denominator), one program.
# Traffic: reads the targets once.
@fast_jit
@triton.jit
def _ce_target_weight_kernel(
    TARGET,  # (M,) int64
    W,  # (V,) fp32 or dummy
    OUT,  # (1,) fp32: sum of w[t] over rows with a valid target
    M,
    V,
    ignore_index,
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, M, BLOCK):
        rows = start + offs
        t = tl.load(TARGET + rows, mask=rows < M, other=ignore_index)
        valid = (t != ignore_index) & (t >= 0) & (t < V)
        if HAS_W:
            acc += tl.load(W + t, mask=valid & (rows < M), other=0.0)
        else:
            acc += tl.where(valid & (rows < M), 1.0, 0.0)
    tl.store(OUT, tl.sum(acc, axis=0))


# grad[row, :] *= factor (factor = GO[0] or GO[row]), skipped when the factor is exactly 1.
# A bounded grid walks the (row, column block) tiles: the usual call, a plain loss.backward()
# whose upstream factor is the scalar 1, then costs each program one load (one program per tile
# left ~0.15 ms of empty programs at 8192 x 128256). Traffic: reads and writes the scaled rows.
@fast_jit
@triton.jit
def _ce_scale_grad_kernel(
    GRAD,  # (M, V)
    GO,  # (1,) or (M,) fp32
    V,
    n_col_blocks,
    n_tiles,  # M * n_col_blocks
    PER_ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    f0 = tl.load(GO)
    if PER_ROW or f0 != 1.0:
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            row = (tile // n_col_blocks).to(tl.int64)
            if PER_ROW:
                f = tl.load(GO + row)
            else:
                f = f0
            if f != 1.0:
                cols = (tile % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
                mask = cols < V
                ptr = GRAD + row * V + cols
                g = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
                tl.store(ptr, (g * f).to(GRAD.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
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


def _check_logits(t, op, name):
    if not isinstance(t, torch.Tensor):
        raise LlmfastTypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise LlmfastValueError(f"{op}: {name} must be 2-D (M, V), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise LlmfastTypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device.type != "cuda" and not _interpreting():
        raise LlmfastTypeError(
            f"{op}: {name} must be a CUDA tensor (or run with TRITON_INTERPRET=1), got {t.device}")
    if not t.is_contiguous():
        raise LlmfastValueError(f"{op}: {name} must be contiguous")


def _prepare(op, logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap):
    """Checks the arguments; returns (fp32 weight or None, W_SUM, GRAD_SCALE) device tensors."""
    _check_logits(logits, op, "logits")
    M, V = logits.shape
    dev = logits.device
    if V < 1:
        raise LlmfastValueError(f"{op}: logits must have at least one class (V >= 1), got V = {V}")
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64:
        raise LlmfastTypeError(f"{op}: target must be an int64 tensor, got "
                               f"{target.dtype if isinstance(target, torch.Tensor) else type(target).__name__}")
    if target.shape != (M,):
        raise LlmfastValueError(f"{op}: target must have shape ({M},), got {tuple(target.shape)}")
    if target.device != dev:
        raise LlmfastTypeError(f"{op}: target must be on {dev}, got {target.device}")
    if not target.is_contiguous():
        raise LlmfastValueError(f"{op}: target must be contiguous")
    if reduction not in (0, 1, 2):
        raise LlmfastValueError(f"{op}: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise LlmfastValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (z_loss >= 0.0 and z_loss != float("inf")):
        raise LlmfastValueError(f"{op}: z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None and not (0.0 < softcap < float("inf")):
        raise LlmfastValueError(f"{op}: softcap must be None or a finite number > 0, got {softcap}")
    w32 = None
    if weight is not None:
        if weight.shape != (V,):
            raise LlmfastValueError(f"{op}: weight must have shape ({V},), got {tuple(weight.shape)}")
        if not weight.dtype.is_floating_point:
            raise LlmfastTypeError(f"{op}: weight must be a floating-point tensor, got {weight.dtype}")
        if weight.device != dev:
            raise LlmfastTypeError(f"{op}: weight must be on {dev}, got {weight.device}")
        w32 = weight.to(torch.float32).contiguous()
    if dev.type == "cpu":
        # Host-side range check (free on the CPU); the GPU kernels treat such rows as ignored.
        bad = (target != ignore_index) & ((target < 0) | (target >= V))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise LlmfastIndexError(
                f"{op}: target[{i}] = {int(target[i])} is out of bounds: targets must be in [0, {V}) "
                f"or equal ignore_index ({ignore_index})")

    w_sum = w32.sum().reshape(1) if (w32 is not None and label_smoothing > 0) else None
    grad_scale = torch.ones((1,), dtype=torch.float32, device=dev)
    total_weight = None
    if reduction == 1:
        total_weight = torch.empty((1,), dtype=torch.float32, device=dev)
        with _on_device(logits):
            _ce_target_weight_kernel[(1,)](
                target, w32 if w32 is not None else total_weight, total_weight, M, V, ignore_index,
                HAS_W=w32 is not None, BLOCK=1024, num_warps=4)
        grad_scale = 1.0 / total_weight  # inf when every target is ignored; unused then
    return w32, w_sum, grad_scale, total_weight


def _run(logits, target, w32, w_sum, grad_scale, grad, ignore_index, label_smoothing, z_loss, softcap):
    M, V = logits.shape
    dev = logits.device
    loss_rows = torch.empty((M,), dtype=torch.float32, device=dev)
    lse = torch.empty((M,), dtype=torch.float32, device=dev)
    if M == 0:
        return loss_rows, lse
    block_v = triton.next_power_of_2(V)
    looped = block_v > _MAX_SINGLE_PASS_V
    block = _LOOP_CHUNK if looped else block_v
    num_warps = _LOOP_WARPS if looped else _single_pass_warps(block_v)
    dummy = loss_rows
    with _on_device(logits):
        _ce_fwd_kernel[(M,)](
            logits, target, w32 if w32 is not None else dummy, w_sum if w_sum is not None else dummy,
            grad_scale, grad if grad is not None else dummy, loss_rows, lse,
            V, ignore_index, float(label_smoothing), float(z_loss), float(softcap or 1.0),
            HAS_W=w32 is not None, HAS_SMOOTHING=label_smoothing > 0, HAS_Z=z_loss != 0,
            HAS_CAP=softcap is not None, COMPUTE_GRAD=grad is not None, LOOPED=looped,
            BLOCK=block, num_warps=num_warps)
    return loss_rows, lse


def _reduce(loss_rows, reduction, total_weight):
    if reduction == 0:
        return loss_rows
    total = loss_rows.sum()
    if reduction != 1:
        return total
    # 'mean' over a zero weight sum is NaN, as torch's (its NLL term is 0 / 0), also where label
    # smoothing or z_loss leave a non-zero sum: w / w is 1, or NaN for w = 0.
    w = total_weight[0]
    return total / w * (w / w)


def cross_entropy_fwd(logits, target, weight, reduction: int, ignore_index: int, label_smoothing: float,
                      z_loss: float, softcap, compute_grad: bool):
    """Cross-entropy forward (+ gradient). logits (M, V) contiguous float32/float16/bfloat16,
    target (M,) int64, weight (V,) or None. Returns (loss: () fp32 for mean/sum, (M,) for none;
    lse (M,) fp32; grad_logits (M, V) logits dtype if compute_grad else empty (0,))."""
    op = "llmfast.triton cross_entropy_fwd"
    w32, w_sum, grad_scale, total_weight = _prepare(
        op, logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap)
    grad = torch.empty_like(logits) if compute_grad else None
    loss_rows, lse = _run(logits, target, w32, w_sum, grad_scale, grad, ignore_index, label_smoothing,
                          z_loss, softcap)
    if grad is None:
        grad = logits.new_empty((0,))
    return _reduce(loss_rows, reduction, total_weight), lse, grad


def cross_entropy_fwd_inplace(logits, target, weight, reduction: int, ignore_index: int,
                              label_smoothing: float, z_loss: float, softcap):
    """As cross_entropy_fwd with compute_grad=True, the gradient written over logits.
    Returns (loss, lse)."""
    op = "llmfast.triton cross_entropy_fwd_inplace"
    w32, w_sum, grad_scale, total_weight = _prepare(
        op, logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap)
    loss_rows, lse = _run(logits, target, w32, w_sum, grad_scale, logits, ignore_index, label_smoothing,
                          z_loss, softcap)
    return _reduce(loss_rows, reduction, total_weight), lse


def cross_entropy_scale_grad_(grad_logits, grad_output):
    """grad_logits (M, V) *= grad_output (1 or M fp32 elements) row by row, in place; rows with
    factor exactly 1 are not touched."""
    op = "llmfast.triton cross_entropy_scale_grad_"
    _check_logits(grad_logits, op, "grad_logits")
    M, V = grad_logits.shape
    if grad_output.dtype != torch.float32:
        raise LlmfastTypeError(f"{op}: grad_output must be float32, got {grad_output.dtype}")
    if grad_output.numel() not in (1, M):
        raise LlmfastValueError(f"{op}: grad_output must have 1 or {M} elements, got {grad_output.numel()}")
    if grad_output.device != grad_logits.device:
        raise LlmfastTypeError(f"{op}: grad_output must be on {grad_logits.device}, got {grad_output.device}")
    if M == 0 or V == 0:
        return
    go = grad_output.contiguous()
    block = min(_SCALE_BLOCK, triton.next_power_of_2(V))
    n_col_blocks = triton.cdiv(V, block)
    n_tiles = M * n_col_blocks
    programs = min(n_tiles, 8 * num_sms(grad_logits.device))  # enough to fill the GPU, 8 a multiprocessor
    with _on_device(grad_logits):
        _ce_scale_grad_kernel[(programs,)](
            grad_logits, go, V, n_col_blocks, n_tiles, PER_ROW=grad_output.numel() == M and M != 1, BLOCK=block,
            num_warps=4)
