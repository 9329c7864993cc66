// Launchers of the epilogue kernels: raw pointers, int64 sizes, the CUDA stream as an integer (the
// value of torch.cuda.current_stream().cuda_stream), so that neither this header nor the bindings need
// CUDA or torch-CUDA headers. Each returns nullptr on success and an error message otherwise.
//
// Implemented for the GPU by csrc/*.cu and for the host (tests) by csrc/host/launchers_host.cpp.
// Layouts: every [N, width] tile (the logits zs, zt, z and the gradient g) is row-major with unit column stride,
// and is followed by its row stride in elements (ld_*, ≥ width: a view of a padded workspace, row i at
// pointer + i · ld); the kernels use 16-byte loads where a row's pointers allow (epilogue.h: walk_row), so row
// strides that are multiples of 4 floats on 16-byte aligned bases are the fast case. Per-row vectors are [N];
// `state` arrays are [rows of statistics, N] (see epilogue.h for what each row holds).
#pragma once

#include <cstdint>

#include "epilogue.h"

namespace opd_fast {

// Every op takes each model's output head (epilogue.h: Head, bias pointing at the chunk's first column,
// temperature folded into `post`).
//
// state [5, N] fp32 (m_s, s_s, m_t, s_t, acc), merged with chunk [v_lo, v_lo + width); every mode but kEntropy.
// zt: [N, width] in two-model modes, else unused (ld_t then too); ids: [N] int64 in token mode, else unused.
// entropy: null, or [3, N] fp32 (m, s, a) of the student (epilogue.h: EntropyAcc, a = its t), merged with the chunk's
// final student logits in the same read.
const char* launch_softmax_stats_update(const float* zs, int64_t ld_s, const float* zt, int64_t ld_t,
                                        const int64_t* ids, float* state, int64_t n_rows, int64_t width, int64_t v_lo,
                                        Head hs, Head ht, int mode, float* entropy, std::intptr_t stream);

// lse_s, lse_t: [2, N] fp32, each row's final log-sum-exp and its residual (epilogue.h: RowLse).
//
// terms [3, N] fp32 += (Σ a, Σ b, Σ pg) over the chunk (epilogue.h: terms_parts), given the final lse, for a mode
// with a terms pass (has_terms: jsd, skew_forward_kl, skew_reverse_kl, tvd); beta unused in tvd.
const char* launch_terms_update(const float* zs, int64_t ld_s, const float* zt, int64_t ld_t, const float* lse_s,
                                const float* lse_t, float* terms, int64_t n_rows, int64_t width, Head hs, Head ht,
                                float beta, int mode, std::intptr_t stream);

// g [N, width] at row stride ld_g (GradDtype g_dtype; may be zs itself, ld_g = ld_s, when fp32) = row_weight ·
// gradient w.r.t. the raw logits. Unused per mode: zt, ld_t and lse_t (one-model modes), ids (outside token mode),
// loss (outside reverse KL), center (outside forward KL, the terms modes and entropy: reads_center), beta (outside
// jsd and the skew KLs).
const char* launch_logit_grad(const float* zs, int64_t ld_s, const float* zt, int64_t ld_t, const int64_t* ids,
                              const float* lse_s, const float* lse_t, const float* loss, const float* center,
                              const float* row_weight, void* g, int64_t ld_g, int g_dtype, int64_t n_rows,
                              int64_t width, int64_t v_lo, Head hs, Head ht, float beta, int mode,
                              std::intptr_t stream);

// keys [N, k] (uint64 bits, descending, sentinel 0) and state [3, N] fp32 (m, s, t) merged with the chunk.
const char* launch_topk_update(const float* z, int64_t ld, uint64_t* keys, float* state, int64_t n_rows,
                               int64_t width, int64_t v_lo, int64_t k, Head head, std::intptr_t stream);

// ids [N, k] int64, logprobs [N, k] fp32, lse [N], entropy [N] from the running keys and state.
const char* launch_topk_finalize(const uint64_t* keys, const float* state, int64_t* ids, float* logprobs, float* lse,
                                 float* entropy, int64_t n_rows, int64_t k, std::intptr_t stream);

// The launchers' check of a tile's row stride: nullptr when ld ≥ width (or the tile has at most one row).
inline const char* check_row_stride(int64_t ld, int64_t width, int64_t n_rows) {
  return n_rows <= 1 || ld >= width ? nullptr : "row stride (ld) smaller than the tile's width";
}

}  // namespace opd_fast
