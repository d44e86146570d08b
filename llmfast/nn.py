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
    `weight` stays a buffer). Class-index targets only.

    Keyword-only `process_group` (a torch.distributed.ProcessGroup, default None) makes it the
    vocabulary-parallel loss: the input is this rank's slice of the classes, `weight` the full
    class weights (see llmfast.functional.cross_entropy). It is a plain attribute, not state."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, process_group=None):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.process_group = process_group

    def forward(self, input, target):
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               process_group=self.process_group)


class LinearCrossEntropyLoss(torch.nn.Module):
    """Fused output projection + cross-entropy: forward(input, weight, target, bias=None) is
    llmfast.functional.linear_cross_entropy. The module owns no parameters, only options, and
    takes the projection weight at call time, so it works with a tied embedding
    (loss_fn(h, model.embed.weight, target)). With `process_group` (keyword-only, default None)
    the weight passed at call time is this rank's slice of the vocabulary (see
    llmfast.functional.linear_cross_entropy)."""

    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None,
                 chunk_size=None, process_group=None):
        super().__init__()
        self.process_group = process_group
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size

    def forward(self, input, weight, target, bias=None):
        return F.linear_cross_entropy(input, weight, target, bias, ignore_index=self.ignore_index,
                                      reduction=self.reduction, label_smoothing=self.label_smoothing,
                                      z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size,
                                      process_group=self.process_group)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")
