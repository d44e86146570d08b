"""Drop-in modules: each subclasses the torch module it replaces (same constructor, defaults,
parameters and state_dict) and only swaps the forward for llmfast's kernels."""
import torch

from . import functional as F

__all__ = ["LayerNorm", "RMSNorm", "CrossEntropyLoss", "LinearCrossEntropyLoss"]


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm running llmfast's fused kernels."""

    def forward(self, input):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm running llmfast's fused kernels."""

    def forward(self, input):
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss running llmfast's fused kernels (same constructor and defaults;
    `weight` stays a buffer). Class-index targets only."""

    def forward(self, input, target):
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


class LinearCrossEntropyLoss(torch.nn.Module):
    """Fused output projection + cross-entropy: forward(input, weight, target, bias=None) is
    llmfast.functional.linear_cross_entropy. The module owns no parameters, only options, and
    takes the projection weight at call time, so it works with a tied embedding
    (loss_fn(h, model.embed.weight, target))."""

    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None,
                 chunk_size=None):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size

    def forward(self, input, weight, target, bias=None):
        return F.linear_cross_entropy(input, weight, target, bias, ignore_index=self.ignore_index,
                                      reduction=self.reduction, label_smoothing=self.label_smoothing,
                                      z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")
