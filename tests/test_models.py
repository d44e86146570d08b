"""End-to-end models (llmfast.models) against pure-torch twins with the same weights.

Tiny configs on the CPU, float32: the models' losses, logits and every parameter gradient must
match a twin in plain torch (llmfast.reference.gpt with naive softmax attention; for BERT,
one written here with torch.nn.MultiheadAttention; full logits and
torch.nn.functional.cross_entropy), for the default backend, 'reference' and, where Triton's
interpreter is on, 'triton'. Plus: a few AdamW steps lower the loss, and torch.compile(fullgraph=True) of the GPT loss matches eager.

Shapes are odd on purpose: vocab 97 and 101 (not a power of two), sequence 13 (no full tile),
head dim 16 and 8, some targets ignored, padded sequences for BERT.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF

import llmfast
from llmfast.models import GPT, BertConfig, BertForMaskedLM, GPTConfig
from llmfast.reference import gpt as reference_gpt

from conftest import backends_for
from helpers import rel_error

# fp32 against fp32 with other summation orders (chunked fused loss, fused norms, tiled
# attention): a few ulps per op, grown through two layers and a backward.
LOSS_TOL = dict(atol=1e-5, rtol=1e-5)
LOGITS_TOL = dict(atol=2e-5, rtol=2e-5)
GRAD_REL_TOL = 1e-5

BACKENDS = ["auto"] + [b for b in backends_for("cpu") if b in ("reference", "triton")]


def _gpt_config(**kw):
    return GPTConfig(**{**dict(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32, dropout=0.0), **kw})


def _tokens(cfg, B=2, T=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets[0, :3] = -1  # ignored, as nanoGPT's ignore_index=-1
    return idx, targets


# --- pure-torch GPT twin: nanoGPT with naive attention (llmfast.reference.gpt) -------------------
def TorchGPT(cfg):
    return reference_gpt.GPT(cfg, attention="math")


def _randomize_norms(model):
    """nanoGPT's init leaves LayerNorm at weight 1, bias 0, which hides a swapped or unused norm
    parameter; random values do not."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.3 * torch.randn(p.shape, generator=g))


def _twins(cfg, seed=0):
    torch.manual_seed(seed)
    model = GPT(cfg)
    _randomize_norms(model)
    twin = TorchGPT(cfg)
    twin.load_state_dict(model.state_dict(), strict=True)
    return model, twin


def _grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


def _assert_grads_close(model, twin):
    got, want = _grads(model), _grads(twin)
    assert got.keys() == want.keys()
    for name, g in want.items():
        assert got[name] is not None, f"{name}: no gradient"
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite gradient"
        err = rel_error(got[name], g, floor=1e-3)
        assert err <= GRAD_REL_TOL, f"{name}: gradient relative error {err:.3g} > {GRAD_REL_TOL}"


# --- GPT -----------------------------------------------------------------------------------------
def test_gpt_state_dict_is_nanogpt():
    cfg = _gpt_config(n_layer=1)
    model = GPT(cfg)
    keys = set(model.state_dict())
    assert keys == set(TorchGPT(cfg).state_dict())
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.h.0.attn.c_attn.weight",
            "transformer.h.0.mlp.c_fc.bias", "transformer.ln_f.weight"} <= keys
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    assert isinstance(model.transformer.h[0].ln_1, llmfast.nn.LayerNorm)
    assert isinstance(model.transformer.h[0].attn, llmfast.nn.CausalSelfAttention)


# Triton's interpreter is slow: one Triton case (with biases) suffices.
@pytest.mark.parametrize("backend,bias", [pytest.param(b, bias, id=f"{b}-{'bias' if bias else 'nobias'}")
                                          for bias in (True, False) for b in BACKENDS if bias or b != "triton"])
def test_gpt_matches_torch_twin(backend, bias):
    cfg = _gpt_config(bias=bias)
    model, twin = _twins(cfg)
    idx, targets = _tokens(cfg)
    with llmfast.use_backend(backend):
        logits, loss = model(idx, targets)
        assert logits is None  # the fused loss never forms them
        loss.backward()
        with torch.no_grad():
            logits_only, no_loss = model(idx)
    want_logits, want = twin(idx, targets)
    want.backward()
    assert no_loss is None
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, want, **LOSS_TOL)
    torch.testing.assert_close(logits_only, want_logits.detach(), **LOGITS_TOL)
    _assert_grads_close(model, twin)


def test_gpt_all_targets_ignored_gives_nan_loss_and_zero_grads():
    cfg = _gpt_config(n_layer=1)
    model, _ = _twins(cfg)
    idx, _ = _tokens(cfg)
    _, loss = model(idx, torch.full_like(idx, -1))
    loss.backward()
    assert torch.isnan(loss)  # as torch's cross_entropy with every target ignored
    assert model.lm_head.weight.grad.abs().max() == 0


def test_gpt_rejects_too_long_sequence():
    cfg = _gpt_config(n_layer=1)
    with pytest.raises(ValueError, match="block_size"):
        GPT(cfg)(torch.zeros(1, cfg.block_size + 1, dtype=torch.long))


def test_gpt_crop_block_size_leaves_a_shared_config_alone():
    """Cropping one model shortens its context only: another model built from the same config
    keeps the full block size, and later models are built with it."""
    cfg = _gpt_config(n_layer=1)
    a, b = GPT(cfg), GPT(cfg)
    a.crop_block_size(8)
    assert a.config.block_size == 8 and a.transformer.wpe.weight.shape[0] == 8
    assert cfg.block_size == b.config.block_size == 16
    b(torch.zeros(1, 12, dtype=torch.long))  # within b's context
    with pytest.raises(ValueError, match="block_size"):
        a(torch.zeros(1, 12, dtype=torch.long))


def test_gpt_training_lowers_loss():
    cfg = _gpt_config()
    torch.manual_seed(0)
    model = GPT(cfg)
    idx, targets = _tokens(cfg)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95), device_type="cpu")
    losses = []
    for _ in range(8):
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.75 * losses[0], losses  # memorising one batch: ln(97) = 4.57 falls fast


def test_gpt_autocast_bf16_close_to_fp32():
    """bf16 autocast on the CPU: the loss's projection runs in bf16 and the loss comes back in
    float32 (as torch's linear + cross_entropy under autocast), the residual stream stays
    float32; values within bf16 rounding of the float32 model."""
    cfg = _gpt_config()
    model, _ = _twins(cfg)
    idx, targets = _tokens(cfg)
    _, want = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, targets)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(loss.float(), want.detach(), atol=0.05, rtol=0.02)


def test_gpt_torch_compile_fullgraph():
    cfg = _gpt_config(n_layer=1)
    model, _ = _twins(cfg)
    compiled_model = copy.deepcopy(model)
    idx, targets = _tokens(cfg)
    _, want = model(idx, targets)
    want.backward()
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True)
    _, loss = compiled(idx, targets)
    loss.backward()
    torch.testing.assert_close(loss, want, **LOSS_TOL)
    _assert_grads_close(compiled_model, model)


# --- BERT ----------------------------------------------------------------------------------------
def _bert_config(**kw):
    return BertConfig(**{**dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0), **kw})


class TorchBertEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids, types):
        pos = torch.arange(ids.shape[1])
        return self.norm(self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(types))


class TorchBertLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.output_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, key_padding_mask):
        x = self.attention_norm(x + self.attention(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0])
        return self.output_norm(x + self.output(TF.gelu(self.intermediate(x))))


class TorchBertMLMHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))


class TorchBert(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = TorchBertEmbeddings(cfg)
        self.layers = nn.ModuleList([TorchBertLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.mlm_head = TorchBertMLMHead(cfg)

    def forward(self, ids, attention_mask, types, labels):
        x = self.embeddings(ids, types)
        for layer in self.layers:
            x = layer(x, attention_mask == 0)
        h = self.mlm_head.norm(TF.gelu(self.mlm_head.dense(x)))
        logits = TF.linear(h, self.embeddings.word_embeddings.weight, self.mlm_head.bias)
        return logits, TF.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)


def _bert_batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, S = 3, 13
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    types = torch.randint(0, cfg.type_vocab_size, (B, S), generator=g)
    lengths = torch.tensor([S, 9, 4])  # one full sequence, two padded
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    labels[torch.rand(B, S, generator=g) < 0.4] = -100  # unmasked tokens
    labels[mask == 0] = -100  # padding
    return ids, mask, types, labels


def _bert_twins(cfg, seed=0):
    torch.manual_seed(seed)
    model = BertForMaskedLM(cfg)
    _randomize_norms(model)
    with torch.no_grad():
        model.mlm_head.bias.normal_(0.0, 0.1)
    twin = TorchBert(cfg)
    twin.load_state_dict(model.state_dict(), strict=True)
    return model, twin


@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_mlm_matches_torch_twin(backend):
    cfg = _bert_config()
    model, twin = _bert_twins(cfg)
    ids, mask, types, labels = _bert_batch(cfg)
    with llmfast.use_backend(backend):
        _, loss = model(ids, mask, types, labels)
        loss.backward()
        with torch.no_grad():
            logits, _ = model(ids, mask, types)
            # padding is masked out of the attention: changing the padded tokens changes nothing
            other = torch.where(mask == 1, ids, (ids + 7) % cfg.vocab_size)
            _, loss_other = model(other, mask, types, labels)
    want_logits, want = twin(ids, mask, types, labels)
    want.backward()
    torch.testing.assert_close(loss, want, **LOSS_TOL)
    torch.testing.assert_close(loss_other, loss.detach(), **LOSS_TOL)
    real = mask.bool()
    torch.testing.assert_close(logits[real], want_logits.detach()[real], **LOGITS_TOL)
    _assert_grads_close(model, twin)


def test_bert_autocast_bf16_close_to_fp32():
    cfg = _bert_config()
    model, _ = _bert_twins(cfg)
    batch = _bert_batch(cfg)
    _, want = model(*batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(*batch)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(loss.float(), want.detach(), atol=0.05, rtol=0.02)


def test_bert_without_mask_matches_all_ones_mask():
    cfg = _bert_config(num_hidden_layers=1)
    model, _ = _bert_twins(cfg)
    ids, _, types, labels = _bert_batch(cfg)
    _, a = model(ids, None, types, labels)
    _, b = model(ids, torch.ones_like(ids), types, labels)
    torch.testing.assert_close(a, b, **LOSS_TOL)
