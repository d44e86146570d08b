"""Pieces shared by the models: the pre-/post-norm residual step on llmfast's fused
add + LayerNorm (with torch.autocast's mixed dtypes handled explicitly), and the language-model
loss on llmfast's fused linear + cross-entropy."""
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


def lm_loss(hidden, weight, target, bias=None, *, ignore_index):
    """Mean cross-entropy of hidden @ weight.T + bias against `target`, without materialising
    the logits (llmfast.functional.linear_cross_entropy, which follows torch.autocast itself:
    the projection in the autocast dtype, the loss in float32)."""
    return LF.linear_cross_entropy(hidden, weight, target, bias, ignore_index=ignore_index)
