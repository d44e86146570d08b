"""A BERT encoder (post-norm) with a masked-language-model head, built from llmfast's layers.

Embeddings (word + position + token type, LayerNorm, dropout), then per layer
    x = LayerNorm(x + dropout(self_attention(x)))
    x = LayerNorm(x + dropout(output(gelu(intermediate(x)))))
and the MLM head LayerNorm(gelu(dense(x))) @ word_embeddings.T + bias (decoder tied to the word
embeddings, as BERT). The config field names are Hugging Face's BertConfig's; the module names
are not (self-attention is one torch.nn.MultiheadAttention with a packed in_proj_weight, where
Hugging Face has separate query / key / value Linears).

llmfast pieces: self-attention is llmfast.nn.MultiheadAttention (batch_first, need_weights=False,
so the fused attention kernels run, with the padding as key_padding_mask); every residual add
and the LayerNorm after it are one llmfast.functional.add_layer_norm (post-norm needs only its
normalised output); the masked-LM loss is llmfast.functional.linear_cross_entropy of the head's
hidden states, the tied word embeddings and the decoder bias, ignore_index=-100 (labels of
unmasked and padding tokens), so the (B, S, vocab) logits are never materialised. That is
cross_entropy(logits, labels, ignore_index=-100) of the logits the model returns without labels.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import nn as lnn
from ._common import add_norm, lm_loss

__all__ = ["BertConfig", "BertForMaskedLM", "BertEmbeddings", "BertLayer"]


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = lnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        pos = torch.arange(input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        # the last of the three adds happens inside the fused add + LayerNorm
        extra = self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.dropout(add_norm(self.norm, self.word_embeddings(input_ids), extra)[0])


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = lnn.MultiheadAttention(config.hidden_size, config.num_attention_heads,
                                                dropout=config.attention_probs_dropout_prob, batch_first=True)
        self.attention_norm = lnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.gelu = nn.GELU()
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_norm = lnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, key_padding_mask=None):
        a, _ = self.attention(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)
        x = add_norm(self.attention_norm, self.dropout(a), x)[0]
        h = self.output(self.gelu(self.intermediate(x)))
        return add_norm(self.output_norm, self.dropout(h), x)[0]


class BertMLMHead(nn.Module):
    """dense -> gelu -> LayerNorm; the decoder is the word embedding matrix (tied) plus `bias`."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.gelu = nn.GELU()
        self.norm = lnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x):
        return self.norm(self.gelu(self.dense(x)))


class BertForMaskedLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])
        self.mlm_head = BertMLMHead(config)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.MultiheadAttention):
            torch.nn.init.normal_(module.in_proj_weight, mean=0.0, std=std)
            torch.nn.init.zeros_(module.in_proj_bias)
            # out_proj is an nn.Linear: handled by its own visit

    def encode(self, input_ids, attention_mask=None, token_type_ids=None):
        """The encoder's last hidden states (B, S, hidden_size). attention_mask (B, S): 1 / True
        for real tokens, 0 / False for padding (Hugging Face's convention); padding keys are
        masked out of every query's attention (padding queries are computed and left to the
        loss's ignore_index)."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"BertForMaskedLM: sequence length {input_ids.shape[1]} is longer than "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_padding_mask = attention_mask == 0 if attention_mask is not None else None  # True = masked out
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        return x

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        """-> (logits (B, S, vocab), None) without labels; with labels (B, S) -> (None, mean
        cross-entropy over the labels that are not -100)."""
        h = self.mlm_head(self.encode(input_ids, attention_mask, token_type_ids))
        weight = self.embeddings.word_embeddings.weight
        if labels is None:
            return torch.nn.functional.linear(h, weight, self.mlm_head.bias), None
        return None, lm_loss(h, weight, labels, self.mlm_head.bias, ignore_index=-100)
