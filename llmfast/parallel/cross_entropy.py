"""Vocabulary-parallel cross-entropy for tensor-parallel training, on torch.distributed.

Contract (what llmfast.functional.cross_entropy / linear_cross_entropy do with
`process_group=pg`):

  * The ranks of `pg` split the vocabulary into contiguous slices, in rank order: rank r holds
    V_r classes (any V_r >= 0, uneven slices welcome) and owns the global classes
    [offset_r, offset_r + V_r), offset_r = V_0 + ... + V_{r-1}; V = V_0 + ... + V_{n-1}. The
    sizes come from an all_gather of each rank's V_r in every call (one tiny collective and one
    host synchronisation per forward, none in backward).
  * cross_entropy: `input` is the local logits slice, (N, V_r) / (V_r,) / (N, V_r, d1, ...).
    linear_cross_entropy: `weight` is the local slice of the projection rows (V_r, D), `bias`
    its slice (V_r,) or None; `input` (..., D) is the same on every rank (replicated hidden
    states, as in Megatron-style tensor parallelism).
  * target holds *global* class ids and is the same on every rank; class `weight` (cross_entropy
    only) is the full (V,) tensor, the same on every rank; every other option is the same on
    every rank. Targets equal to ignore_index are ignored; on the CPU a target outside [0, V)
    raises, on the GPU it is not checked (that would synchronise) and the token counts as ignored.
  * Every rank returns the same loss, equal to the unsplit computation (every reduction, class
    weights, label smoothing, z_loss, softcap). Backward needs no collective for cross_entropy:
    each rank gets the gradient of its logits slice. For linear_cross_entropy each rank gets the
    gradient of its weight (and bias) slice, and grad_input is all_reduced (SUM) over `pg`, so it
    is the full gradient on every rank (for replicated hidden states, do not all_reduce it again).
    All ranks must call backward (and must agree on whether input needs a gradient; that is
    checked).
  * Collectives run on input's device, so the backend of `pg` must support it (gloo for CPU
    tensors, NCCL for CUDA). They run in the order: all_gather (sizes), all_reduce MAX,
    all_reduce SUM in forward, and all_reduce SUM of grad_input in linear_cross_entropy's
    backward. Argument errors found by this module (class weight, token-count mismatch between
    ranks, target range) are raised on every rank together, so no rank is left waiting in a
    collective; errors found before it (llmfast.functional's generic checks) are raised by the
    rank that made them only.

Algorithm. Statistics are kept in fp32 (fp64 for fp64 input), per row, in a frame shifted by
the row's maximum so that nothing cancels catastrophically:
  local pass    m_r = max_c x_c, s_r = sum_c exp(x_c - m_r), the target logit x_t (if owned),
                and for label smoothing A_r = sum_c w_c (x_c - m_r); x = softcap(logits) first.
  all_reduce    m = MAX_r m_r;
  all_reduce    SUM_r of [s_r exp(m_r - m), x_t - m (owner only), A_r + W_r (m_r - m)]
                (one stacked (2 or 3, N) buffer), giving s, x_t - m and sum_c w_c (x_c - m).
  per token     lse = m + log s; loss = (1 - eps) w_t (lse - x_t) + eps/V (W lse - sum_c w_c x_c)
                + z_loss w_t lse^2 with W = sum_c w_c; reductions as llmfast.reference.
  backward      d loss/d x_c = g (p_c ((1 - eps) w_t + eps W / V + 2 z_loss w_t lse)
                - (1 - eps) w_t [c == t] - eps w_c / V), p_c = exp((x_c - m) - log s), times
                (1 - tanh^2) under softcap; computed locally from the saved global m and log s.

Memory. cross_entropy saves the logits (no copy) and the per-row statistics; backward
recomputes p from them (one more read of the logits) into a new gradient buffer, or with
inplace_backward=True over the logits buffer itself (in backward, not forward: the logits stay
valid until then; a second backward is refused). Local passes work in row chunks of about 2^24
elements, so the fp32 temporaries stay bounded (a few chunks). linear_cross_entropy never
materialises (N, V_r) logits: forward computes each chunk's logits (one matmul), keeps only the
per-row statistics, and backward recomputes them (a second matmul) before the two gradient
matmuls; extra memory is one chunk of logits plus its fp32 temporaries, an fp32 (V_r,) bias
gradient and, for 16-bit inputs, an fp32 copy of grad_input for the all_reduce.
"""
import math

import torch
import torch.distributed as dist

from .. import _checks
from .._errors import LlmfastIndexError, LlmfastTypeError, LlmfastValueError
from ..ops import _create_graph
from ..ops.cross_entropy import default_chunk_rows

__all__ = [
    "VocabParallelCrossEntropyFunction",
    "VocabParallelLinearCrossEntropyFunction",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]

_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
_CHUNK_ELEMENTS = 1 << 24  # fp32 temporaries of the local passes: 64 MiB each


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(n_rows, n_cols):
    return max(1, min(max(n_rows, 1), _CHUNK_ELEMENTS // max(n_cols, 1)))


# --- argument checks and layout -----------------------------------------------------------------
def check_process_group(fn, process_group):
    if not dist.is_available():
        raise LlmfastValueError(f"{fn}: process_group needs torch.distributed, which this build of torch lacks")
    if not isinstance(process_group, dist.ProcessGroup):
        raise LlmfastTypeError(
            f"{fn}: process_group must be None or a torch.distributed.ProcessGroup this rank belongs to "
            f"(e.g. torch.distributed.group.WORLD or one from torch.distributed.new_group), got "
            f"{type(process_group).__name__} {process_group!r}")
    if not dist.is_initialized():
        raise LlmfastValueError(f"{fn}: process_group given, but torch.distributed is not initialized "
                                f"(call torch.distributed.init_process_group first)")


def _layout(fn, group, device, n_local, rows, needs_input_grad, local_error):
    """all_gather of (V_r, rows, needs_input_grad, error flag) over `group`. Raises the same kind
    of error on every rank when any rank reported a local error or the ranks disagree; returns
    (offset of this rank's slice, V)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    mine = torch.tensor([n_local, rows, int(needs_input_grad), int(local_error is not None)],
                        dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts).tolist()  # the one host synchronisation of a call
    if local_error is not None:
        raise local_error
    bad = [r for r, row in enumerate(table) if row[3]]
    if bad:
        raise LlmfastValueError(f"{fn}: rank(s) {bad} of process_group got invalid arguments (see the error "
                                f"raised there); every rank stops")
    row_counts = [row[1] for row in table]
    if len(set(row_counts)) != 1:
        raise LlmfastValueError(
            f"{fn}: every rank of process_group must pass the same tokens (target is the same on every rank), "
            f"but the ranks have {row_counts} tokens")
    grad_flags = [bool(row[2]) for row in table]
    if len(set(grad_flags)) != 1:
        raise LlmfastValueError(
            f"{fn}: input must need a gradient on every rank of process_group or on none (backward "
            f"all_reduces grad_input), got requires_grad {grad_flags} by rank")
    sizes = [row[0] for row in table]
    vocab = sum(sizes)
    if vocab < 1:
        raise LlmfastValueError(f"{fn}: the vocabulary slices of process_group hold no class at all "
                                f"(sizes {sizes} by rank)")
    return sum(sizes[:rank]), vocab


def _check_target_range(fn, target, vocab, ignore_index):
    """On the CPU only (elsewhere it would synchronise): every target is in [0, V) or ignored."""
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bad.any():
        value = target[bad][0].item()
        raise LlmfastIndexError(
            f"{fn}: target {value} is out of bounds: targets must be global class ids in [0, {vocab}) (the "
            f"vocabulary of all ranks of process_group) or equal ignore_index ({ignore_index})")


# --- the shared math ----------------------------------------------------------------------------
class _Rows:
    """Per-row quantities that do not depend on the logits: validity, ownership, w[t]."""

    def __init__(self, target, class_weight, offset, n_local, vocab, ignore_index, acc):
        valid = (target != ignore_index) & (target >= 0) & (target < vocab)
        self.valid = valid
        self.owned = valid & (target >= offset) & (target < offset + n_local)
        self.local_t = (target - offset).clamp(0, max(n_local - 1, 0))
        if class_weight is not None:
            w = class_weight.to(acc)
            self.w_t = torch.where(valid, w[torch.where(valid, target, 0)], 0)
            self.w_local = w[offset:offset + n_local]
            self.w_total = w.sum()
            self.w_local_total = self.w_local.sum()
        else:
            self.w_t = valid.to(acc)
            self.w_local = None
            self.w_total = float(vocab)
            self.w_local_total = float(n_local)


def _softcapped(x, softcap, acc):
    """x in acc dtype with softcap applied, and whether it is a fresh buffer (safe to overwrite)."""
    y = x.to(acc)
    fresh = y is not x
    if softcap is not None:
        y = torch.tanh(y / softcap).mul_(softcap)
        fresh = True
    return y, fresh


def _local_stats(x, fresh, local_t, w_local, smoothing):
    """One chunk's local pass over softcapped (rows, V_r) logits: (m_r, s_r, A_r or None, x_t);
    see the module docstring. Overwrites x when `fresh`."""
    rows, n_local = x.shape
    if n_local == 0:
        zeros = x.new_zeros(rows)
        return torch.full_like(zeros, -math.inf), zeros, (zeros if smoothing else None), zeros
    m = x.amax(-1)
    m_safe = torch.where(torch.isfinite(m), m, 0)
    x_t = x.gather(1, local_t[:, None]).squeeze(1)
    d = x.sub_(m_safe[:, None]) if fresh else x - m_safe[:, None]
    a = None
    if smoothing:
        a = torch.mv(d, w_local) if w_local is not None else d.sum(-1)
    s = d.exp_().sum(-1)
    return m, s, a, x_t


def _concat(pieces, like, acc, smoothing):
    """The chunks' (m_r, s_r, A_r, x_t) joined along the rows."""
    if not pieces:
        empty = like.new_empty(0, dtype=acc)
        return empty, empty, (empty if smoothing else None), empty
    return tuple(torch.cat(p) if p[0] is not None else None for p in zip(*pieces))


def _global_loss(group, stats, rows, vocab, reduction, label_smoothing, z_loss):
    """Combines the local statistics over `group`; returns (loss, (m, log s) with lse = m + log s
    kept apart for backward (x - m is exact, x - lse would round lse first), 'mean' denominator)."""
    m_r, s_r, a_r, x_t = stats
    m = m_r.clone()
    if m.numel():
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    ms_r = torch.where(torch.isfinite(m_r), m_r, 0)
    ms = torch.where(torch.isfinite(m), m, 0)
    # a rank whose logits of a row are all -inf (or that holds no class) contributes s_r = 0
    parts = [torch.where(m_r != -math.inf, s_r * torch.exp(ms_r - ms), 0),
             torch.where(rows.owned, x_t - ms, 0)]
    if a_r is not None:
        parts.append(a_r + rows.w_local_total * (ms_r - ms))
    summed = torch.stack(parts)
    if summed.numel():
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    log_s = summed[0].log()
    lse = ms + log_s
    w_t = rows.w_t
    per_token = w_t * (log_s - summed[1])
    if label_smoothing > 0:
        smooth = rows.w_total * log_s - summed[2]
        per_token = (1 - label_smoothing) * per_token + (label_smoothing / vocab) * smooth
    if z_loss != 0:
        per_token = per_token + z_loss * w_t * lse.square()
    per_token = torch.where(rows.valid, per_token, 0)
    if reduction == 0:
        return per_token, (ms, log_s), None
    if reduction == 2:
        return per_token.sum(), (ms, log_s), None
    denom = w_t.sum()
    # NaN for a zero weight sum, as torch's (denom / denom is 1 otherwise)
    return per_token.sum() / denom * (denom / denom), (ms, log_s), denom


def _row_factor(grad_loss, reduction, denom, valid, acc):
    """d total / d per_token_i for each row (0 for ignored rows)."""
    g = grad_loss.to(acc)
    if reduction == 1:
        g = g / denom
    return torch.where(valid, g.expand(valid.shape), 0)


def _grad_chunk(raw, m, log_s, g, rows_sl, rows, vocab, label_smoothing, z_loss, softcap, acc):
    """Gradient of the loss w.r.t. one chunk of raw local logits (rows, V_r), in acc dtype; m and
    log_s: the chunk's rows of the global statistics (lse = m + log_s)."""
    y = raw.to(acc)
    fresh = y is not raw
    th = None
    if softcap is not None:
        th = torch.tanh(y / softcap)
        y = th * softcap
        fresh = True
    w_t = rows.w_t[rows_sl]
    # rows whose logits are all -inf have log s = -inf; their p is 0 either way
    log_s = torch.where(torch.isfinite(log_s), log_s, 0)
    p = y.sub_(m[:, None]) if fresh else y - m[:, None]
    p.sub_(log_s[:, None]).exp_()
    eps = label_smoothing
    coef = g * ((1 - eps) * w_t + (eps / vocab) * rows.w_total + 2 * z_loss * w_t * (m + log_s))
    grad = p.mul_(coef[:, None])
    if eps > 0:
        if rows.w_local is not None:
            grad.addr_(g, rows.w_local, alpha=-eps / vocab)
        else:
            grad.sub_((g * (eps / vocab))[:, None])
    on_target = torch.where(rows.owned[rows_sl], -(1 - eps) * g * w_t, 0)
    grad.scatter_add_(1, rows.local_t[rows_sl, None], on_target[:, None])
    if th is not None:
        grad.mul_(th.mul_(th).neg_().add_(1))
    return grad


# --- autograd functions -------------------------------------------------------------------------
_TWICE = ("llmfast vocab-parallel cross_entropy: backward ran twice through the same graph with "
          "inplace_backward=True; the first one overwrote the saved logits")


def _refuse_create_graph():
    if _create_graph.wants_graph():
        raise NotImplementedError(
            "llmfast vocabulary-parallel cross_entropy: a backward with create_graph=True (double backward) is not "
            "supported")


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Loss of local logits (M, V_r) (any strides) with int64 targets (M,) of global class ids;
    see the module docstring. Returns the loss in acc dtype: (M,) for reduction 0 ('none'),
    () for 1 ('mean') and 2 ('sum')."""

    @staticmethod
    def forward(ctx, logits, target, class_weight, group, offset, vocab, reduction, ignore_index,
                label_smoothing, z_loss, softcap, inplace_backward):
        acc = _acc_dtype(logits.dtype)
        M, n_local = logits.shape
        rows = _Rows(target, class_weight, offset, n_local, vocab, ignore_index, acc)
        chunk = _chunk_rows(M, n_local)
        pieces = []
        for start in range(0, M, chunk):
            sl = slice(start, start + chunk)
            x, fresh = _softcapped(logits[sl], softcap, acc)
            pieces.append(_local_stats(x, fresh, rows.local_t[sl], rows.w_local, label_smoothing > 0))
        stats = _concat(pieces, logits, acc, label_smoothing > 0)
        loss, stats, denom = _global_loss(group, stats, rows, vocab, reduction, label_smoothing, z_loss)
        ctx.save_for_backward(logits, *stats)
        ctx.rows = rows
        ctx.opts = (vocab, reduction, label_smoothing, z_loss, softcap, chunk)
        ctx.denom = denom
        ctx.inplace = inplace_backward
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _refuse_create_graph()
        if ctx.inplace and ctx.backward_done:
            raise RuntimeError(_TWICE)
        ctx.backward_done = True
        logits, m, log_s = ctx.saved_tensors
        vocab, reduction, label_smoothing, z_loss, softcap, chunk = ctx.opts
        rows = ctx.rows
        acc = _acc_dtype(logits.dtype)
        g = _row_factor(grad_loss, reduction, ctx.denom, rows.valid, acc)
        if ctx.inplace:
            out = logits
            torch.autograd.graph.increment_version(logits)  # nodes that saved the logits must notice
        else:
            out = torch.empty_like(logits, memory_format=torch.contiguous_format)
        if logits.shape[1]:
            for start in range(0, logits.shape[0], chunk):
                sl = slice(start, start + chunk)
                out[sl] = _grad_chunk(logits[sl], m[sl], log_s[sl], g[sl], sl, rows, vocab, label_smoothing,
                                      z_loss, softcap, acc)
        return out, None, None, None, None, None, None, None, None, None, None, None


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """Loss of (input @ weight.T + bias) for input (M, D), the local projection rows weight
    (V_r, D), bias (V_r,) or None, int64 targets (M,) of global class ids; see the module
    docstring. Works in chunks of `chunk` rows; returns the loss in acc dtype."""

    @staticmethod
    def forward(ctx, input, weight, target, bias, group, offset, vocab, reduction, ignore_index,
                label_smoothing, z_loss, softcap, chunk):
        acc = _acc_dtype(input.dtype)
        M = input.shape[0]
        n_local = weight.shape[0]
        rows = _Rows(target, None, offset, n_local, vocab, ignore_index, acc)
        pieces = []
        for start in range(0, M, chunk):
            sl = slice(start, start + chunk)
            logits = _linear(input[sl], weight, bias)
            x, fresh = _softcapped(logits, softcap, acc)
            pieces.append(_local_stats(x, True, rows.local_t[sl], None, label_smoothing > 0))
            del logits, x
        stats = _concat(pieces, input, acc, label_smoothing > 0)
        loss, stats, denom = _global_loss(group, stats, rows, vocab, reduction, label_smoothing, z_loss)
        ctx.save_for_backward(input, weight, bias, *stats)
        ctx.group = group
        ctx.rows = rows
        ctx.opts = (vocab, reduction, label_smoothing, z_loss, softcap, chunk)
        ctx.denom = denom
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _refuse_create_graph()
        input, weight, bias, m, log_s = ctx.saved_tensors
        vocab, reduction, label_smoothing, z_loss, softcap, chunk = ctx.opts
        rows = ctx.rows
        acc = _acc_dtype(input.dtype)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[3]
        g = _row_factor(grad_loss, reduction, ctx.denom, rows.valid, acc)
        grad_x = torch.zeros_like(input) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        if weight.shape[0] and (need_x or need_w or need_b):
            for start in range(0, input.shape[0], chunk):
                sl = slice(start, start + chunk)
                x_c = input[sl]
                logits = _linear(x_c, weight, bias)
                gl = _grad_chunk(logits, m[sl], log_s[sl], g[sl], sl, rows, vocab, label_smoothing, z_loss,
                                 softcap, acc)
                del logits
                if need_b:
                    grad_b += gl.sum(0)
                gl = gl.to(input.dtype)
                if need_x:
                    torch.mm(gl, weight, out=grad_x[sl])
                if need_w:
                    grad_w.addmm_(gl.t(), x_c)
                del gl
        if need_x:
            # every rank holds the contribution of its classes; sum them (in fp32 for 16-bit dtypes)
            if grad_x.dtype in (torch.float16, torch.bfloat16):
                full = grad_x.float()
                dist.all_reduce(full, op=dist.ReduceOp.SUM, group=ctx.group)
                grad_x.copy_(full)
            else:
                dist.all_reduce(grad_x, op=dist.ReduceOp.SUM, group=ctx.group)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return (grad_x, grad_w, None, grad_b, None, None, None, None, None, None, None, None, None)


def _linear(x, weight, bias):
    return torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())


# --- entry points (arguments already checked by llmfast.functional) -------------------------------
def vocab_parallel_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                                 softcap, inplace_backward, process_group):
    """llmfast.functional.cross_entropy(..., process_group=pg) after its generic argument checks
    (input/target dtypes and shapes, option values): `input` is this rank's logits slice, `weight`
    the full (V,) class weights or None. See the module docstring for the contract."""
    fn = "cross_entropy"
    check_process_group(fn, process_group)
    n_local = input.shape[1] if input.dim() >= 2 else input.shape[0]
    local_error = None
    if weight is not None:
        try:
            _checks.floating(fn, "weight", weight)
            _checks.same_device(fn, "weight", weight, "input", input)
            if weight.dim() != 1:
                raise LlmfastValueError(f"{fn}: weight must be the full (V,) class weights (the same on every "
                                        f"rank of process_group), got shape {tuple(weight.shape)}")
        except (LlmfastTypeError, LlmfastValueError) as e:
            local_error = e
    if input.dim() == 1:
        x2d, t1d = input.reshape(1, n_local), target.reshape(1)
    elif input.dim() == 2:
        x2d, t1d = input, target
    else:
        x2d, t1d = input.movedim(1, -1).reshape(-1, n_local), target.reshape(-1)
    needs_grad = torch.is_grad_enabled() and input.requires_grad
    offset, vocab = _layout(fn, process_group, input.device, n_local, t1d.shape[0], False, local_error)
    if weight is not None and weight.shape[0] != vocab:
        raise LlmfastValueError(
            f"{fn}: weight must have shape ({vocab},): the full class weights of the whole vocabulary (the sum "
            f"of the slices of process_group), the same on every rank; got {tuple(weight.shape)}")
    t1d = t1d.to(torch.int64)
    _check_target_range(fn, t1d, vocab, ignore_index)
    # as for the single-device kernels: the gradient goes over the caller's own (N, C) buffer only
    inplace = inplace_backward and needs_grad and input.dim() == 2 and input.is_contiguous()
    loss = VocabParallelCrossEntropyFunction.apply(
        x2d, t1d, weight, process_group, offset, vocab, _REDUCTION_CODES[reduction], ignore_index,
        label_smoothing, z_loss, softcap, inplace)
    if reduction == "none":
        loss = loss.view(target.shape)
    return loss.to(input.dtype)


def vocab_parallel_linear_cross_entropy(input, weight, target, bias, ignore_index, reduction, label_smoothing,
                                        z_loss, softcap, chunk_size, process_group):
    """llmfast.functional.linear_cross_entropy(..., process_group=pg) after its argument checks:
    `weight` (V_r, D) and `bias` (V_r,) are this rank's slices. See the module docstring."""
    fn = "linear_cross_entropy"
    check_process_group(fn, process_group)
    D = input.shape[-1]
    x2d = input.reshape(-1, D).contiguous()
    t1d = target.reshape(-1).to(torch.int64)
    needs_grad = torch.is_grad_enabled() and input.requires_grad
    offset, vocab = _layout(fn, process_group, input.device, weight.shape[0], x2d.shape[0], needs_grad, None)
    _check_target_range(fn, t1d, vocab, ignore_index)
    chunk = chunk_size or default_chunk_rows(x2d.shape[0], weight.shape[0], input.element_size())
    loss = VocabParallelLinearCrossEntropyFunction.apply(
        x2d, weight, t1d, bias, process_group, offset, vocab, _REDUCTION_CODES[reduction], ignore_index,
        label_smoothing, z_loss, softcap, chunk)
    if reduction == "none":
        loss = loss.view(target.shape)
    return loss.to(input.dtype)
