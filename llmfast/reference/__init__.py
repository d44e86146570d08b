"""Plain-PyTorch implementations that define what every llmfast kernel must compute.

Tests, benchmarks and the `reference` backend all use these one definitions.
"""
from .attention import scaled_dot_product_attention
from .cross_entropy import cross_entropy, cross_entropy_probs, linear_cross_entropy
from .norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "cross_entropy", "cross_entropy_probs",
           "linear_cross_entropy",
           "scaled_dot_product_attention"]
