// Host build of the launchers in launchers.h: the row algorithms of epilogue.h on CPU tensors. It is
// compiled, with bindings.cpp and -DOPD_FAST_HOST_BUILD, into a CPU extension by
// tests/backends/test_cuda_backend.py, so that the epilogue math and the Python driver of the CUDA backend are
// exercised on machines without a GPU. It is not part of opd_fast._C. The stream argument is ignored.
//
// A thread block is emulated by kHostThreads OS threads that share the block's "shared memory" (local
// arrays here) and meet at a std::barrier wherever the GPU code calls __syncthreads. They walk the rows
// one after another, with a barrier between rows (a block boundary). Same code, same synchronization
// as on the GPU, only with kHostThreads threads instead of 256.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "../epilogue.h"
#include "../launchers.h"

namespace opd_fast {
namespace {

constexpr int kHostThreads = 2;  // a power of two, like the GPU's block size

class ThreadGroup {
 public:
  ThreadGroup(int rank, std::barrier<>* barrier) : rank_(rank), barrier_(barrier) {}
  int rank() const { return rank_; }
  int size() const { return kHostThreads; }
  void sync() const { barrier_->arrive_and_wait(); }
  int append(int* count) const { return std::atomic_ref<int>(*count).fetch_add(1); }

 private:
  int rank_;
  std::barrier<>* barrier_;
};

// Runs row(group, i_n) for every row on the emulated block.
template <class Row>
void for_each_row(int64_t n_rows, const Row& row) {
  std::barrier<> barrier(kHostThreads);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < kHostThreads; ++rank) {
    threads.emplace_back([&, rank] {
      const ThreadGroup group(rank, &barrier);
      for (int64_t i_n = 0; i_n < n_rows; ++i_n) {
        row(group, i_n);
        group.sync();
      }
    });
  }
  for (std::thread& t : threads) t.join();
}

// G's row for epilogue.h's row_logit_grad. The vector stores of the GPU are 4-column copies here, taken under
// the same alignment test, so the tests run the same branch.
template <class T>
struct RowStore {
  T* row;

  bool aligned4(int64_t col) const { return reinterpret_cast<uintptr_t>(row + col) % (4 * sizeof(T)) == 0; }

  template <bool kVector, int kN>
  void put(int64_t col, int64_t step, const float (&v)[kN]) const {
    if constexpr (kVector && kN % 4 == 0) {
      for (int u = 0; u < kN / 4; ++u) {
        const T four[4] = {static_cast<T>(v[4 * u]), static_cast<T>(v[4 * u + 1]), static_cast<T>(v[4 * u + 2]),
                           static_cast<T>(v[4 * u + 3])};
        memcpy(row + col + u * step, four, sizeof(four));
      }
    } else {
      for (int e = 0; e < kN; ++e) row[group_column(col, step, e)] = static_cast<T>(v[e]);
    }
  }
};

// The statistics launcher's arguments (entropy: null, or the student's [3, N] entropy state).
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

template <int kMode, bool kWithEntropy>
void stats_rows(const StatsArgs& a) {
  StatsScratch<kWithEntropy> scratch[kHostThreads];
  for_each_row(a.n_rows, [&](const ThreadGroup& g, int64_t i_n) {
    const int64_t y_col = kMode == kTokenLogprob ? token_column(a.ids, i_n, a.v_lo, a.width) : -1;
    row_softmax_stats<kMode, kWithEntropy>(g, a.zs + i_n * a.ld_s, two_models(kMode) ? a.zt + i_n * a.ld_t : nullptr,
                                           a.width, y_col, a.hs, a.ht, a.state + i_n, a.n_rows,
                                           kWithEntropy ? a.entropy + i_n : nullptr, scratch);
  });
}

// The GPU's two instantiations per mode, picked the same way.
template <int kMode>
void stats_mode(const StatsArgs& a) {
  if (a.entropy != nullptr) {
    stats_rows<kMode, true>(a);
  } else {
    stats_rows<kMode, false>(a);
  }
}

// The terms launcher's arguments.
struct TermsArgs {
  const float* zs;
  int64_t ld_s;
  const float* zt;
  int64_t ld_t;
  const float *lse_s, *lse_t;
  float* terms;
  int64_t n_rows, width;
  Head hs, ht;
  float beta;
};

template <int kMode>
void terms_rows(const TermsArgs& a) {
  Sum3 scratch[kHostThreads];
  for_each_row(a.n_rows, [&](const ThreadGroup& g, int64_t i_n) {
    row_divergence_terms<kMode>(g, a.zs + i_n * a.ld_s, a.zt + i_n * a.ld_t, a.width, a.hs, a.ht,
                                row_lse(a.lse_s, i_n, a.n_rows), row_lse(a.lse_t, i_n, a.n_rows), a.beta,
                                a.terms + i_n, a.n_rows, scratch);
  });
}

// The logit_grad launcher's arguments after the gradient's pointer and dtype.
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
void grad_rows(const GradArgs& a, T* g) {
  const bool two = two_models(kMode);
  for_each_row(a.n_rows, [&](const ThreadGroup& group, int64_t i_n) {
    const GradRow r = {a.hs,
                       a.ht,
                       row_lse(a.lse_s, i_n, a.n_rows),
                       two ? row_lse(a.lse_t, i_n, a.n_rows) : RowLse{0.f, 0.f},
                       kMode == kTokenLogprob ? token_column(a.ids, i_n, a.v_lo, a.width) : -1,
                       kMode == kReverseKL ? a.loss[i_n] : 0.f,
                       reads_center(kMode) ? a.center[i_n] : 0.f,
                       a.beta,
                       a.row_weight[i_n]};
    row_logit_grad<kMode>(group, a.zs + i_n * a.ld_s, two ? a.zt + i_n * a.ld_t : nullptr, a.width, r,
                          RowStore<T>{g + i_n * a.ld_g});
  });
}

template <int kMode>
const char* grad_mode(const GradArgs& a, void* g, int g_dtype) {
  switch (g_dtype) {
    case kGradFloat32:
      grad_rows<kMode>(a, static_cast<float*>(g));
      return nullptr;
    case kGradBFloat16:
      grad_rows<kMode>(a, static_cast<c10::BFloat16*>(g));
      return nullptr;
    case kGradFloat16:
      grad_rows<kMode>(a, static_cast<c10::Half*>(g));
      return nullptr;
    default:
      return "unknown gradient dtype";
  }
}

}  // namespace

const char* launch_softmax_stats_update(const float* zs, int64_t ld_s, const float* zt, int64_t ld_t,
                                        const int64_t* ids, float* state, int64_t n_rows, int64_t width, int64_t v_lo,
                                        Head hs, Head ht, int mode, float* entropy, std::intptr_t) {
  if (const char* error = check_row_stride(ld_s, width, n_rows)) return error;
  if (two_models(mode)) {
    if (const char* error = check_row_stride(ld_t, width, n_rows)) return error;
  }
  const StatsArgs a = {zs, ld_s, zt, ld_t, ids, state, n_rows, width, v_lo, hs, ht, entropy};
  switch (mode) {
    case kReverseKL:
      stats_mode<kReverseKL>(a);
      return nullptr;
    case kForwardKL:
      stats_mode<kForwardKL>(a);
      return nullptr;
    case kJSD:  // the terms modes share JSD's statistics pass, as on the GPU
    case kSkewForwardKL:
    case kSkewReverseKL:
    case kTVD:
      stats_mode<kJSD>(a);
      return nullptr;
    case kTokenLogprob:
      stats_mode<kTokenLogprob>(a);
      return nullptr;
    case kLogSumExp:
      stats_mode<kLogSumExp>(a);
      return nullptr;
    default:
      return "unknown mode";
  }
}

const char* launch_terms_update(const float* zs, int64_t ld_s, const float* zt, int64_t ld_t, const float* lse_s,
                                const float* lse_t, float* terms, int64_t n_rows, int64_t width, Head hs, Head ht,
                                float beta, int mode, std::intptr_t) {
  if (const char* error = check_row_stride(ld_s, width, n_rows)) return error;
  if (const char* error = check_row_stride(ld_t, width, n_rows)) return error;
  const TermsArgs a = {zs, ld_s, zt, ld_t, lse_s, lse_t, terms, n_rows, width, hs, ht, beta};
  switch (mode) {
    case kJSD:
      terms_rows<kJSD>(a);
      return nullptr;
    case kSkewForwardKL:
      terms_rows<kSkewForwardKL>(a);
      return nullptr;
    case kSkewReverseKL:
      terms_rows<kSkewReverseKL>(a);
      return nullptr;
    case kTVD:
      terms_rows<kTVD>(a);
      return nullptr;
    default:
      return "mode has no terms pass";
  }
}

const char* launch_logit_grad(const float* zs, int64_t ld_s, const float* zt, int64_t ld_t, const int64_t* ids,
                              const float* lse_s, const float* lse_t, const float* loss, const float* center,
                              const float* row_weight, void* g, int64_t ld_g, int g_dtype, int64_t n_rows,
                              int64_t width, int64_t v_lo, Head hs, Head ht, float beta, int mode, std::intptr_t) {
  if (const char* error = check_row_stride(ld_s, width, n_rows)) return error;
  if (const char* error = check_row_stride(ld_g, width, n_rows)) return error;
  if (two_models(mode)) {
    if (const char* error = check_row_stride(ld_t, width, n_rows)) return error;
  }
  const GradArgs a = {zs, ld_s, zt, ld_t, ids, lse_s, lse_t, loss, center, row_weight, ld_g, n_rows, width, v_lo,
                      hs, ht, beta};
  switch (mode) {
    case kReverseKL:
      return grad_mode<kReverseKL>(a, g, g_dtype);
    case kForwardKL:
      return grad_mode<kForwardKL>(a, g, g_dtype);
    case kJSD:
      return grad_mode<kJSD>(a, g, g_dtype);
    case kSkewForwardKL:
      return grad_mode<kSkewForwardKL>(a, g, g_dtype);
    case kSkewReverseKL:
      return grad_mode<kSkewReverseKL>(a, g, g_dtype);
    case kTVD:
      return grad_mode<kTVD>(a, g, g_dtype);
    case kTokenLogprob:
      return grad_mode<kTokenLogprob>(a, g, g_dtype);
    case kLogSumExp:
      return grad_mode<kLogSumExp>(a, g, g_dtype);
    case kEntropy:
      return grad_mode<kEntropy>(a, g, g_dtype);
    default:
      return "unknown mode";
  }
}

const char* launch_topk_update(const float* z, int64_t ld, uint64_t* keys, float* state, int64_t n_rows,
                               int64_t width, int64_t v_lo, int64_t k, Head head, std::intptr_t) {
  if (k < 1 || k > kMaxTopK) return "k must be in [1, 1024]";
  if (const char* error = check_row_stride(ld, width, n_rows)) return error;
  const int cap = topk_buffer_capacity(k, kHostThreads);
  std::vector<uint64_t> buf(static_cast<size_t>(cap));
  EntropyAcc scratch[kHostThreads];
  int count = 0;
  for_each_row(n_rows, [&](const ThreadGroup& g, int64_t i_n) {
    row_topk_update(g, z + i_n * ld, width, v_lo, head, keys + i_n * k, static_cast<int>(k), state + i_n, n_rows,
                    buf.data(), cap, &count, scratch);
  });
  return nullptr;
}

const char* launch_topk_finalize(const uint64_t* keys, const float* state, int64_t* ids, float* logprobs, float* lse,
                                 float* entropy, int64_t n_rows, int64_t k, std::intptr_t) {
  for (int64_t i_n = 0; i_n < n_rows; ++i_n) {
    const int64_t o_k = i_n * k;
    row_topk_finalize(keys + o_k, k, state[i_n], state[n_rows + i_n], state[2 * n_rows + i_n], ids + o_k,
                      logprobs + o_k, lse + i_n, entropy + i_n);
  }
  return nullptr;
}

}  // namespace opd_fast
