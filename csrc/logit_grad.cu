// Backward epilogue: the logit gradient G of one vocabulary chunk from its recomputed fp32 logits.
//
// Memory plan: the chunk's logits [N, width] come from cuBLAS (row strides ld_s, ld_t: views of a padded
// workspace); this kernel turns them into G = row weight · ∂loss/∂x, x the raw logits (formulas and the head's
// chain rule in epilogue.h), in the student weight's dtype, in place when that is fp32, so that dH += G W_chunk
// and dW_chunk = Gᵀ H follow as two plain GEMMs with fp32 accumulation and one writer per output element
// (deterministic, no atomics). Grid: one block of kThreads per token row, 16-byte vectors of columns strided over
// the threads (coalesced; epilogue.h: walk_row); G is written 4 columns per store where its row is aligned like
// the logits' rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "block.cuh"
#include "launchers.h"

namespace opd_fast {
namespace {

__device__ __forceinline__ void store_value(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_value(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_value(__half* p, float v) { *p = __float2half_rn(v); }

// Four consecutive columns in one store (16 bytes of fp32, 8 of bf16/fp16); p aligned to that size.
struct alignas(8) Bf16x4 {
  __nv_bfloat162 lo, hi;
};
struct alignas(8) Halfx4 {
  __half2 lo, hi;
};
__device__ __forceinline__ void store4(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void store4(__nv_bfloat16* p, float a, float b, float c, float d) {
  *reinterpret_cast<Bf16x4*>(p) = {__floats2bfloat162_rn(a, b), __floats2bfloat162_rn(c, d)};
}
__device__ __forceinline__ void store4(__half* p, float a, float b, float c, float d) {
  *reinterpret_cast<Halfx4*>(p) = {__floats2half2_rn(a, b), __floats2half2_rn(c, d)};
}

// G's row for epilogue.h's row_logit_grad.
template <class T>
struct RowStore {
  T* row;

  __device__ __forceinline__ bool aligned4(int64_t col) const {
    return reinterpret_cast<uintptr_t>(row + col) % (4 * sizeof(T)) == 0;
  }

  template <bool kVector, int kN>
  __device__ __forceinline__ void put(int64_t col, int64_t step, const float (&v)[kN]) const {
    if constexpr (kVector && kN % 4 == 0) {
      OPD_UNROLL
      for (int u = 0; u < kN / 4; ++u) {
        store4(row + col + u * step, v[4 * u], v[4 * u + 1], v[4 * u + 2], v[4 * u + 3]);
      }
    } else {
      OPD_UNROLL
      for (int e = 0; e < kN; ++e) store_value(row + group_column(col, step, e), v[e]);
    }
  }
};

// zs and g are not __restrict__: with fp32 gradients g is zs (the update is in place).
template <int kMode, class T>
__global__ void __launch_bounds__(kThreads)
    logit_grad_kernel(const float* zs, int64_t ld_s, const float* __restrict__ zt, int64_t ld_t,
                      const int64_t* __restrict__ ids, const float* __restrict__ lse_s,
                      const float* __restrict__ lse_t, const float* __restrict__ loss,
                      const float* __restrict__ center, const float* __restrict__ row_weight, T* g, int64_t ld_g,
                      int64_t width, int64_t v_lo, Head hs, Head ht, float beta) {
  const int64_t i_n = blockIdx.x;  // one block per row: gridDim.x = N, the stride of the [2, N] lse arrays
  const bool two = two_models(kMode);
  const GradRow r = {hs,
                     ht,
                     row_lse(lse_s, i_n, gridDim.x),
                     two ? row_lse(lse_t, i_n, gridDim.x) : RowLse{0.f, 0.f},
                     kMode == kTokenLogprob ? token_column(ids, i_n, v_lo, width) : -1,
                     kMode == kReverseKL ? loss[i_n] : 0.f,
                     reads_center(kMode) ? center[i_n] : 0.f,
                     beta,
                     row_weight[i_n]};
  row_logit_grad<kMode>(BlockGroup(), zs + i_n * ld_s, two ? zt + i_n * ld_t : nullptr, width, r,
                        RowStore<T>{g + i_n * ld_g});
}

// The kernel's arguments after the gradient's pointer and dtype.
struct GradArgs {
  const float* zs;
  int64_t ld_s;
  const float* zt;
  int64_t ld_t;
  const int64_t* ids;
  const float *lse_s, *lse_t, *loss, *center, *row_weight;
  int64_t ld_g, n_rows, width, v_lo;
  Head hs, ht;
  float beta;
};

template <int kMode, class T>
void launch_typed(const GradArgs& a, void* g, cudaStream_t s) {
  logit_grad_kernel<kMode, T><<<dim3(static_cast<unsigned>(a.n_rows)), kThreads, 0, s>>>(
      a.zs, a.ld_s, a.zt, a.ld_t, a.ids, a.lse_s, a.lse_t, a.loss, a.center, a.row_weight, static_cast<T*>(g), a.ld_g,
      a.width, a.v_lo, a.hs, a.ht, a.beta);
}

template <int kMode>
const char* launch_mode(const GradArgs& a, void* g, int g_dtype, cudaStream_t s) {
  switch (g_dtype) {
    case kGradFloat32:
      launch_typed<kMode, float>(a, g, s);
      break;
    case kGradBFloat16:
      launch_typed<kMode, __nv_bfloat16>(a, g, s);
      break;
    case kGradFloat16:
      launch_typed<kMode, __half>(a, g, s);
      break;
    default:
      return "unknown gradient dtype";
  }
  return launch_status();
}

}  // namespace

const char* launch_logit_grad(const float* zs, int64_t ld_s, const float* zt, int64_t ld_t, const int64_t* ids,
                              const float* lse_s, const float* lse_t, const float* loss, const float* center,
                              const float* row_weight, void* g, int64_t ld_g, int g_dtype, int64_t n_rows,
                              int64_t width, int64_t v_lo, Head hs, Head ht, float beta, int mode,
                              std::intptr_t stream) {
  if (const char* error = check_row_stride(ld_s, width, n_rows)) return error;
  if (const char* error = check_row_stride(ld_g, width, n_rows)) return error;
  if (two_models(mode)) {
    if (const char* error = check_row_stride(ld_t, width, n_rows)) return error;
  }
  if (n_rows == 0) return nullptr;
  const GradArgs a = {zs, ld_s, zt, ld_t, ids, lse_s, lse_t, loss, center, row_weight, ld_g, n_rows, width, v_lo,
                      hs, ht, beta};
  const cudaStream_t s = as_stream(stream);
  switch (mode) {
    case kReverseKL:
      return launch_mode<kReverseKL>(a, g, g_dtype, s);
    case kForwardKL:
      return launch_mode<kForwardKL>(a, g, g_dtype, s);
    case kJSD:
      return launch_mode<kJSD>(a, g, g_dtype, s);
    case kSkewForwardKL:
      return launch_mode<kSkewForwardKL>(a, g, g_dtype, s);
    case kSkewReverseKL:
      return launch_mode<kSkewReverseKL>(a, g, g_dtype, s);
    case kTVD:
      return launch_mode<kTVD>(a, g, g_dtype, s);
    case kTokenLogprob:
      return launch_mode<kTokenLogprob>(a, g, g_dtype, s);
    case kLogSumExp:
      return launch_mode<kLogSumExp>(a, g, g_dtype, s);
    case kEntropy:
      return launch_mode<kEntropy>(a, g, g_dtype, s);
    default:
      return "unknown mode";
  }
}

}  // namespace opd_fast
