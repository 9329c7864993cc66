// Backward epilogue: the logit gradient G of one vocabulary chunk from its recomputed fp32 logits.
//
// Memory plan: the chunk's logits [N, width] come from cuBLAS; this kernel turns them into
// G = row weight · ∂loss/∂x, x the raw logits (formulas and the head's chain rule in epilogue.h) in the student weight's dtype, in place
// when that is fp32, so that dH += G W_chunk and dW_chunk = Gᵀ H follow as two plain GEMMs with fp32
// accumulation and one writer per output element (deterministic, no atomics). Grid: one block of
// kThreads per token row, columns strided over the threads (coalesced).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "block.cuh"
#include "launchers.h"

namespace opd_fast {
namespace {

__device__ __forceinline__ void store_value(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_value(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_value(__half* p, float v) { *p = __float2half_rn(v); }

template <class T>
struct RowStore {
  T* row;
  __device__ __forceinline__ void operator()(int64_t j, float v) const { store_value(row + j, v); }
};

// zs and g are not __restrict__: with fp32 gradients g is zs (the update is in place).
template <int kMode, class T>
__global__ void __launch_bounds__(kThreads)
    logit_grad_kernel(const float* zs, const float* __restrict__ zt, const int64_t* __restrict__ ids,
                      const float* __restrict__ lse_s, const float* __restrict__ lse_t,
                      const float* __restrict__ loss, const float* __restrict__ center,
                      const float* __restrict__ row_weight, T* g, int64_t width, int64_t v_lo, Head hs, Head ht,
                      float beta) {
  const int64_t i_n = blockIdx.x;  // one block per row: gridDim.x = N, the stride of the [2, N] lse arrays
  const int64_t o_row = i_n * width;  // int64: N · width exceeds int32 for real shapes
  const bool two = two_models(kMode);
  row_logit_grad<kMode>(BlockGroup(), zs + o_row, two ? zt + o_row : nullptr, width,
                        kMode == kTokenLogprob ? token_column(ids, i_n, v_lo, width) : -1, hs, ht,
                        row_lse(lse_s, i_n, gridDim.x), two ? row_lse(lse_t, i_n, gridDim.x) : RowLse{0.f, 0.f},
                        kMode == kReverseKL ? loss[i_n] : 0.f,
                        kMode == kJSD ? center[i_n] : 0.f, beta, row_weight[i_n], RowStore<T>{g + o_row});
}

template <int kMode>
const char* launch_mode(const float* zs, const float* zt, const int64_t* ids, const float* lse_s, const float* lse_t,
                        const float* loss, const float* center, const float* row_weight, void* g, int g_dtype,
                        int64_t n_rows, int64_t width, int64_t v_lo, Head hs, Head ht, float beta, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(n_rows));
  switch (g_dtype) {
    case kGradFloat32:
      logit_grad_kernel<kMode, float><<<grid, kThreads, 0, s>>>(zs, zt, ids, lse_s, lse_t, loss, center, row_weight,
                                                                static_cast<float*>(g), width, v_lo, hs, ht, beta);
      break;
    case kGradBFloat16:
      logit_grad_kernel<kMode, __nv_bfloat16><<<grid, kThreads, 0, s>>>(
          zs, zt, ids, lse_s, lse_t, loss, center, row_weight, static_cast<__nv_bfloat16*>(g), width, v_lo, hs, ht,
          beta);
      break;
    case kGradFloat16:
      logit_grad_kernel<kMode, __half><<<grid, kThreads, 0, s>>>(zs, zt, ids, lse_s, lse_t, loss, center, row_weight,
                                                                 static_cast<__half*>(g), width, v_lo, hs, ht, beta);
      break;
    default:
      return "unknown gradient dtype";
  }
  return launch_status();
}

}  // namespace

const char* launch_logit_grad(const float* zs, const float* zt, const int64_t* ids, const float* lse_s,
                              const float* lse_t, const float* loss, const float* center, const float* row_weight,
                              void* g, int g_dtype, int64_t n_rows, int64_t width, int64_t v_lo, Head hs, Head ht,
                              float beta, int mode, std::intptr_t stream) {
  if (n_rows == 0) return nullptr;
  const cudaStream_t s = as_stream(stream);
  switch (mode) {
    case kReverseKL:
      return launch_mode<kReverseKL>(zs, zt, ids, lse_s, lse_t, loss, center, row_weight, g, g_dtype, n_rows, width,
                                     v_lo, hs, ht, beta, s);
    case kForwardKL:
      return launch_mode<kForwardKL>(zs, zt, ids, lse_s, lse_t, loss, center, row_weight, g, g_dtype, n_rows, width,
                                     v_lo, hs, ht, beta, s);
    case kJSD:
      return launch_mode<kJSD>(zs, zt, ids, lse_s, lse_t, loss, center, row_weight, g, g_dtype, n_rows, width, v_lo,
                               hs, ht, beta, s);
    case kTokenLogprob:
      return launch_mode<kTokenLogprob>(zs, zt, ids, lse_s, lse_t, loss, center, row_weight, g, g_dtype, n_rows,
                                        width, v_lo, hs, ht, beta, s);
    case kLogSumExp:
      return launch_mode<kLogSumExp>(zs, zt, ids, lse_s, lse_t, loss, center, row_weight, g, g_dtype, n_rows, width,
                                     v_lo, hs, ht, beta, s);
    default:
      return "unknown mode";
  }
}

}  // namespace opd_fast
