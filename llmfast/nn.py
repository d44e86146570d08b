"""Drop-in modules: each subclasses the torch module it replaces (same constructor, defaults,
parameters and state_dict) and only swaps the forward for llmfast's kernels.

Under torch.jit.script the modules run torch's own implementation (TorchScript compiles only
the `torch.jit.is_scripting()` branch of each forward; llmfast's Python dispatch is not
TorchScript), so scripted models keep working after the swap; torch.jit.trace and
torch.compile record llmfast's kernels."""
import math
from typing import Optional

import torch
from torch import Tensor

from . import _checks
from . import functional as F
from ._errors import LlmfastTypeError, LlmfastValueError

__all__ = ["LayerNorm", "RMSNorm", "CrossEntropyLoss", "LinearCrossEntropyLoss", "MultiheadAttention",
           "CausalSelfAttention"]


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm running llmfast's fused kernels."""

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return torch.nn.functional.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm running llmfast's fused kernels."""

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return torch.nn.functional.rms_norm(input, self.normalized_shape, self.weight, self.eps)
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss running llmfast's fused kernels (same constructor and defaults;
    `weight` stays a buffer); class-probability targets go through plain PyTorch.

    Keyword-only extras, plain attributes (not state), as llmfast.functional.cross_entropy's:
    `z_loss`, `softcap`, `inplace_backward`, and `process_group` (a
    torch.distributed.ProcessGroup, default None), which makes it the vocabulary-parallel loss:
    the input is this rank's slice of the classes, `weight` the full class weights."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, z_loss=0.0, softcap=None, inplace_backward=False, process_group=None):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.process_group = process_group

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return torch.nn.functional.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                                     reduction=self.reduction, label_smoothing=self.label_smoothing)
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                               softcap=self.softcap, inplace_backward=self.inplace_backward,
                               process_group=self.process_group)


_TorchLinearCrossEntropyLoss = getattr(torch.nn, "LinearCrossEntropyLoss", None)  # torch >= 2.14


def _is_torch_form(args, kwargs):
    """LinearCrossEntropyLoss(in_features, num_classes, ...) (torch's form), rather than
    llmfast's LinearCrossEntropyLoss(ignore_index=-100, reduction='mean', ...)."""
    if "in_features" in kwargs or "num_classes" in kwargs:
        return True
    return len(args) >= 2 and isinstance(args[1], int) and not isinstance(args[1], bool)


class LinearCrossEntropyLoss(_TorchLinearCrossEntropyLoss or torch.nn.Module):
    """Fused output projection + cross-entropy (llmfast.functional.linear_cross_entropy), in
    either of two forms:

    - llmfast's, LinearCrossEntropyLoss(ignore_index=-100, reduction='mean', label_smoothing=0.0,
      *, z_loss=0.0, softcap=None, chunk_size=None, process_group=None): owns no parameters,
      only options, and takes the projection at call time, loss_fn(input, weight, target,
      bias=None), so it works with a tied embedding (loss_fn(h, model.embed.weight, target)).
      With `process_group` the weight passed at call time is this rank's slice of the
      vocabulary (see llmfast.functional.linear_cross_entropy).
    - torch >= 2.14's, LinearCrossEntropyLoss(in_features, num_classes, *, out_features=(),
      bias=False, device=None, dtype=None, reduction='mean', weight=None, ignore_index=None,
      label_smoothing=0.0, options=None) (plus z_loss, softcap, chunk_size): owns its projection
      `linear` (and class weights `weight`), with torch's parameters and state_dict;
      loss_fn(input, target).

    Either form is an instance of torch.nn.LinearCrossEntropyLoss where torch has it."""

    def __init__(self, *args, **kwargs):
        if _is_torch_form(args, kwargs):
            self._init_owning(*args, **kwargs)
        else:
            self._init_options(*args, **kwargs)

    def _init_options(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None,
                      chunk_size=None, process_group=None):
        if reduction not in ("none", "mean", "sum"):
            raise LlmfastValueError(f"LinearCrossEntropyLoss: reduction must be 'none', 'mean' or 'sum', got "
                                    f"{reduction!r}")
        self._init_loss(None, reduction, ignore_index, label_smoothing)
        self.linear = None
        self.options = None
        self._init_extras(z_loss, softcap, chunk_size, process_group)

    def _init_owning(self, in_features, num_classes, *, out_features=(), bias=False, device=None, dtype=None,
                     reduction="mean", weight=None, ignore_index=None, label_smoothing=0.0, options=None, z_loss=0.0,
                     softcap=None, chunk_size=None):
        if _TorchLinearCrossEntropyLoss is not None:
            _TorchLinearCrossEntropyLoss.__init__(
                self, in_features, num_classes, out_features=out_features, bias=bias, device=device, dtype=dtype,
                reduction=reduction, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                options=options)
        else:  # torch < 2.14: the same attributes, parameters and state_dict, built here
            if weight is not None and tuple(weight.shape) != (num_classes,):
                raise LlmfastValueError(f"LinearCrossEntropyLoss: weight must have shape ({num_classes},), got "
                                        f"{tuple(weight.shape)}")
            self._init_loss(weight, reduction, ignore_index, label_smoothing)
            self.num_classes = num_classes
            self.out_features = tuple(out_features)
            self.linear = torch.nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                          device=device, dtype=dtype)
            self.options = options
        self._init_extras(z_loss, softcap, chunk_size, None)

    def _init_loss(self, weight, reduction, ignore_index, label_smoothing):
        """The Module state torch's loss classes keep (the `weight` buffer, possibly None)."""
        torch.nn.Module.__init__(self)
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def _init_extras(self, z_loss, softcap, chunk_size, process_group):
        """llmfast's options (plain attributes, not state)."""
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.process_group = process_group

    def forward(self, input, weight=None, target=None, bias=None):
        """llmfast's form: (input, weight, target, bias=None); torch's form: (input, target)."""
        if self.linear is None:
            return F.linear_cross_entropy(input, weight, target, bias, ignore_index=self.ignore_index,
                                          reduction=self.reduction, label_smoothing=self.label_smoothing,
                                          z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size,
                                          process_group=self.process_group)
        if target is None:
            target = weight  # loss_fn(input, target): the second positional argument is the target
        elif weight is not None:
            raise LlmfastTypeError("LinearCrossEntropyLoss: this loss owns its projection (in_features, num_classes "
                                   "form): call it as loss_fn(input, target)")
        linear = self.linear
        linear_weight = linear.weight.reshape(self.num_classes, *self.out_features, linear.in_features)
        linear_bias = linear.bias.reshape(self.num_classes, *self.out_features) if linear.bias is not None else None
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                      reduction=self.reduction, ignore_index=self.ignore_index,
                                      label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                                      chunk_size=self.chunk_size, options=self.options)

    def extra_repr(self):
        if self.linear is not None:
            return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                    f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                    f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                    f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")


def _keep_or_additive(mask, dtype):
    """A torch.nn.MultiheadAttention mask (bool: True = masked out; float: added) in
    scaled_dot_product_attention's convention (bool: True = takes part; float: added)."""
    if mask is None or mask.dtype != torch.bool:
        return mask if mask is None or mask.dtype == dtype else mask.to(dtype)
    return ~mask


def _additive(mask, dtype):
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention (same constructor, parameters, state_dict and forward
    signature) whose need_weights=False path runs llmfast's fused attention.

    forward(..., need_weights=False) projects with the module's weights, runs
    llmfast.functional.scaled_dot_product_attention (attention dropout `dropout` in training)
    and returns (attn_output, None). key_padding_mask (N, S) and attn_mask (L, S) or
    (N * num_heads, L, S) keep torch's conventions (bool True = masked out, float = added);
    a boolean key_padding_mask alone takes the kernels' key-padding fast path. The is_causal
    hint is used as torch uses it (with an attn_mask and no key_padding_mask, the mask is
    dropped in favour of causal attention). Query rows whose keys are all masked give zeros.

    The other calls go to torch's implementation: need_weights=True (the attention weights are
    exactly what the fused kernels never form; note that it is torch's default), and modules
    built with add_bias_kv or add_zero_attn.
    """

    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask):
        """torch's shape rules for the fused path, as errors that name the argument (torch's
        module raises for each of these too). Returns whether the input is batched."""
        fn = "MultiheadAttention"
        for name, t in (("query", query), ("key", key), ("value", value)):
            _checks.tensor(fn, name, t)
        if query.dim() not in (2, 3):
            raise LlmfastValueError(f"{fn}: query must be 2-D (L, E) or 3-D, got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise LlmfastValueError(f"{fn}: {name} must be {query.dim()}-D like query, got shape {tuple(t.shape)}")
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise LlmfastValueError(f"{fn}: {name}'s last dimension must be {dim}, got shape {tuple(t.shape)}")
        seq_dim = 1 if batched and self.batch_first else 0
        if key.shape[:-1] != value.shape[:-1]:
            raise LlmfastValueError(f"{fn}: key and value must have the same batch and sequence sizes, got shapes "
                                    f"{tuple(key.shape)} and {tuple(value.shape)}")
        if batched and query.shape[1 - seq_dim] != key.shape[1 - seq_dim]:
            raise LlmfastValueError(f"{fn}: query and key must have the same batch size, got shapes "
                                    f"{tuple(query.shape)} and {tuple(key.shape)}")
        L, S = query.shape[seq_dim], key.shape[seq_dim]
        N = query.shape[1 - seq_dim] if batched else None
        if key_padding_mask is not None:
            expected = (N, S) if batched else (S,)
            if tuple(key_padding_mask.shape) != expected:
                raise LlmfastValueError(f"{fn}: key_padding_mask must have shape {expected} ((batch, source length)"
                                        f"{'' if batched else ' without the batch, for unbatched input'}), got "
                                        f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            heads = self.num_heads * (N if batched else 1)
            if tuple(attn_mask.shape) not in ((L, S), (heads, L, S)):
                raise LlmfastValueError(f"{fn}: attn_mask must have shape {(L, S)} or {(heads, L, S)} ((batch * "
                                        f"num_heads, target length, source length)), got {tuple(attn_mask.shape)}")
        return batched

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if torch.jit.is_scripting():  # torch's computation (super() is not TorchScript)
            batch_first = self.batch_first and query.dim() == 3
            if batch_first:
                query, key, value = query.transpose(1, 0), key.transpose(1, 0), value.transpose(1, 0)
            out, weights = torch.nn.functional.multi_head_attention_forward(
                query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
                self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
                training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, use_separate_proj_weight=not self._qkv_same_embed_dim,
                q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
                average_attn_weights=average_attn_weights, is_causal=is_causal)
            return (out.transpose(1, 0) if batch_first else out), weights
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype != torch.bool and not mask.dtype.is_floating_point:
                raise LlmfastTypeError(f"MultiheadAttention: {name} must be a bool or floating tensor (as in torch), "
                                       f"got {mask.dtype}")
        if need_weights or self.bias_k is not None or self.add_zero_attn or (is_causal and attn_mask is None):
            # torch raises for is_causal without attn_mask; let it say so.
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        batched = self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        # Unbatched inputs are (L, E), made (L, 1, E) above: sequence-first whatever batch_first says,
        # as in torch. Everything runs sequence-first, (L, N, E), as torch's module does: then the
        # attention output's memory (the query's order, see scaled_dot_product_attention) is
        # already (L, N, H, hd), the out projection's input needs no copy, and its output has
        # torch's layout.
        batch_first = self.batch_first and batched
        if batch_first:  # (N, L, E) views as (L, N, E)
            q_in, k_in, v_in = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        else:
            q_in, k_in, v_in = query, key, value
        L, N, E = q_in.shape
        S = k_in.shape[0]
        H, hd = self.num_heads, self.head_dim
        fl = torch.nn.functional.linear
        b = self.in_proj_bias
        b_q, b_k, b_v = b.chunk(3) if b is not None else (None, None, None)
        if self._qkv_same_embed_dim:
            if query is key and key is value:
                q, k, v = fl(q_in, self.in_proj_weight, b).chunk(3, dim=-1)
            else:
                w_q, w_k, w_v = self.in_proj_weight.chunk(3)
                q, k, v = fl(q_in, w_q, b_q), fl(k_in, w_k, b_k), fl(v_in, w_v, b_v)
        else:
            q = fl(q_in, self.q_proj_weight, b_q)
            k = fl(k_in, self.k_proj_weight, b_k)
            v = fl(v_in, self.v_proj_weight, b_v)
        # (L, N, E) -> (N, H, L, hd) views: the kernels take the strides as they are.
        q = q.reshape(L, N, H, hd).permute(1, 2, 0, 3)
        k = k.reshape(S, N, H, hd).permute(1, 2, 0, 3)
        v = v.reshape(S, N, H, hd).permute(1, 2, 0, 3)

        causal = is_causal and key_padding_mask is None
        if causal:
            attn_mask = None
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.view(N, H, L, S)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.view(N, 1, 1, S)
        if attn_mask is None or key_padding_mask is None:
            mask = _keep_or_additive(attn_mask if attn_mask is not None else key_padding_mask, q.dtype)
        elif attn_mask.dtype == torch.bool and key_padding_mask.dtype == torch.bool:
            mask = ~(attn_mask | key_padding_mask)
        else:
            mask = _additive(~attn_mask if attn_mask.dtype == torch.bool else attn_mask, q.dtype) + \
                _additive(~key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0,
                                             is_causal=causal)
        # (N, H, L, hd) -> (L, N, E) (a view), projected: a contiguous (L, N, E) output, and for
        # batch_first its (N, L, E) transposed view, the layouts torch's module returns.
        out = fl(out.permute(2, 0, 1, 3).reshape(L, N, E), self.out_proj.weight, self.out_proj.bias)
        if batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        return out, None


class CausalSelfAttention(torch.nn.Module):
    """GPT-style causal self-attention: one fused QKV projection, llmfast's fused causal
    attention, an output projection. Parameters and state_dict keys as nanoGPT's block
    (c_attn, c_proj), so its checkpoints load unchanged.

    x (B, T, embed_dim) -> (B, T, embed_dim). `dropout` is applied to the attention
    probabilities (inside the kernel) and to the output (resid_dropout), in training only.
    num_kv_heads (default num_heads) < num_heads gives grouped-query attention: c_attn then
    projects to (num_heads + 2 * num_kv_heads) * head_dim features, queries first.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, *, num_kv_heads=None, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"CausalSelfAttention: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"CausalSelfAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        factory = dict(device=device, dtype=dtype)
        self.c_attn = torch.nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias, **factory)
        self.c_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.resid_dropout = torch.nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.c_attn(x).view(B, T, H + 2 * Hkv, hd)
        # Views of the fused projection, (B, heads, T, hd): no copies.
        q = qkv[:, :, :H].transpose(1, 2)
        k = qkv[:, :, H:H + Hkv].transpose(1, 2)
        v = qkv[:, :, H + Hkv:].transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if torch.jit.is_scripting():
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                                 enable_gqa=Hkv != H)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=Hkv != H)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, self.embed_dim)))

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"dropout={self.dropout}")
