// pybind11 bindings of opd_fast._C: argument checks, then the raw launchers of launchers.h.
//
// Every check names the op and the argument and says how to fix it. The [N, width] tiles may be views with a
// padded row stride (check_rows); the launchers take each tile's row stride. Python (opd_fast/backends/
// cuda_backend.py) calls these functions with the current CUDA stream as an integer, so nothing here needs CUDA or
// torch-CUDA headers.
//
// Built with -DOPD_FAST_HOST_BUILD (and csrc/host/launchers_host.cpp instead of the .cu files) the same
// bindings take CPU tensors: that host build lets the tests run this code and the epilogue math on
// machines without a GPU.
#include <ATen/core/Tensor.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "epilogue.h"
#include "launchers.h"

namespace opd_fast {
namespace {

#ifdef OPD_FAST_HOST_BUILD
constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
#else
constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
#endif

// One grid block per token row: the row count is bounded by gridDim.x.
constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();

using OptionalTensor = std::optional<at::Tensor>;

void check_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                  const std::vector<int64_t>& shape, const at::Device& device) {
  TORCH_CHECK(t.device().type() == kDevice, "opd_fast._C.", op, ": ", name, " must be a ", kDevice,
              " tensor, got one on ", t.device(), "; move it with .to(", device, ")");
  TORCH_CHECK(t.device() == device, "opd_fast._C.", op, ": ", name, " is on ", t.device(), " but the chunk is on ",
              device, "; put every argument on the same device");
  TORCH_CHECK(t.scalar_type() == dtype, "opd_fast._C.", op, ": ", name, " must be ", dtype, ", got ", t.scalar_type(),
              "; cast it with .to(", dtype, ")");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "opd_fast._C.", op, ": ", name, " must have shape ",
              at::IntArrayRef(shape), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "opd_fast._C.", op, ": ", name, " must be contiguous; pass ", name,
              ".contiguous()");
}

const at::Tensor& required(const char* op, const char* name, const OptionalTensor& t, const std::string& when) {
  TORCH_CHECK(t.has_value(), "opd_fast._C.", op, ": ", name, " is required ", when, ", got None");
  return *t;
}

constexpr const char* kTwoModelModes =
    "in two-model modes (reverse_kl, forward_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd)";

// A [N, width] tile (logits or gradient): row-major with unit column stride and a row stride >= width, so a view
// of the first columns of a padded buffer passes as is. Returns the row stride in elements (launchers.h: ld).
int64_t check_rows(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t n,
                   int64_t width, const at::Device& device) {
  TORCH_CHECK(t.device().type() == kDevice, "opd_fast._C.", op, ": ", name, " must be a ", kDevice,
              " tensor, got one on ", t.device(), "; move it with .to(", device, ")");
  TORCH_CHECK(t.device() == device, "opd_fast._C.", op, ": ", name, " is on ", t.device(), " but the chunk is on ",
              device, "; put every argument on the same device");
  TORCH_CHECK(t.scalar_type() == dtype, "opd_fast._C.", op, ": ", name, " must be ", dtype, ", got ", t.scalar_type(),
              "; cast it with .to(", dtype, ")");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == width, "opd_fast._C.", op, ": ", name,
              " must have shape [", n, ", ", width, "], got ", t.sizes());
  const bool unit_columns = width <= 1 || t.stride(1) == 1, rows_apart = n <= 1 || t.stride(0) >= width;
  TORCH_CHECK(unit_columns && rows_apart, "opd_fast._C.", op, ": ", name,
              " must be row-major with unit column stride and a row stride >= its width (a [N, width] view of a "
              "padded buffer is fine), got strides ",
              t.strides(), "; pass ", name, ".contiguous()");
  return n <= 1 ? width : t.stride(0);
}

// The fp32 [N, width] logits chunk every op starts from (named `name`); returns (N, width, row stride).
std::tuple<int64_t, int64_t, int64_t> check_chunk(const char* op, const char* name, const at::Tensor& z) {
  TORCH_CHECK(z.device().type() == kDevice, "opd_fast._C.", op, ": ", name, " must be a ", kDevice,
              " tensor, got one on ", z.device());
  TORCH_CHECK(z.dim() == 2, "opd_fast._C.", op, ": ", name, " must be 2-D [N, width] logits, got shape ", z.sizes());
  const int64_t ld = check_rows(op, name, z, at::kFloat, z.size(0), z.size(1), z.device());
  TORCH_CHECK(z.size(0) <= kMaxRows, "opd_fast._C.", op, ": at most ", kMaxRows, " token rows per call, got ",
              z.size(0), "; split the tokens into several calls");
  return {z.size(0), z.size(1), ld};
}

// The op codes' names (epilogue.h: Mode; opd_fast.backends.epilogue.MODES), exported as _C.MODES.
constexpr const char* kModeNames[] = {"reverse_kl", "forward_kl",    "jsd",       "skew_forward_kl", "skew_reverse_kl",
                                      "tvd",        "token_logprob", "logsumexp", "entropy"};
static_assert(sizeof(kModeNames) / sizeof(kModeNames[0]) == kEntropy + 1, "a name for every Mode");

void check_mode(const char* op, int64_t mode) {
  TORCH_CHECK(mode >= kReverseKL && mode <= kEntropy, "opd_fast._C.", op,
              ": mode must be 0 (reverse_kl), 1 (forward_kl), 2 (jsd), 3 (skew_forward_kl), 4 (skew_reverse_kl), "
              "5 (tvd), 6 (token_logprob), 7 (logsumexp) or 8 (entropy), got ",
              mode);
}

// "in <mode> mode", for the messages of arguments only some modes read.
std::string in_mode(int64_t mode) { return std::string("in ") + kModeNames[mode] + " mode"; }

// β is the teacher's weight in the mixture m = β p_t + (1 − β) p_s of jsd and the skew KLs; tvd and the KLs ignore
// it. The spec (opd_fast._validation) turns the ends into the divergences they are.
void check_beta(const char* op, int64_t mode, double beta) {
  if (!has_terms(static_cast<int>(mode)) || mode == kTVD) return;
  TORCH_CHECK(beta > 0 && beta < 1, "opd_fast._C.", op, ": beta must be in (0, 1) ", in_mode(mode),
              " (the teacher's weight in the mixture beta p_t + (1 - beta) p_s; the API maps the ends to other "
              "divergences), got ",
              beta);
}

// A model's output head from Python: its bias for the chunk's columns (fp32 [width] or None) and the
// scalars (pre, softcap, post) of epilogue.h's Head, softcap 0 meaning none and post = 1 / temperature.
Head make_head(const char* op, const char* name, const OptionalTensor& bias, const std::vector<double>& scalars,
               int64_t width, const at::Device& device) {
  TORCH_CHECK(scalars.size() == 3, "opd_fast._C.", op, ": ", name,
              " must be [pre, softcap, post] (the head's scale, its softcap or 0, 1 / temperature), got ",
              scalars.size(), " numbers");
  const double pre = scalars[0], softcap = scalars[1], post = scalars[2];
  TORCH_CHECK(std::isfinite(pre) && pre > 0, "opd_fast._C.", op, ": ", name, "'s scale must be finite and > 0, got ",
              pre);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "opd_fast._C.", op, ": ", name,
              "'s softcap must be finite and > 0, or 0 for none, got ", softcap);
  TORCH_CHECK(std::isfinite(post) && post > 0, "opd_fast._C.", op, ": ", name,
              "'s post-scale (1 / temperature) must be finite and > 0, got ", post);
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    check_tensor(op, "bias", *bias, at::kFloat, {width}, device);
    bias_ptr = bias->data_ptr<float>();
  }
  return Head{bias_ptr, static_cast<float>(pre), static_cast<float>(softcap), static_cast<float>(post)};
}

void check_launch(const char* op, const char* error) {
  TORCH_CHECK(error == nullptr, "opd_fast._C.", op, ": kernel launch failed: ", error);
}

void softmax_stats_update(const at::Tensor& zs, const OptionalTensor& zt, const OptionalTensor& ids, at::Tensor& state,
                          int64_t v_lo, int64_t mode, const OptionalTensor& bias_s, const std::vector<double>& head_s,
                          const OptionalTensor& bias_t, const std::vector<double>& head_t,
                          const OptionalTensor& entropy, int64_t stream) {
  const char* op = "softmax_stats_update";
  const auto [n, width, ld_s] = check_chunk(op, "zs", zs);
  check_mode(op, mode);
  TORCH_CHECK(mode != kEntropy, "opd_fast._C.", op,
              ": mode 8 (entropy) has only a gradient pass; the student's entropy statistics come with any other "
              "mode's statistics (pass the entropy state as `entropy`)");
  const Head hs = make_head(op, "head_s", bias_s, head_s, width, zs.device());
  const Head ht = make_head(op, "head_t", bias_t, head_t, width, zs.device());
  TORCH_CHECK(v_lo >= 0, "opd_fast._C.", op, ": v_lo (first vocabulary column of the chunk) must be >= 0, got ", v_lo);
  const float* zt_ptr = nullptr;
  int64_t ld_t = width;
  if (two_models(static_cast<int>(mode))) {
    const at::Tensor& t = required(op, "zt", zt, kTwoModelModes);
    ld_t = check_rows(op, "zt", t, at::kFloat, n, width, zs.device());
    zt_ptr = t.data_ptr<float>();
  }
  const int64_t* ids_ptr = nullptr;
  if (mode == kTokenLogprob) {
    const at::Tensor& t = required(op, "ids", ids, "in token_logprob mode");
    check_tensor(op, "ids", t, at::kLong, {n}, zs.device());
    ids_ptr = t.data_ptr<int64_t>();
  }
  check_tensor(op, "state", state, at::kFloat, {5, n}, zs.device());
  float* entropy_ptr = nullptr;  // the student's (m, s, a), merged in the same read when given
  if (entropy.has_value()) {
    check_tensor(op, "entropy", *entropy, at::kFloat, {3, n}, zs.device());
    entropy_ptr = entropy->data_ptr<float>();
  }
  check_launch(op, launch_softmax_stats_update(zs.data_ptr<float>(), ld_s, zt_ptr, ld_t, ids_ptr,
                                               state.data_ptr<float>(), n, width, v_lo, hs, ht, static_cast<int>(mode),
                                               entropy_ptr, static_cast<std::intptr_t>(stream)));
}

void terms_update(const at::Tensor& zs, const at::Tensor& zt, const at::Tensor& lse_s, const at::Tensor& lse_t,
                  at::Tensor& terms, int64_t mode, double beta, const OptionalTensor& bias_s,
                  const std::vector<double>& head_s, const OptionalTensor& bias_t, const std::vector<double>& head_t,
                  int64_t stream) {
  const char* op = "terms_update";
  const auto [n, width, ld_s] = check_chunk(op, "zs", zs);
  TORCH_CHECK(has_terms(static_cast<int>(mode)), "opd_fast._C.", op,
              ": mode must be 2 (jsd), 3 (skew_forward_kl), 4 (skew_reverse_kl) or 5 (tvd), the divergences with a "
              "terms pass, got ",
              mode);
  check_beta(op, mode, beta);
  const Head hs = make_head(op, "head_s", bias_s, head_s, width, zs.device());
  const Head ht = make_head(op, "head_t", bias_t, head_t, width, zs.device());
  const int64_t ld_t = check_rows(op, "zt", zt, at::kFloat, n, width, zs.device());
  check_tensor(op, "lse_s", lse_s, at::kFloat, {2, n}, zs.device());
  check_tensor(op, "lse_t", lse_t, at::kFloat, {2, n}, zs.device());
  check_tensor(op, "terms", terms, at::kFloat, {3, n}, zs.device());
  check_launch(op, launch_terms_update(zs.data_ptr<float>(), ld_s, zt.data_ptr<float>(), ld_t, lse_s.data_ptr<float>(),
                                       lse_t.data_ptr<float>(), terms.data_ptr<float>(), n, width, hs, ht,
                                       static_cast<float>(beta), static_cast<int>(mode),
                                       static_cast<std::intptr_t>(stream)));
}

int grad_dtype_code(const char* op, const at::Tensor& g) {
  const at::ScalarType dtype = g.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "opd_fast._C.", op,
              ": g must be float32, bfloat16 or float16 (the student weight's dtype), got ", dtype);
  return dtype == at::kFloat ? kGradFloat32 : dtype == at::kBFloat16 ? kGradBFloat16 : kGradFloat16;
}

void logit_grad(at::Tensor& zs, const OptionalTensor& zt, const OptionalTensor& ids, const at::Tensor& lse_s,
                const OptionalTensor& lse_t, const OptionalTensor& loss, const OptionalTensor& center,
                const at::Tensor& row_weight, const OptionalTensor& g, int64_t v_lo, double beta, int64_t mode,
                const OptionalTensor& bias_s, const std::vector<double>& head_s, const OptionalTensor& bias_t,
                const std::vector<double>& head_t, int64_t stream) {
  const char* op = "logit_grad";
  const auto [n, width, ld_s] = check_chunk(op, "zs", zs);
  check_mode(op, mode);
  check_beta(op, mode, beta);
  const Head hs = make_head(op, "head_s", bias_s, head_s, width, zs.device());
  const Head ht = make_head(op, "head_t", bias_t, head_t, width, zs.device());
  TORCH_CHECK(v_lo >= 0, "opd_fast._C.", op, ": v_lo (first vocabulary column of the chunk) must be >= 0, got ", v_lo);
  const auto vec = [&](const char* name, const OptionalTensor& t) {
    const at::Tensor& r = required(op, name, t, in_mode(mode));
    check_tensor(op, name, r, at::kFloat, {n}, zs.device());
    return r.data_ptr<float>();
  };
  check_tensor(op, "lse_s", lse_s, at::kFloat, {2, n}, zs.device());
  check_tensor(op, "row_weight", row_weight, at::kFloat, {n}, zs.device());
  const float* zt_ptr = nullptr;
  int64_t ld_t = width;
  const float* lse_t_ptr = nullptr;
  if (two_models(static_cast<int>(mode))) {
    const at::Tensor& t = required(op, "zt", zt, kTwoModelModes);
    ld_t = check_rows(op, "zt", t, at::kFloat, n, width, zs.device());
    zt_ptr = t.data_ptr<float>();
    const at::Tensor& lse = required(op, "lse_t", lse_t, kTwoModelModes);
    check_tensor(op, "lse_t", lse, at::kFloat, {2, n}, zs.device());
    lse_t_ptr = lse.data_ptr<float>();
  }
  const float* loss_ptr = mode == kReverseKL ? vec("loss", loss) : nullptr;
  const float* center_ptr = reads_center(static_cast<int>(mode)) ? vec("center", center) : nullptr;
  const int64_t* ids_ptr = nullptr;
  if (mode == kTokenLogprob) {
    const at::Tensor& t = required(op, "ids", ids, "in token_logprob mode");
    check_tensor(op, "ids", t, at::kLong, {n}, zs.device());
    ids_ptr = t.data_ptr<int64_t>();
  }
  void* g_ptr = zs.data_ptr();  // no g: the gradient overwrites the fp32 logits in place
  int64_t ld_g = ld_s;
  int g_dtype = kGradFloat32;
  if (g.has_value()) {
    g_dtype = grad_dtype_code(op, *g);
    ld_g = check_rows(op, "g", *g, g->scalar_type(), n, width, zs.device());
    g_ptr = g->data_ptr();
  }
  check_launch(op, launch_logit_grad(zs.data_ptr<float>(), ld_s, zt_ptr, ld_t, ids_ptr, lse_s.data_ptr<float>(),
                                     lse_t_ptr, loss_ptr, center_ptr, row_weight.data_ptr<float>(), g_ptr, ld_g,
                                     g_dtype, n, width, v_lo, hs, ht, static_cast<float>(beta), static_cast<int>(mode),
                                     static_cast<std::intptr_t>(stream)));
}

int64_t check_keys(const char* op, const at::Tensor& keys, int64_t n, const at::Device& device) {
  TORCH_CHECK(keys.dim() == 2, "opd_fast._C.", op, ": keys must be 2-D [N, k] (packed top-k keys), got shape ",
              keys.sizes());
  const int64_t k = keys.size(1);
  TORCH_CHECK(k >= 1 && k <= kMaxTopK, "opd_fast._C.", op, ": k (keys.shape[1]) must be in [1, ", kMaxTopK, "], got ",
              k, "; longer top-k lists are computed by the torch backend");
  check_tensor(op, "keys", keys, at::kLong, {n, k}, device);
  return k;
}

void topk_update(const at::Tensor& z, at::Tensor& keys, at::Tensor& state, int64_t v_lo, const OptionalTensor& bias,
                 const std::vector<double>& head_scalars, int64_t stream) {
  const char* op = "topk_update";
  const auto [n, width, ld] = check_chunk(op, "z", z);
  const Head head = make_head(op, "head", bias, head_scalars, width, z.device());
  TORCH_CHECK(v_lo >= 0, "opd_fast._C.", op, ": v_lo (first vocabulary column of the chunk) must be >= 0, got ", v_lo);
  TORCH_CHECK(v_lo + width <= std::numeric_limits<int32_t>::max(), "opd_fast._C.", op,
              ": token ids must fit in 31 bits (packed keys), got a chunk ending at column ", v_lo + width);
  const int64_t k = check_keys(op, keys, n, z.device());
  check_tensor(op, "state", state, at::kFloat, {3, n}, z.device());
  // int64 storage holds the unsigned key bits unchanged: only the kernels interpret them.
  check_launch(op, launch_topk_update(z.data_ptr<float>(), ld, reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()),
                                      state.data_ptr<float>(), n, width, v_lo, k, head,
                                      static_cast<std::intptr_t>(stream)));
}

void topk_finalize(const at::Tensor& keys, const at::Tensor& state, at::Tensor& ids, at::Tensor& logprobs,
                   at::Tensor& lse, at::Tensor& entropy, int64_t stream) {
  const char* op = "topk_finalize";
  TORCH_CHECK(keys.device().type() == kDevice, "opd_fast._C.", op, ": keys must be a ", kDevice,
              " tensor, got one on ", keys.device());
  TORCH_CHECK(keys.dim() == 2, "opd_fast._C.", op, ": keys must be 2-D [N, k], got shape ", keys.sizes());
  const int64_t n = keys.size(0);
  const int64_t k = check_keys(op, keys, n, keys.device());
  check_tensor(op, "state", state, at::kFloat, {3, n}, keys.device());
  check_tensor(op, "ids", ids, at::kLong, {n, k}, keys.device());
  check_tensor(op, "logprobs", logprobs, at::kFloat, {n, k}, keys.device());
  check_tensor(op, "lse", lse, at::kFloat, {n}, keys.device());
  check_tensor(op, "entropy", entropy, at::kFloat, {n}, keys.device());
  check_launch(op, launch_topk_finalize(reinterpret_cast<const uint64_t*>(keys.data_ptr<int64_t>()),
                                        state.data_ptr<float>(), ids.data_ptr<int64_t>(), logprobs.data_ptr<float>(),
                                        lse.data_ptr<float>(), entropy.data_ptr<float>(), n, k,
                                        static_cast<std::intptr_t>(stream)));
}

}  // namespace
}  // namespace opd_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "opd_fast fused epilogue kernels (see csrc/README.md); called through opd_fast.backends.cuda_backend";
  m.attr("MAX_TOPK") = opd_fast::kMaxTopK;
  m.attr("HOST_BUILD") = opd_fast::kDevice == c10::DeviceType::CPU;
  py::dict modes;
  for (int mode = 0; mode <= opd_fast::kEntropy; ++mode) modes[opd_fast::kModeNames[mode]] = mode;
  m.attr("MODES") = modes;  // must equal opd_fast.backends.epilogue.MODES
  m.def("softmax_stats_update", &opd_fast::softmax_stats_update, py::arg("zs"), py::arg("zt"), py::arg("ids"),
        py::arg("state"), py::arg("v_lo"), py::arg("mode"), py::arg("bias_s"), py::arg("head_s"), py::arg("bias_t"),
        py::arg("head_t"), py::arg("entropy"), py::arg("stream"),
        "Merge the chunk's online-softmax statistics into state [5, N] and, when entropy [3, N] is given, the "
        "student's entropy statistics (m, s, a) into it.");
  m.def("terms_update", &opd_fast::terms_update, py::arg("zs"), py::arg("zt"), py::arg("lse_s"), py::arg("lse_t"),
        py::arg("terms"), py::arg("mode"), py::arg("beta"), py::arg("bias_s"), py::arg("head_s"), py::arg("bias_t"),
        py::arg("head_t"), py::arg("stream"),
        "Add the chunk's divergence terms (jsd, skew KLs, tvd) to terms [3, N].");
  m.def("logit_grad", &opd_fast::logit_grad, py::arg("zs"), py::arg("zt"), py::arg("ids"), py::arg("lse_s"),
        py::arg("lse_t"), py::arg("loss"), py::arg("center"), py::arg("row_weight"), py::arg("g"), py::arg("v_lo"),
        py::arg("beta"), py::arg("mode"), py::arg("bias_s"), py::arg("head_s"), py::arg("bias_t"), py::arg("head_t"),
        py::arg("stream"),
        "Write the chunk's logit gradient into g (or in place into zs when g is None).");
  m.def("topk_update", &opd_fast::topk_update, py::arg("z"), py::arg("keys"), py::arg("state"), py::arg("v_lo"),
        py::arg("bias"), py::arg("head"), py::arg("stream"), "Merge the chunk into the running top-k keys [N, k] and state [3, N].");
  m.def("topk_finalize", &opd_fast::topk_finalize, py::arg("keys"), py::arg("state"), py::arg("ids"),
        py::arg("logprobs"), py::arg("lse"), py::arg("entropy"), py::arg("stream"),
        "Decode the top-k keys into ids and log-probs, with each row's lse and entropy.");
}
