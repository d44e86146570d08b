// Schemas of the attention ops (FlashAttention-style scaled dot-product attention). The device
// implementations live beside this file:
//   attention_cpu.cpp  (TORCH_LIBRARY_IMPL(llmfast, CPU, m))
// Fake (meta) kernels and autograd are registered from Python in llmfast/ops/attention.py; the
// contract is the one of the Triton ops there (llmfast::triton_attention_fwd / _bwd).
//
// attention_fwd: query (B, Hq, Sq, D), key (B, Hkv, Sk, D), value (B, Hkv, Sk, Dv), any strides,
//   one dtype (float32, float16 or bfloat16), Hq a multiple of Hkv (query head h reads kv head
//   h / (Hq / Hkv)); attn_mask None or (B, Hq, Sq, Sk) with any strides (an expanded view),
//   bool (true = takes part) or floating (added to the scores); window_left / window_right
//   bound the band i - left <= j <= i + right (-1 = unbounded; is_causal is window_right = 0,
//   top-left aligned as in torch); softcap 0 = off; dropout_p in [0, 1) with a one-element
//   int64 seed tensor (required when dropout_p > 0).
//   Returns (out (B, Hq, Sq, Dv) contiguous in query's dtype,
//            lse (B, Hq, Sq) float32, natural log, -inf for rows with no visible key).
// attention_bwd: grad_out like out (any strides), out and lse from attention_fwd, grad_lse
//   (B, Hq, Sq) or None; returns (grad_query, grad_key, grad_value) contiguous in the inputs'
//   dtype, and grad_mask (B, Hq, Sq, Sk) in attn_mask's dtype when mask_grad and the mask is
//   floating, else an empty (0,) tensor.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(llmfast, m) {
  m.def(
      "attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale, "
      "int window_left, int window_right, float softcap, float dropout_p, Tensor? seed) "
      "-> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, Tensor? grad_lse, Tensor? attn_mask, float scale, int window_left, "
      "int window_right, float softcap, float dropout_p, Tensor? seed, bool mask_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}
