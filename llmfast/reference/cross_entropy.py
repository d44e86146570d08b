"""Reference cross-entropy over class-index targets, in plain PyTorch.

`cross_entropy` has the semantics of torch.nn.functional.cross_entropy for logits of shape
(C,), (N, C) or (N, C, d1, ...) and integer class targets, plus two extras used by LLM
training:

  softcap  logits are replaced by softcap * tanh(logits / softcap) before anything else
           (Gemma-2 style logit soft-capping);
  z_loss   each non-ignored token adds z_loss * logsumexp(logits)^2 to its loss (PaLM's
           auxiliary z-loss). The term is weighted by the token's target-class weight, exactly
           like its negative log-likelihood, so the 'mean' reduction (which divides by the sum
           of the target weights) stays a weighted mean. Without class weights that is the plain
           mean of z_loss * lse^2 over non-ignored tokens. (Liger-Kernel leaves its z-loss
           unweighted; the two agree whenever no class weights are given.)

Per token i with target t, class weights w (ones if None), C classes, smoothing eps and
lse = logsumexp(x_i):

  loss_i = (1 - eps) * w[t] * (lse - x_i[t])
         + eps / C * sum_c w[c] * (lse - x_i[c])
         + z_loss * w[t] * lse^2

and loss_i = 0 for tokens whose target equals ignore_index. Reductions as torch: 'none'
(per-token, shaped like target), 'sum', 'mean' = sum / sum_{non-ignored i} w[t_i] (NaN when
every target is ignored, as in torch).

Computed in float32 (float64 for float64 input), returned in the input's dtype. Targets out of
[0, C) that are not ignore_index raise IndexError on the CPU (as torch's nll_loss).
"""
import torch
from torch._subclasses.fake_tensor import is_fake as _is_fake

_REDUCTIONS = ("none", "mean", "sum")


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _values_readable(t):
    """Whether the target's values can be read on the host for the range check: a real CPU
    tensor outside torch.compile, torch.func transforms (vmap, grad) and fake-tensor tracing.
    Elsewhere an out-of-range target fails in the gather instead."""
    return (t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active() and not _is_fake(t))


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, *, z_loss=0.0, softcap=None):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    acc = _acc_dtype(input.dtype)
    x = input.to(acc)
    if softcap is not None and softcap != 0:  # 0 = off, as None (FlashAttention's default)
        x = softcap * torch.tanh(x / softcap)

    # Class dimension last, tokens flattened: (M, C) logits, (M,) targets.
    n_classes = x.shape[1] if x.dim() >= 2 else x.shape[0]
    x2 = (x.movedim(1, -1) if x.dim() >= 2 else x).reshape(-1, n_classes)
    t = target.reshape(-1).long()

    lse = torch.logsumexp(x2, dim=-1)
    logp = torch.log_softmax(x2, dim=-1)  # (not x2 - lse: a +inf logit makes the row NaN, as in torch)
    valid = t != ignore_index
    if _values_readable(t):
        bad = valid & ((t < 0) | (t >= n_classes))
        if bool(bad.any()):  # IndexError, as torch's nll_loss on the CPU
            raise IndexError(f"cross_entropy: target {int(t[bad][0])} is out of bounds: targets must be in "
                             f"[0, {n_classes}) or equal ignore_index ({ignore_index})")
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    zero = torch.zeros((), dtype=acc, device=x.device)

    if weight is not None:
        w = weight.to(acc)
        w_t = torch.where(valid, w[t_safe], zero)
    else:
        w = None
        w_t = valid.to(acc)

    logp_t = logp.gather(1, t_safe[:, None]).squeeze(1)
    per_token = torch.where(valid, -logp_t * w_t, zero)
    if label_smoothing > 0:
        smooth = -(logp * w).sum(-1) if w is not None else -logp.sum(-1)
        per_token = (1 - label_smoothing) * per_token + torch.where(valid, smooth, zero) * (label_smoothing / n_classes)
    if z_loss != 0:
        per_token = per_token + torch.where(valid, z_loss * w_t * lse.square(), zero)

    if reduction == "none":
        out = per_token.reshape(target.shape)
    elif reduction == "sum":
        out = per_token.sum()
    else:
        denom = w_t.sum()
        # NaN for a zero weight sum (denom / denom), as torch's, whose NLL term is then 0 / 0,
        # also where label smoothing or z_loss leave a non-zero sum
        out = per_token.sum() / denom * (denom / denom)
    return out.to(input.dtype)


def cross_entropy_probs(input, target, weight=None, reduction="mean", label_smoothing=0.0, *, z_loss=0.0,
                        softcap=None):
    """Cross-entropy against class-probability targets (torch's semantics for a floating target
    shaped like the input): with p = the target smoothed as (1 - eps) p + eps / C,
    loss_i = -sum_c w[c] p_ic log_softmax(x_i)_c + z_loss * logsumexp(x_i)^2, 'mean' dividing
    by the number of tokens (not by weights, as torch). softcap as in cross_entropy."""
    acc = _acc_dtype(input.dtype)
    dim = 1 if input.dim() >= 2 else 0
    x = input.to(acc)
    if softcap is not None and softcap != 0:  # 0 = off, as None (FlashAttention's default)
        x = softcap * torch.tanh(x / softcap)
    lse = torch.logsumexp(x, dim=dim, keepdim=True)
    logp = x - lse
    p = target.to(acc)
    if label_smoothing > 0:
        p = p * (1 - label_smoothing) + label_smoothing / input.shape[dim]
    if weight is not None:
        shape = [1] * input.dim()
        shape[dim] = -1
        p = p * weight.to(acc).view(shape)
    loss = -(p * logp).sum(dim)
    if z_loss:
        loss = loss + z_loss * lse.squeeze(dim).square()
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / loss.numel()  # NaN for no token, as torch
    # torch's result type: input's and target's dtypes promoted (bfloat16 logits against float32
    # probabilities give a float32 loss)
    return loss.to(torch.promote_types(input.dtype, target.dtype))


def linear_arguments(fn, linear_weight, weight, bias, linear_bias):
    """Sorts out linear_cross_entropy's two calling conventions; returns (projection, class
    weights or None, bias or None).

    torch >= 2.14: linear_cross_entropy(input, linear_weight, target, *, linear_bias=None,
    weight=None, ...), `weight` being the class weights. llmfast's original form:
    linear_cross_entropy(input, weight, target, bias=None, ...), `weight` the projection (the
    second parameter, by position or, when linear_weight is not given, by the keyword)."""
    if linear_weight is None:
        if weight is None:
            raise TypeError(f"{fn}: missing the projection weight (linear_weight, the second argument: (V, D))")
        linear_weight, weight = weight, None
    if bias is not None and linear_bias is not None:
        raise TypeError(f"{fn}: got both bias and linear_bias (the same thing: pass one)")
    return linear_weight, weight, (bias if bias is not None else linear_bias)


def linear_cross_entropy(input, linear_weight=None, target=None, bias=None, *, linear_bias=None, weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                         out_dtype=None):
    """cross_entropy(input @ linear_weight.T + bias, target, weight, ...) over the last dimension of
    `input` (..., D), with `linear_weight` (V, D) the output projection and `weight` (V,) optional
    class weights (both calling conventions of llmfast.functional.linear_cross_entropy: see
    linear_arguments); target has input's leading shape. The logits are computed in float32
    (float64 for float64 input) and not rounded to the input dtype. The loss is returned in
    `out_dtype` (default: input's dtype)."""
    linear_weight, weight, bias = linear_arguments("linear_cross_entropy", linear_weight, weight, bias, linear_bias)
    if ignore_index is None:
        ignore_index = -100  # torch's default for class indices
    acc = _acc_dtype(input.dtype)
    logits = torch.nn.functional.linear(input.to(acc), linear_weight.to(acc), bias.to(acc) if bias is not None else None)
    logits = logits.reshape(-1, linear_weight.shape[0])
    loss = cross_entropy(logits, target.reshape(-1), weight, ignore_index, reduction, label_smoothing,
                         z_loss=z_loss, softcap=softcap)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss.to(out_dtype or input.dtype)
