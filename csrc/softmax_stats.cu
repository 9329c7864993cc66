// Forward statistics of log-softmax(h Wᵀ / τ) for one or two models, one vocabulary chunk at a time.
//
// The chunk's fp32 logits come from cuBLAS (torch.mm in opd_fast/backends/cuda_backend.py); these
// kernels are the epilogue. Grid: one block of kThreads per token row (row i at zs + i · ld_s: the tiles may
// be views of a padded workspace). Each thread folds its columns, read as 16-byte vectors (epilogue.h:
// walk_row), into an online-softmax state (epilogue.h: PairAcc), the block reduces the states, and
// thread 0 merges the result into the row's running state from earlier chunks. Only O(N) numbers
// persist between chunks; the terms of JSD, the skew KLs and TVD need the final log-sum-exps and take a second
// sweep (terms_kernel, one instantiation per mode). Given an entropy state, the same read also merges the student's
// entropy statistics (m, s, Σ e^{z−m}(z − m)) into it: the instantiations with kWithEntropy, one more accumulator
// per thread and one FMA per student logit; the others are the plain statistics kernels, unchanged.
#include "block.cuh"
#include "launchers.h"

namespace opd_fast {
namespace {

// entropy: [3, N] (m, s, a) of the student when kWithEntropy, else unused (null).
template <int kMode, bool kWithEntropy>
__global__ void __launch_bounds__(kThreads)
    softmax_stats_kernel(const float* __restrict__ zs, int64_t ld_s, const float* __restrict__ zt, int64_t ld_t,
                         const int64_t* __restrict__ ids, float* __restrict__ state, int64_t n_rows, int64_t width,
                         int64_t v_lo, Head hs, Head ht, float* __restrict__ entropy) {
  __shared__ StatsScratch<kWithEntropy> scratch[kThreads];
  const int64_t i_n = blockIdx.x;  // int64: N · ld exceeds int32 for real shapes
  const int64_t y_col = kMode == kTokenLogprob ? token_column(ids, i_n, v_lo, width) : -1;
  row_softmax_stats<kMode, kWithEntropy>(BlockGroup(), zs + i_n * ld_s, two_models(kMode) ? zt + i_n * ld_t : nullptr,
                                         width, y_col, hs, ht, state + i_n, n_rows,
                                         kWithEntropy ? entropy + i_n : nullptr, scratch);
}

// The statistics launcher's arguments.
struct StatsArgs {
  const float* zs;
  int64_t ld_s;
  const float* zt;
  int64_t ld_t;
  const int64_t* ids;
  float* state;
  int64_t n_rows, width, v_lo;
  Head hs, ht;
  float* entropy;
};

template <int kMode>
void launch_stats(const StatsArgs& a, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(a.n_rows));
  if (a.entropy != nullptr) {
    softmax_stats_kernel<kMode, true><<<grid, kThreads, 0, s>>>(a.zs, a.ld_s, a.zt, a.ld_t, a.ids, a.state, a.n_rows,
                                                                a.width, a.v_lo, a.hs, a.ht, a.entropy);
  } else {
    softmax_stats_kernel<kMode, false><<<grid, kThreads, 0, s>>>(a.zs, a.ld_s, a.zt, a.ld_t, a.ids, a.state,
                                                                 a.n_rows, a.width, a.v_lo, a.hs, a.ht, nullptr);
  }
}

template <int kMode>
__global__ void __launch_bounds__(kThreads)
    terms_kernel(const float* __restrict__ zs, int64_t ld_s, const float* __restrict__ zt, int64_t ld_t,
                 const float* __restrict__ lse_s, const float* __restrict__ lse_t, float* __restrict__ terms,
                 int64_t n_rows, int64_t width, Head hs, Head ht, float beta) {
  __shared__ Sum3 scratch[kThreads];
  const int64_t i_n = blockIdx.x;
  row_divergence_terms<kMode>(BlockGroup(), zs + i_n * ld_s, zt + i_n * ld_t, width, hs, ht,
                              row_lse(lse_s, i_n, n_rows), row_lse(lse_t, i_n, n_rows), beta, terms + i_n, n_rows,
                              scratch);
}

}  // namespace

const char* launch_softmax_stats_update(const float* zs, int64_t ld_s, const float* zt, int64_t ld_t,
                                        const int64_t* ids, float* state, int64_t n_rows, int64_t width, int64_t v_lo,
                                        Head hs, Head ht, int mode, float* entropy, std::intptr_t stream) {
  if (const char* error = check_row_stride(ld_s, width, n_rows)) return error;
  if (two_models(mode)) {
    if (const char* error = check_row_stride(ld_t, width, n_rows)) return error;
  }
  if (n_rows == 0) return nullptr;
  const StatsArgs a = {zs, ld_s, zt, ld_t, ids, state, n_rows, width, v_lo, hs, ht, entropy};
  const cudaStream_t s = as_stream(stream);
  switch (mode) {
    case kReverseKL:
      launch_stats<kReverseKL>(a, s);
      break;
    case kForwardKL:
      launch_stats<kForwardKL>(a, s);
      break;
    // The terms modes share one statistics pass (each model's online (m, s)): JSD's instantiation.
    case kJSD:
    case kSkewForwardKL:
    case kSkewReverseKL:
    case kTVD:
      launch_stats<kJSD>(a, s);
      break;
    case kTokenLogprob:
      launch_stats<kTokenLogprob>(a, s);
      break;
    case kLogSumExp:
      launch_stats<kLogSumExp>(a, s);
      break;
    default:
      return "unknown mode";
  }
  return launch_status();
}

const char* launch_terms_update(const float* zs, int64_t ld_s, const float* zt, int64_t ld_t, const float* lse_s,
                                const float* lse_t, float* terms, int64_t n_rows, int64_t width, Head hs, Head ht,
                                float beta, int mode, std::intptr_t stream) {
  if (const char* error = check_row_stride(ld_s, width, n_rows)) return error;
  if (const char* error = check_row_stride(ld_t, width, n_rows)) return error;
  if (n_rows == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>(n_rows));
  const cudaStream_t s = as_stream(stream);
  switch (mode) {
    case kJSD:
      terms_kernel<kJSD><<<grid, kThreads, 0, s>>>(zs, ld_s, zt, ld_t, lse_s, lse_t, terms, n_rows, width, hs, ht, beta);
      break;
    case kSkewForwardKL:
      terms_kernel<kSkewForwardKL><<<grid, kThreads, 0, s>>>(zs, ld_s, zt, ld_t, lse_s, lse_t, terms, n_rows, width,
                                                             hs, ht, beta);
      break;
    case kSkewReverseKL:
      terms_kernel<kSkewReverseKL><<<grid, kThreads, 0, s>>>(zs, ld_s, zt, ld_t, lse_s, lse_t, terms, n_rows, width,
                                                             hs, ht, beta);
      break;
    case kTVD:
      terms_kernel<kTVD><<<grid, kThreads, 0, s>>>(zs, ld_s, zt, ld_t, lse_s, lse_t, terms, n_rows, width, hs, ht, beta);
      break;
    default:
      return "mode has no terms pass";
  }
  return launch_status();
}

}  // namespace opd_fast
