// Autograd of int4_gemm, in C++ so that a forward without gradients costs nothing extra (a Python
// autograd registration costs ~10 us per call through the Autograd dispatch key, as much as a
// small GEMM). The weight is frozen (quantized): gradients flow to x and bias only,
//   dx = dy · W  (W [N, K] dequantized),  dbias = sum of dy over the leading dimensions.
// W4A8 (act_dtype = torch.int8) has the same backward: the activation quantization is treated as
// the identity (straight-through estimator).
// dx is computed by bitpress::int4_gemm_backward, defined in python/bitpress/int4/ops.py (it
// dequantizes W from the kernel layout with plain torch ops: backward is rare at inference).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include "torch/glue.h"

namespace bitpress {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = std::optional<at::Tensor>;

class Int4GemmFunction : public torch::autograd::Function<Int4GemmFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& scales, const OptT& zeros,
                            const at::Tensor& group_starts, const OptT& perm, int64_t out_features,
                            int64_t layout, const OptT& bias,
                            std::optional<at::ScalarType> act_dtype) {
    TORCH_CHECK(!scales.requires_grad() && !qweight.requires_grad(),
                "int4_gemm: the quantized weight is frozen: scales must not require grad "
                "(gradients flow to x and bias only)");
    ctx->save_for_backward(
        {qweight, scales, zeros.value_or(at::Tensor()), group_starts, perm.value_or(at::Tensor())});
    ctx->saved_data["K"] = x.dim() ? x.size(-1) : 0;  // a 0-D x is reported by the op's check
    ctx->saved_data["N"] = out_features;
    ctx->saved_data["layout"] = layout;
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["x_grad"] = x.requires_grad();
    ctx->saved_data["bias_grad"] = bias.has_value() && bias->defined() && bias->requires_grad();
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("bitpress::int4_gemm", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const OptT&, const at::Tensor&, const OptT&, int64_t,
                                           int64_t, const OptT&, std::optional<at::ScalarType>)>();
    return op.call(x, qweight, scales, zeros, group_starts, perm, out_features, layout, bias,
                   act_dtype);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    const variable_list saved = ctx->get_saved_variables();
    const int64_t K = ctx->saved_data["K"].toInt(), N = ctx->saved_data["N"].toInt();
    at::Tensor grad_x, grad_bias;
    if (ctx->saved_data["x_grad"].toBool() && grad.defined()) {
      static auto bwd =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("bitpress::int4_gemm_backward", "")
              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const OptT&, const at::Tensor&, const OptT&, int64_t, int64_t,
                                int64_t, at::ScalarType)>();
      auto opt = [](const at::Tensor& t) { return t.defined() ? OptT(t) : OptT(); };
      grad_x =
          bwd.call(grad, saved[0], saved[1], opt(saved[2]), saved[3], opt(saved[4]), K, N,
                   ctx->saved_data["layout"].toInt(), ctx->saved_data["x_dtype"].toScalarType());
    }
    if (ctx->saved_data["bias_grad"].toBool() && grad.defined()) {
      grad_bias = grad.reshape({-1, N}).sum(0);
    }
    return {grad_x,       at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), grad_bias,    at::Tensor()};
  }
};

at::Tensor int4_gemm_autograd(const at::Tensor& x, const at::Tensor& qweight,
                              const at::Tensor& scales, const OptT& zeros,
                              const at::Tensor& group_starts, const OptT& perm,
                              int64_t out_features, int64_t layout, const OptT& bias,
                              std::optional<at::ScalarType> act_dtype) {
  return Int4GemmFunction::apply(x, qweight, scales, zeros, group_starts, perm, out_features,
                                 layout, bias, act_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(bitpress, Autograd, m) { m.impl("int4_gemm", &int4_gemm_autograd); }

}  // namespace bitpress
