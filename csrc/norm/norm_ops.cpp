// Schemas of the normalization ops. One pair of ops covers LayerNorm, RMSNorm and their
// residual-add variants; the device implementations live beside this file:
//   norm_cpu.cpp  (TORCH_LIBRARY_IMPL(llmfast, CPU, m))
//   norm_cuda.cu  (TORCH_LIBRARY_IMPL(llmfast, CUDA, m))
// Fake (meta) kernels and autograd are registered from Python in llmfast/ops/norm.py.
// norm (the eager op with a C++ autograd node, any leading shape) is implemented in
// norm_autograd.cpp; norm_backward_with_graph (its double backward) in llmfast/ops/norm.py.
//
// norm_fwd: input (M, N) contiguous; residual (M, N) same dtype or None; weight, bias (N,) of
//   input's dtype or float32, or None. With a residual the normalized tensor is
//   s = input + residual rounded to input's dtype (so backward can recompute from s).
//   Returns (out (M, N) input dtype,
//            residual_out: s (M, N) when residual is given, else an empty (0,) tensor,
//            mean (M,) float32 for LayerNorm, empty (0,) for RMSNorm,
//            rstd (M,) float32).
// norm_bwd: grad_out (M, N); grad_residual_out (M, N) or None (the gradient reaching s);
//   normed_input is s (or input); returns (grad_input (M, N) input dtype,
//   grad_weight (N,) weight dtype if weight_grad else empty (0,),
//   grad_bias (N,) weight dtype if bias_grad else empty (0,)).
//   grad_input already includes grad_residual_out; it is also the residual's gradient.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(llmfast, m) {
  m.def(
      "norm_fwd(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
      "bool rms) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor normed_input, "
      "Tensor? weight, Tensor mean, Tensor rstd, bool rms, bool weight_grad, bool bias_grad) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "norm(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms, "
      "int normalized_ndim) "
      "-> (Tensor, Tensor)");
  m.def(
      "norm_backward_with_graph(Tensor? grad_out, Tensor? grad_residual_out, Tensor normed_input, "
      "Tensor? weight, float eps, bool rms, int normalized_ndim, bool input_grad, bool weight_grad, "
      "bool bias_grad) "
      "-> (Tensor, Tensor, Tensor)");
}
