// Schemas of the cross-entropy ops. The device implementations live beside this file:
//   cross_entropy_cpu.cpp  (TORCH_LIBRARY_IMPL(llmfast, CPU, m))
//   cross_entropy_cuda.cu  (TORCH_LIBRARY_IMPL(llmfast, CUDA, m))
// Fake (meta) kernels and autograd are registered from Python in llmfast/ops/cross_entropy.py;
// the math is defined by llmfast/reference/cross_entropy.py.
//
// cross_entropy_fwd: logits (M, V) contiguous float32/float16/bfloat16; target (M,) int64;
//   weight (V,) floating or None (class weights, read as fp32); reduction 0 = none, 1 = mean,
//   2 = sum (torch's Reduction enum); softcap None or > 0; z_loss >= 0; 0 <= label_smoothing <= 1.
//   One pass over each row computes the row's logsumexp online in fp32, its loss and, when
//   compute_grad, its gradient. Returns
//     loss        float32: () for mean/sum (the reduced loss), (M,) for none;
//     lse         (M,) float32, logsumexp of the (soft-capped) row; 0 for rows that are ignored;
//     grad_logits (M, V) logits dtype when compute_grad, else an empty (0,) tensor:
//                 d loss / d logits for reduction mean/sum (the 1/sum(w[t]) of 'mean' folded
//                 in), and d loss[i] / d logits[i, :] row by row for none. Backward scales it by
//                 the upstream gradient with cross_entropy_scale_grad_.
//   A row is ignored when target == ignore_index; its loss and gradient are 0 and it does not
//   count towards the 'mean' denominator. Targets outside [0, V) that are not ignore_index are
//   an error on the CPU (checked before the kernel runs); the GPU kernels never index with them
//   and treat such rows as ignored (no host synchronisation to check them).
// cross_entropy_fwd_inplace: as cross_entropy_fwd with compute_grad=True, but the gradient is
//   written over `logits` (which must not be needed afterwards); returns (loss, lse).
// cross_entropy_scale_grad_: grad_logits (M, V) *= grad_output row by row, in place;
//   grad_output float32 with 1 element (broadcast) or M elements. Rows whose factor is exactly
//   1 are not touched, so the common loss.backward() costs no pass over the gradient; the check
//   happens in the kernel (no host synchronisation).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(llmfast, m) {
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing, float z_loss, float? softcap, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "cross_entropy_fwd_inplace(Tensor(a!) logits, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing, float z_loss, float? softcap) -> (Tensor, Tensor)");
  m.def("cross_entropy_scale_grad_(Tensor(a!) grad_logits, Tensor grad_output) -> ()");
}
