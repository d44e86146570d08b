"""GPT-2 (decoder-only transformer, pre-norm) built from llmfast's layers.

Config and parameter names are nanoGPT's (GPTConfig; transformer.wte / wpe / h.N.{ln_1, attn.c_attn,
attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj} / ln_f, lm_head tied to wte), so nanoGPT checkpoints load
with load_state_dict unchanged, and so does nanoGPT's initialisation.

Where the layers differ from nanoGPT's:
- attention is llmfast.nn.CausalSelfAttention (FlashAttention-style, the (T, T) scores are
  never stored);
- the residual stream runs through llmfast.functional.add_layer_norm: each block returns its
  last branch output unadded, and the next LayerNorm (the next block's ln_1, or ln_f) adds it
  to the residual and normalises in one pass (flash-attn's prenorm Block layout), which reads
  the two tensors once and writes the sum and the normalised output once instead of an add
  kernel followed by a LayerNorm kernel;
- with targets, the loss is llmfast.functional.linear_cross_entropy of the last hidden state
  and the tied embedding: the (B, T, vocab) logits are never materialised; forward then
  returns (None, loss). Without targets it returns (logits for every position, None), where
  nanoGPT returns only the last position's (generate() below takes the last one itself).
  Targets equal to -1 are ignored, as in nanoGPT.

Under torch.autocast the residual stream stays in the parameters' dtype (as in torch's own
autocast model) and the loss's projection runs in the autocast dtype (see _common.lm_loss).
"""
import inspect
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as TF

from .. import nn as lnn
from ..reference.gpt import MLP  # plain torch (no llmfast op in it), shared with the twin
from ._common import add_norm, lm_loss

__all__ = ["GPTConfig", "GPT", "Block", "MLP"]


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in the Linears and LayerNorms, as GPT-2; False is a bit better and faster


class Block(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(.)), with the adds fused into the norms.

    forward(hidden, residual) -> (mlp_out, residual): `hidden` is the previous block's
    unadded branch output (residual=None for the first block, whose input is the embedding);
    the caller adds the returned mlp_out into the returned residual (the next block's ln_1, or
    ln_f, does it)."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = lnn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = lnn.CausalSelfAttention(config.n_embd, config.n_head, dropout=config.dropout, bias=config.bias)
        self.ln_2 = lnn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, hidden, residual=None):
        if residual is None:
            residual = hidden
            hidden = self.ln_1(hidden)
        else:
            hidden, residual = add_norm(self.ln_1, hidden, residual)
        hidden, residual = add_norm(self.ln_2, self.attn(hidden), residual)
        return self.mlp(hidden), residual


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.vocab_size is None or config.block_size is None:
            raise ValueError("GPT: config.vocab_size and config.block_size must be set")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=lnn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameters counted once (the tied lm_head is wte); without the position embedding
        by default, as nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx):
        """The final hidden states ln_f(...) (B, T, n_embd) for token ids idx (B, T)."""
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"GPT: sequence length {t} is longer than block_size {self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        hidden, residual = x, None
        for block in self.transformer.h:
            hidden, residual = block(hidden, residual)
        if residual is None:  # n_layer == 0
            return self.transformer.ln_f(hidden)
        return add_norm(self.transformer.ln_f, hidden, residual)[0]

    def forward(self, idx, targets=None):
        """idx (B, T) int64 -> (logits (B, T, vocab), None) without targets; with targets (B, T)
        -> (None, mean cross-entropy over the targets that are not -1)."""
        x = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(x), None
        return None, lm_loss(x, self.lm_head.weight, targets, ignore_index=-1)

    def crop_block_size(self, block_size):
        """Shrinks the model's context (e.g. a pretrained 1024 down to 256), as nanoGPT."""
        if block_size > self.config.block_size:
            raise ValueError(f"GPT.crop_block_size: {block_size} > block_size {self.config.block_size}")
        self.config = replace(self.config, block_size=block_size)  # a copy: other models may share the config
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on the matrices (dim >= 2) only; fused on CUDA, as nanoGPT."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **(dict(fused=True) if fused else {}))

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B as in nanoGPT:
        6 * parameters + 12 * n_layer * n_embd * seq_len (attention scores and values)."""
        cfg = self.config
        seq_len = cfg.block_size if seq_len is None else seq_len
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * seq_len

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Samples max_new_tokens tokens after idx (B, T), feeding each back in (no KV cache)."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits = self.lm_head(self.hidden_states(idx_cond)[:, -1, :]) / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(TF.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
