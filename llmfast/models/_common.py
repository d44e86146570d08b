"""Pieces shared by the models: the pre-/post-norm residual step on llmfast's fused
add + LayerNorm, and the language-model loss on llmfast's fused linear + cross-entropy with
torch.autocast handled explicitly (llmfast's ops have no autocast rules)."""
import torch

from .. import functional as LF


def add_norm(norm, hidden, residual):
    """(norm(hidden + residual), hidden + residual) in one pass of llmfast.functional.add_layer_norm.

    `norm` is an llmfast.nn.LayerNorm (its weight, bias and eps are used). Under autocast the
    branch output `hidden` comes out of a linear layer in the autocast dtype while the residual
    stream keeps the embeddings' dtype (float32 for float32 parameters, as in torch's own autocast
    model); the fused op takes one dtype, so `hidden` is cast to the residual's first (a no-op
    when they already agree)."""
    return LF.add_layer_norm(hidden.to(residual.dtype), residual, norm.normalized_shape, norm.weight, norm.bias,
                             norm.eps)


def autocast_dtype(device):
    """The autocast dtype in force for `device`, or None when autocast is off there."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def lm_loss(hidden, weight, target, bias=None, *, ignore_index):
    """Mean cross-entropy of hidden @ weight.T + bias against `target`, without materialising
    the logits (llmfast.functional.linear_cross_entropy).

    Under torch.autocast the projection runs in the autocast dtype, as torch's linear would:
    hidden, weight and bias are cast explicitly and autocast is switched off around the fused
    op, whose chunked matmuls must see the dtypes they were given. The loss then comes back in
    the autocast dtype (llmfast returns the loss in its input's dtype; it is accumulated in
    float32 inside)."""
    dt = autocast_dtype(hidden.device)
    if dt is None:
        return LF.linear_cross_entropy(hidden, weight, target, bias, ignore_index=ignore_index)
    with torch.autocast(hidden.device.type, enabled=False):
        return LF.linear_cross_entropy(hidden.to(dt), weight.to(dt), target, bias.to(dt) if bias is not None else None,
                                       ignore_index=ignore_index)
