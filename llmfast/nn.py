"""Drop-in modules: each subclasses the torch module it replaces (same constructor, defaults,
parameters and state_dict) and only swaps the forward for llmfast's kernels."""
import torch

from . import functional as F

__all__ = ["LayerNorm", "RMSNorm"]


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm running llmfast's fused kernels."""

    def forward(self, input):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm running llmfast's fused kernels."""

    def forward(self, input):
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)
