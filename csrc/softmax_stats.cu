// Forward statistics of log-softmax(h Wᵀ / τ) for one or two models, one vocabulary chunk at a time.
//
// The chunk's fp32 logits come from cuBLAS (torch.mm in opd_fast/backends/cuda_backend.py); these
// kernels are the epilogue. Grid: one block of kThreads per token row. Each thread folds its strided
// columns into an online-softmax state (epilogue.h: PairAcc), the block reduces the states, and
// thread 0 merges the result into the row's running state from earlier chunks. Only O(N) numbers
// persist between chunks; the JSD terms need the final log-sum-exps and take a second sweep.
#include "block.cuh"
#include "launchers.h"

namespace opd_fast {
namespace {

template <int kMode>
__global__ void __launch_bounds__(kThreads)
    softmax_stats_kernel(const float* zs, const float* zt, const int64_t* ids, float* state, int64_t n_rows,
                         int64_t width, int64_t v_lo, Head hs, Head ht) {
  __shared__ PairAcc scratch[kThreads];
  const int64_t i_n = blockIdx.x;
  const int64_t o_row = i_n * width;  // int64: N · width exceeds int32 for real shapes
  const int64_t y_col = kMode == kTokenLogprob ? token_column(ids, i_n, v_lo, width) : -1;
  row_softmax_stats<kMode>(BlockGroup(), zs + o_row, two_models(kMode) ? zt + o_row : nullptr, width, y_col, hs, ht,
                           state + i_n, n_rows, scratch);
}

__global__ void __launch_bounds__(kThreads)
    jsd_terms_kernel(const float* zs, const float* zt, const float* lse_s, const float* lse_t, float* terms,
                     int64_t n_rows, int64_t width, Head hs, Head ht, float beta) {
  __shared__ Sum3 scratch[kThreads];
  const int64_t i_n = blockIdx.x;
  const int64_t o_row = i_n * width;
  row_jsd_terms(BlockGroup(), zs + o_row, zt + o_row, width, hs, ht, row_lse(lse_s, i_n, n_rows),
                row_lse(lse_t, i_n, n_rows), beta, terms + i_n, n_rows, scratch);
}

}  // namespace

const char* launch_softmax_stats_update(const float* zs, const float* zt, const int64_t* ids, float* state,
                                        int64_t n_rows, int64_t width, int64_t v_lo, Head hs, Head ht, int mode,
                                        std::intptr_t stream) {
  if (n_rows == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>(n_rows));
  const cudaStream_t s = as_stream(stream);
  switch (mode) {
    case kReverseKL:
      softmax_stats_kernel<kReverseKL><<<grid, kThreads, 0, s>>>(zs, zt, ids, state, n_rows, width, v_lo, hs, ht);
      break;
    case kForwardKL:
      softmax_stats_kernel<kForwardKL><<<grid, kThreads, 0, s>>>(zs, zt, ids, state, n_rows, width, v_lo, hs, ht);
      break;
    case kJSD:
      softmax_stats_kernel<kJSD><<<grid, kThreads, 0, s>>>(zs, zt, ids, state, n_rows, width, v_lo, hs, ht);
      break;
    case kTokenLogprob:
      softmax_stats_kernel<kTokenLogprob><<<grid, kThreads, 0, s>>>(zs, zt, ids, state, n_rows, width, v_lo, hs, ht);
      break;
    case kLogSumExp:
      softmax_stats_kernel<kLogSumExp><<<grid, kThreads, 0, s>>>(zs, zt, ids, state, n_rows, width, v_lo, hs, ht);
      break;
    default:
      return "unknown mode";
  }
  return launch_status();
}

const char* launch_jsd_terms_update(const float* zs, const float* zt, const float* lse_s, const float* lse_t,
                                    float* terms, int64_t n_rows, int64_t width, Head hs, Head ht, float beta,
                                    std::intptr_t stream) {
  if (n_rows == 0) return nullptr;
  jsd_terms_kernel<<<dim3(static_cast<unsigned>(n_rows)), kThreads, 0, as_stream(stream)>>>(
      zs, zt, lse_s, lse_t, terms, n_rows, width, hs, ht, beta);
  return launch_status();
}

}  // namespace opd_fast
