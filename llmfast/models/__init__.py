"""End-to-end models built from llmfast's layers (not imported by `import llmfast`).

    from llmfast.models import GPT, GPTConfig                 # GPT-2, nanoGPT's names and config
    model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768))
    _, loss = model(idx, targets)                             # fused linear + cross-entropy loss

    from llmfast.models import BertConfig, BertForMaskedLM    # post-norm BERT, masked-LM head
    _, loss = BertForMaskedLM(BertConfig())(ids, attention_mask, labels=labels)
"""
from .bert import BertConfig, BertForMaskedLM
from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "BertConfig", "BertForMaskedLM"]
