// Eager autograd for the normalization ops, in C++: llmfast::norm.
//
// llmfast.functional calls this op for the 'cpu' and 'cuda' backends outside torch.compile.
// It takes the caller's tensors as they are (any leading shape, the normalized dims last),
// runs norm_fwd below the autograd key and records one C++ autograd node, whose backward
// runs norm_bwd. Compared with a Python torch.autograd.Function around the same kernels this
// saves, per forward+backward, the Python forward and backward calls (the backward runs on
// the autograd engine's device thread, which must take the GIL for Python) and the view nodes
// that reshaping to (M, N) and back would add to the graph.
//
// Under torch.compile llmfast.functional uses norm_fwd / norm_bwd with the autograd formula
// registered in llmfast/ops/norm.py instead; both paths compute the same thing.
//
// norm(input, residual, weight, bias, eps, rms, normalized_ndim):
//   input (..., normalized dims), the last normalized_ndim dims normalized together; residual
//   like input or None; weight, bias of the normalized shape or None, input's dtype or
//   float32. Any strides (made contiguous for the kernels). Returns (out like input,
//   input + residual like input, or an empty (0,) tensor without residual). Sizes are handled
//   as SymInts, so torch.compile can trace the op (opcheck passes) although
//   llmfast.functional only calls it in eager mode.
// A backward with create_graph=True (grad mode on inside it) calls
// llmfast::norm_backward_with_graph, implemented in Python (llmfast/ops/norm.py) as explicit
// differentiable torch formulas, so second derivatives exist.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace llmfast {
namespace norm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, bool);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
    const at::Tensor&, bool, bool, bool);
using GraphBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const OptTensor&, const OptTensor&, const at::Tensor&, const OptTensor&, double, bool, int64_t,
    bool, bool, bool);

// Looked up once; the handles stay valid for the life of the process.
const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("llmfast::norm_fwd", "").typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("llmfast::norm_bwd", "").typed<BwdSig>();
  return op;
}

const c10::TypedOperatorHandle<GraphBwdSig>& graph_bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("llmfast::norm_backward_with_graph", "")
                             .typed<GraphBwdSig>();
  return op;
}

// The product of the last `ndim` sizes of `t` (symbolic under torch.compile's tracing).
c10::SymInt trailing_numel(const at::Tensor& t, int64_t ndim) {
  const auto sizes = t.sym_sizes();
  c10::SymInt n = 1;
  for (int64_t d = t.dim() - ndim; d < t.dim(); ++d) n = n * sizes[d];
  return n;
}

// `t` as the kernels take it: (rows, n) contiguous.
at::Tensor as_rows(const at::Tensor& t, const c10::SymInt& n) {
  if (t.dim() == 2 && t.sym_sizes()[1] == n) return t.contiguous();
  return t.reshape_symint({c10::SymInt(-1), n}).contiguous();
}

// A parameter of the normalized shape as the kernels take it: (n,) contiguous.
OptTensor flat_param(const OptTensor& p, const c10::SymInt& n) {
  if (!p.has_value() || !p->defined()) return std::nullopt;
  if (p->dim() == 1) return p->contiguous();
  return p->reshape_symint({n}).contiguous();
}

// `t` with `sizes` (t itself when `same`), sharing its storage, without making the result a
// view: it is a plain tensor to autograd (so in-place changes to it are allowed, as on any op
// output).
at::Tensor shaped_like(const at::Tensor& t, c10::SymIntArrayRef sizes, bool same) {
  return same ? t : at::_unsafe_view_symint(t, sizes);
}

struct NormFunction : public torch::autograd::Function<NormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptTensor& residual,
                               const OptTensor& weight, const OptTensor& bias, double eps, bool rms,
                               int64_t normalized_ndim) {
    TORCH_CHECK(normalized_ndim >= 1 && normalized_ndim <= input.dim(),
                "llmfast::norm: normalized_ndim must be in [1, input.dim() = ", input.dim(), "], got ",
                normalized_ndim);
    const bool has_residual = residual.has_value() && residual->defined();
    const bool has_weight = weight.has_value() && weight->defined();
    const bool has_bias = bias.has_value() && bias->defined();
    if (has_residual) {
      TORCH_CHECK(residual->sym_sizes() == input.sym_sizes(), "llmfast::norm: residual must have input's shape ",
                  input.sym_sizes(), ", got ", residual->sym_sizes());
    }
    const c10::SymIntArrayRef normalized = input.sym_sizes().slice(input.dim() - normalized_ndim);
    for (const auto& [name, p] : {std::pair<const char*, const OptTensor&>{"weight", weight}, {"bias", bias}}) {
      if (p.has_value() && p->defined()) {
        TORCH_CHECK(p->sym_sizes() == normalized, "llmfast::norm: ", name, " must have the normalized shape ",
                    normalized, ", got ", p->sym_sizes());
      }
    }
    const c10::SymInt n = trailing_numel(input, normalized_ndim);
    // (M, n) is input's own shape when it is 2-D with one normalized dim: no reshaping at all.
    const bool flat = input.dim() == 2 && normalized_ndim == 1;
    const at::Tensor x = as_rows(input, n);
    const OptTensor r = has_residual ? OptTensor(as_rows(*residual, n)) : std::nullopt;
    auto [out, residual_out, mean, rstd] = fwd_op().call(x, r, flat_param(weight, n), flat_param(bias, n), eps, rms);
    at::Tensor y = shaped_like(out, input.sym_sizes(), flat);
    at::Tensor s = has_residual ? shaped_like(residual_out, input.sym_sizes(), flat) : residual_out;

    ctx->saved_data["eps"] = eps;
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["ndim"] = normalized_ndim;
    ctx->saved_data["has_residual"] = has_residual;
    ctx->saved_data["has_bias"] = has_bias;
    // The normalized tensor: the input, or the sum s (this node's own output; a double
    // backward differentiates through it back into this node, whose backward passes the
    // gradient of s on to input and residual).
    ctx->save_for_backward({has_residual ? s : input, has_weight ? *weight : at::Tensor(), mean, rstd});
    // As torch's x + r: the sum needs no gradient unless input or residual does.
    if (!has_residual || !(input.requires_grad() || residual->requires_grad())) ctx->mark_non_differentiable({s});
    ctx->set_materialize_grads(false);
    return {y, s};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& normed = saved[0];
    const at::Tensor& weight = saved[1];
    const bool rms = ctx->saved_data["rms"].toBool();
    const int64_t ndim = ctx->saved_data["ndim"].toInt();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const at::Tensor& grad_out = grads[0];
    const at::Tensor grad_s = has_residual ? grads[1] : at::Tensor();
    // needs_input_grad counts only the tensors that were passed (absent optionals have no edge).
    const int64_t weight_edge = has_residual ? 2 : 1;
    const int64_t bias_edge = weight_edge + (weight.defined() ? 1 : 0);
    const bool input_grad = ctx->needs_input_grad(0) || (has_residual && ctx->needs_input_grad(1));
    const bool weight_grad = weight.defined() && ctx->needs_input_grad(weight_edge);
    const bool bias_grad = has_bias && ctx->needs_input_grad(bias_edge);

    variable_list result(7);
    if (!grad_out.defined() && !grad_s.defined()) return result;

    const bool flat = normed.dim() == 2 && ndim == 1;
    at::Tensor grad_normed, grad_weight, grad_bias;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: gradients that carry a graph (see the header).
      std::tie(grad_normed, grad_weight, grad_bias) = graph_bwd_op().call(
          grad_out.defined() ? OptTensor(grad_out) : std::nullopt,
          grad_s.defined() ? OptTensor(grad_s) : std::nullopt, normed,
          weight.defined() ? OptTensor(weight) : std::nullopt, ctx->saved_data["eps"].toDouble(), rms, ndim,
          input_grad, weight_grad, bias_grad);
    } else {
      const c10::SymInt n = trailing_numel(normed, ndim);
      const at::Tensor normed2d = as_rows(normed, n);
      const at::Tensor g = grad_out.defined() ? as_rows(grad_out, n) : at::zeros_like(normed2d);
      const OptTensor gs = grad_s.defined() ? OptTensor(as_rows(grad_s, n)) : std::nullopt;
      const OptTensor w = flat_param(weight.defined() ? OptTensor(weight) : std::nullopt, n);
      std::tie(grad_normed, grad_weight, grad_bias) =
          bwd_op().call(g, gs, normed2d, w, saved[2], saved[3], rms, weight_grad, bias_grad);
      grad_normed = shaped_like(grad_normed, normed.sym_sizes(), flat);
    }
    // The parameters' shape: the normalized (last ndim) dims.
    const c10::SymIntArrayRef param_sizes = normed.sym_sizes().slice(normed.dim() - ndim);
    if (input_grad) {
      result[0] = grad_normed;
      if (has_residual) result[1] = grad_normed;
    }
    if (weight_grad) result[2] = shaped_like(grad_weight, param_sizes, ndim == 1);
    if (bias_grad) result[3] = shaped_like(grad_bias, param_sizes, ndim == 1);
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> norm(const at::Tensor& input, const OptTensor& residual,
                                        const OptTensor& weight, const OptTensor& bias, double eps, bool rms,
                                        int64_t normalized_ndim) {
  auto out = NormFunction::apply(input, residual, weight, bias, eps, rms, normalized_ndim);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace norm
}  // namespace llmfast

TORCH_LIBRARY_IMPL(llmfast, CompositeImplicitAutograd, m) {
  m.impl("norm", &llmfast::norm::norm);
}
