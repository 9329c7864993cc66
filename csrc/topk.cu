// Streaming top-k of softmax(h Wᵀ / τ) per row with the row's log-sum-exp and entropy, one vocabulary
// chunk at a time, never [N, V].
//
// Grid: one block of kThreads per token row (row i at z + i · ld). Memory plan per block: the running top-k of the row
// (k packed keys, kept in global memory between chunks, [N, k]) is loaded into a shared buffer of
// cap = next_pow2(k + kThreads) keys (≤ 16 KB for k ≤ 1024); the chunk's columns stream through it with
// threshold filtering and occasional bitonic sorts (epilogue.h: row_topk_update). The online entropy
// statistics (m, s, t) are reduced over the block and merged into [3, N]. A last kernel decodes the keys.
#include "block.cuh"
#include "launchers.h"

namespace opd_fast {
namespace {

__global__ void __launch_bounds__(kThreads)
    topk_update_kernel(const float* __restrict__ z, int64_t ld, uint64_t* __restrict__ keys,
                       float* __restrict__ state, int64_t n_rows, int64_t width, int64_t v_lo, int k, int cap,
                       Head head) {
  extern __shared__ uint64_t buf[];  // cap keys
  __shared__ EntropyAcc scratch[kThreads];
  __shared__ int count;
  const int64_t i_n = blockIdx.x;
  row_topk_update(BlockGroup(), z + i_n * ld, width, v_lo, head, keys + i_n * k, k, state + i_n, n_rows, buf, cap,
                  &count, scratch);
}

// One thread per row: k ≤ kMaxTopK decodes are cheap next to the chunks' GEMMs.
__global__ void topk_finalize_kernel(const uint64_t* __restrict__ keys, const float* __restrict__ state,
                                     int64_t* __restrict__ ids, float* __restrict__ logprobs, float* __restrict__ lse,
                                     float* __restrict__ entropy, int64_t n_rows, int64_t k) {
  const int64_t i_n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i_n >= n_rows) return;
  const int64_t o_k = i_n * k;
  row_topk_finalize(keys + o_k, k, state[i_n], state[n_rows + i_n], state[2 * n_rows + i_n], ids + o_k, logprobs + o_k,
                    lse + i_n, entropy + i_n);
}

}  // namespace

const char* launch_topk_update(const float* z, int64_t ld, uint64_t* keys, float* state, int64_t n_rows,
                               int64_t width, int64_t v_lo, int64_t k, Head head, std::intptr_t stream) {
  if (k < 1 || k > kMaxTopK) return "k must be in [1, 1024]";
  if (const char* error = check_row_stride(ld, width, n_rows)) return error;
  if (n_rows == 0) return nullptr;
  const int cap = topk_buffer_capacity(k, kThreads);
  const size_t shared_bytes = static_cast<size_t>(cap) * sizeof(uint64_t);
  topk_update_kernel<<<dim3(static_cast<unsigned>(n_rows)), kThreads, shared_bytes, as_stream(stream)>>>(
      z, ld, keys, state, n_rows, width, v_lo, static_cast<int>(k), cap, head);
  return launch_status();
}

const char* launch_topk_finalize(const uint64_t* keys, const float* state, int64_t* ids, float* logprobs, float* lse,
                                 float* entropy, int64_t n_rows, int64_t k, std::intptr_t stream) {
  if (n_rows == 0) return nullptr;
  const unsigned blocks = static_cast<unsigned>((n_rows + kThreads - 1) / kThreads);
  topk_finalize_kernel<<<blocks, kThreads, 0, as_stream(stream)>>>(keys, state, ids, logprobs, lse, entropy, n_rows, k);
  return launch_status();
}

}  // namespace opd_fast
