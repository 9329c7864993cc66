// Per-element and per-row math of the fused epilogues, shared by the CUDA kernels (csrc/*.cu) and their
// host build (csrc/host/launchers_host.cpp, used by the tests to check this very code on CPU tensors).
//
// Every function here is `__host__ __device__` under nvcc and plain `inline` C++ otherwise. The row
// algorithms are templates over a thread group `Group` that provides
//
//     rank(), size()   this thread's index in the group and the group's size (a power of two)
//     sync()           a barrier for the whole group (__syncthreads on the GPU)
//     append(count)    an atomic `(*count)++` on a counter shared by the group
//
// and receive the group-shared memory they need (`scratch`, `buf`, `count`) from their caller. The GPU
// runs one thread block per token row (BlockGroup, block.cuh). The host build runs the same code with a
// few OS threads and a std::barrier standing in for the block (csrc/host/launchers_host.cpp), so the
// arithmetic, the online-softmax merges, the reductions, the buffer management and the barrier
// placement are all exercised on CPU tensors by the tests.
//
// Notation (docs/design.md §2): a chunk holds the fp32 raw logits x = h Wᵀ of `width` vocabulary columns
// starting at column v_lo, one row per token; the model's output head and the temperature turn them into
// the final logits z = Head::apply(x, j) on the fly. All accumulation is fp32.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define OPD_HD __host__ __device__ __forceinline__
#else
#define OPD_HD inline
#endif

namespace opd_fast {

// Op codes: the numbers of MODES in kernels/_common.py and opd_fast/backends/cuda_backend.py.
enum Mode : int { kReverseKL = 0, kForwardKL = 1, kJSD = 2, kTokenLogprob = 3, kLogSumExp = 4 };

// Output dtypes of the logit gradient (the student weight's dtype, so dH and dW GEMMs take it as is).
enum GradDtype : int { kGradFloat32 = 0, kGradBFloat16 = 1, kGradFloat16 = 2 };

// Largest top-k a block keeps in shared memory (as the Triton kernel's MAX_K); longer lists go to the
// torch backend.
constexpr int64_t kMaxTopK = 1024;

OPD_HD constexpr bool two_models(int mode) { return mode == kReverseKL || mode == kForwardKL || mode == kJSD; }
OPD_HD constexpr bool is_kl(int mode) { return mode == kReverseKL || mode == kForwardKL; }

// A model's output head on one chunk: z = post · c·tanh(pre · (x + b_j) / c), with no tanh when c = 0 (no
// softcap) and no bias when `bias` is null (else it points at the chunk's first column). post is 1/τ, so
// the same struct carries the temperature. Transformers applies exactly this order (Gemma's
// final_logit_softcapping after Cohere/Granite-style scaling of h·Wᵀ + b), and generate() divides by τ last.
struct Head {
  const float* bias;
  float pre, softcap, post;

  OPD_HD float apply(float x, int64_t j) const {
    float u = (bias != nullptr ? x + bias[j] : x) * pre;
    if (softcap > 0.f) u = softcap * tanhf(u / softcap);
    return u * post;
  }

  // dz/dx from z itself: pre · post, times 1 − tanh² = 1 − (z / (c · post))² under a softcap.
  OPD_HD float chain(float z) const {
    if (softcap > 0.f) {
      const float t = z / (softcap * post);
      return pre * post * (1.f - t * t);
    }
    return pre * post;
  }
};

// Online softmax: m = max z, s = Σ e^{z−m}. When the max grows from m to z, s is rescaled by e^{m−z}, so
// (m, s) always describe the same values relative to the current max. s = 0 marks an empty state (a
// non-empty one holds e^0 = 1 for its max).
struct OnlineAcc {
  float m, s;

  OPD_HD static OnlineAcc empty() { return {-INFINITY, 0.f}; }

  OPD_HD void add(float z) {
    if (s == 0.f) {
      m = z;
      s = 1.f;
    } else if (z > m) {
      s = s * expf(m - z) + 1.f;
      m = z;
    } else {
      s += expf(z - m);
    }
  }
};

// Exact merge of two online states: both are brought to the larger max.
OPD_HD OnlineAcc merge(const OnlineAcc& p, const OnlineAcc& q) {
  if (q.s == 0.f) return p;
  if (p.s == 0.f) return q;
  const float m = p.m > q.m ? p.m : q.m;
  return {m, p.s * expf(p.m - m) + q.s * expf(q.m - m)};
}

// The online states of one row's two models. `lead` is the model whose probabilities weigh the KL (the
// student for reverse KL, the teacher for forward KL; the student in the other modes), `other` the other
// one (unused with one model), and, in the KL modes,
//     kl = Σ e^{x − m}((x − m) − (y − m_o)),    x the lead's logits, y the other's,
// relative to both maxes: when either max grows, every earlier term moves by the change. The divergence is
// then kl / s − log s + log s_o, a sum of small numbers, where Σ e^{x − m}(x − y) / s − (lse_x − lse_y)
// would cancel to ~ulp(|z|) when the two heads' logits sit far apart.
struct PairAcc {
  OnlineAcc lead, other;
  float kl;

  OPD_HD void add_kl(float x, float y) {
    if (lead.s == 0.f) {
      lead = {x, 1.f};
      other = {y, 1.f};
      kl = 0.f;
      return;
    }
    float moved = 0.f;  // how far the earlier terms' (x − m) − (y − m_o) move with the new maxes
    if (x > lead.m) {
      const float f = expf(lead.m - x);
      moved += lead.m - x;
      lead.s *= f;
      kl *= f;
      lead.m = x;
    }
    if (y > other.m) {
      moved -= other.m - y;
      other.s *= expf(other.m - y);
      other.m = y;
    }
    const float e = expf(x - lead.m);
    kl += lead.s * moved + e * ((x - lead.m) - (y - other.m));
    lead.s += e;
    other.s += expf(y - other.m);
  }
};

// p's KL accumulator moved to the maxes (m, m_o) ≥ p's (0 for an empty state).
OPD_HD float kl_moved(const PairAcc& p, float m, float m_o) {
  if (p.lead.s == 0.f) return 0.f;
  return expf(p.lead.m - m) * (p.kl + p.lead.s * ((p.lead.m - m) - (p.other.m - m_o)));
}

template <bool kKl>
struct MergePairAcc {
  OPD_HD PairAcc operator()(const PairAcc& p, const PairAcc& q) const {
    const OnlineAcc lead = merge(p.lead, q.lead), other = merge(p.other, q.other);
    return {lead, other, kKl ? kl_moved(p, lead.m, other.m) + kl_moved(q, lead.m, other.m) : 0.f};
  }
};

// Online softmax statistics for the entropy: m, s = Σ e^{z−m} and t = Σ e^{z−m}(z − m), so that at the
// end lse = m + log s and H = −Σ p log p = log s − t / s. Moving to a larger max m' turns t into
// e^{m−m'}·(t + (m − m')·s), since every z − m' = (z − m) + (m − m').
struct EntropyAcc {
  float m, s, t;

  OPD_HD static EntropyAcc empty() { return {-INFINITY, 0.f, 0.f}; }

  OPD_HD void add(float z) {
    if (s == 0.f) {
      m = z;
      s = 1.f;
      t = 0.f;
    } else if (z > m) {
      const float f = expf(m - z);
      t = f * (t + (m - z) * s);  // the new element itself contributes e^0·0
      s = s * f + 1.f;
      m = z;
    } else {
      const float d = z - m, e = expf(d);
      s += e;
      t += e * d;
    }
  }
};

OPD_HD EntropyAcc merge(const EntropyAcc& p, const EntropyAcc& q) {
  if (q.s == 0.f) return p;
  if (p.s == 0.f) return q;
  const float m = p.m > q.m ? p.m : q.m;
  const float fp = expf(p.m - m), fq = expf(q.m - m);
  return {m, p.s * fp + q.s * fq, fp * (p.t + (p.m - m) * p.s) + fq * (q.t + (q.m - m) * q.s)};
}

struct MergeEntropyAcc {
  OPD_HD EntropyAcc operator()(const EntropyAcc& p, const EntropyAcc& q) const { return merge(p, q); }
};

struct Sum3 {
  float a, b, c;
};

struct MergeSum3 {
  OPD_HD Sum3 operator()(const Sum3& p, const Sum3& q) const { return {p.a + q.a, p.b + q.b, p.c + q.c}; }
};

// Every thread gets merge() over the group's values. Tree in group-shared memory (scratch: size() slots)
// with a fixed pairing, so the result is bitwise reproducible; the trailing barrier lets the caller
// reuse scratch right away.
template <class Group, class T, class Merge>
OPD_HD T all_reduce(const Group& g, const T& value, Merge merge, T* scratch) {
  const int i = g.rank();
  scratch[i] = value;
  g.sync();
  for (int half = g.size() / 2; half > 0; half >>= 1) {
    if (i < half) scratch[i] = merge(scratch[i], scratch[i + half]);
    g.sync();
  }
  const T result = scratch[0];
  g.sync();
  return result;
}

// The column of row n's token inside the chunk [v_lo, v_lo + width), or −1 when it lies elsewhere.
OPD_HD int64_t token_column(const int64_t* ids, int64_t n, int64_t v_lo, int64_t width) {
  const int64_t col = ids[n] - v_lo;
  return 0 <= col && col < width ? col : -1;
}

// ---------------------------------------------------------------------------------------------------
// Forward statistics. The running state of a row lives in `state` at stride `stride` (= N) as
//     [m_s, s_s, m_t, s_t, acc]
// with, per mode (opd_fast.backends.sweep.finalize; lse = m + log s):
//     reverse KL:  acc = Σ e^{z_s − m_s}((z_s − m_s) − (z_t − m_t))   D = acc/s_s − log s_s + log s_t
//     forward KL:  acc = Σ e^{z_t − m_t}((z_t − m_t) − (z_s − m_s))   D = acc/s_t − log s_t + log s_s
//     token:       acc = z_y, the logit of the row's token (from the one chunk that holds it)
//     JSD, logsumexp: acc unused (JSD's terms need the final lse: row_jsd_terms, a second pass)
// Each chunk's row state is reduced over the group, then merged into the running state by rank 0.
template <int kMode, class Group>
OPD_HD void row_softmax_stats(const Group& g, const float* zs, const float* zt, int64_t width, int64_t y_col,
                              const Head& hs, const Head& ht, float* state, int64_t stride, PairAcc* scratch) {
  PairAcc local = {OnlineAcc::empty(), OnlineAcc::empty(), 0.f};
  for (int64_t j = g.rank(); j < width; j += g.size()) {
    const float a = hs.apply(zs[j], j);
    if (kMode == kReverseKL) {
      local.add_kl(a, ht.apply(zt[j], j));
    } else if (kMode == kForwardKL) {
      local.add_kl(ht.apply(zt[j], j), a);
    } else {
      local.lead.add(a);
      if (kMode == kJSD) local.other.add(ht.apply(zt[j], j));
    }
  }
  const MergePairAcc<is_kl(kMode)> merge_rows;
  const PairAcc row = all_reduce(g, local, merge_rows, scratch);
  if (g.rank() != 0) return;
  float* lead = kMode == kForwardKL ? state + 2 * stride : state;  // (m, s) of the lead model, then the other's
  float* other = kMode == kForwardKL ? state : state + 2 * stride;
  const PairAcc old = {OnlineAcc{lead[0], lead[stride]}, OnlineAcc{other[0], other[stride]},
                       is_kl(kMode) ? state[4 * stride] : 0.f};
  const PairAcc merged = merge_rows(old, row);
  lead[0] = merged.lead.m;
  lead[stride] = merged.lead.s;
  if (two_models(kMode)) {
    other[0] = merged.other.m;
    other[stride] = merged.other.s;
  }
  if (is_kl(kMode)) state[4 * stride] = merged.kl;
  if (kMode == kTokenLogprob && y_col >= 0) state[4 * stride] += hs.apply(zs[y_col], y_col);
}

// x − log(1 + x) ≥ 0 without cancellation near 0: with u = x / (2 + x), log1p(x) = 2 atanh(u), so
// x − log1p(x) = x² / (2 + x) − 2 (u³/3 + u⁵/5 + …), cut where the terms drop below fp32 resolution
// (|u| ≤ 1/3 for |x| ≤ 1/2); larger |x| lose at most a few bits directly.
OPD_HD float x_minus_log1p(float x) {
  if (fabsf(x) > 0.5f) return x - log1pf(x);
  const float u = x / (2.f + x), u2 = u * u;
  const float series =
      u * u2 * (1.f / 3 + u2 * (1.f / 5 + u2 * (1.f / 7 + u2 * (1.f / 9 + u2 * (1.f / 11 + u2 * (1.f / 13 + u2 / 15))))));
  return x * x / (2.f + x) - 2.f * series;
}

// JSD(β) of one element without cancellation at any β (opd_fast/backends/torch_backend.py: jsd_parts):
// with d = lp_t − lp_s, m/p_s = 1 + x, x = β·expm1(d), and m/p_t = 1 + y, y = (1 − β)·expm1(−d). Since
// Σ p_s x = Σ p_t y = 0, KL(p_s ‖ m) = Σ p_s (x − log1p x) and KL(p_t ‖ m) = Σ p_t (y − log1p y): terms ≥ 0,
// O(β²) as β → 0, where p_s log(p_s/m) would cancel. Returns (p_s, log(p_s / m), fs, ft).
struct JsdParts {
  float p_s, log_s, fs, ft;
};

// log(e^a + e^b) for a, b not both −inf.
OPD_HD float logaddexp(float a, float b) {
  const float high = fmaxf(a, b);
  return high + log1pf(expf(fminf(a, b) - high));
}

OPD_HD JsdParts jsd_parts(float lp_s, float lp_t, float beta) {
  const float p_s = expf(lp_s), p_t = expf(lp_t), d = lp_t - lp_s;
  const float x = beta * expm1f(fminf(d, 30.f)), y = (1.f - beta) * expm1f(fminf(-d, 30.f));
  // log(p_s / m) = −log1p(x), except where 1 + x = (1 − β) + β e^d is small (x < −1/2): 1 + x would cancel,
  // the log-add-exp of log(1 − β) and log β + d does not. Likewise for log(p_t / m).
  const float log_beta = logf(beta), log_rest = logf(1.f - beta);
  float log_s = x < -0.5f ? -logaddexp(log_rest, d + log_beta) : -log1pf(x);
  float log_t = y < -0.5f ? -logaddexp(log_beta, log_rest - d) : -log1pf(y);
  if (d > 30.f) log_s = log_t - d;                // the other side's exponential, so nothing overflows
  if (d < -30.f) log_t = log_s + d;
  const float fs = fabsf(x) <= 0.5f ? p_s * x_minus_log1p(x) : beta * (p_t - p_s) + p_s * log_s;
  const float ft = fabsf(y) <= 0.5f ? p_t * x_minus_log1p(y) : (1.f - beta) * (p_s - p_t) + p_t * log_t;
  return {p_s, log_s, fs, ft};
}

// A row's log-sum-exp as the pair (lse, lo): lse rounded to fp32 and its residual lo = (m − lse) + log Σ e^{z − m}
// (opd_fast.backends.sweep.split_lse), kept apart like log_softmax keeps the max and log Σ apart. A log-probability
// (z − lse) − lo is accurate to ~ulp(log p); z − lse alone would carry ~ulp(lse) (5e-4 at lse ≈ 1e4). Stored as
// [2, N] per-row arrays: lse in row 0, lo in row 1.
struct RowLse {
  float lse;
  float lo;
  OPD_HD float log_prob(float z) const { return (z - lse) - lo; }
};

OPD_HD RowLse row_lse(const float* lse, int64_t i_n, int64_t n_rows) { return {lse[i_n], lse[n_rows + i_n]}; }

// Second JSD pass: adds this chunk's Σ fs to terms[0], Σ ft to terms[stride] and Σ p_s log(p_s / m) to
// terms[2 · stride] (the gradient's center, consistent with the per-element log(p_s / m): sweep.jsd_loss).
template <class Group>
OPD_HD void row_jsd_terms(const Group& g, const float* zs, const float* zt, int64_t width, const Head& hs,
                          const Head& ht, RowLse lse_s, RowLse lse_t, float beta, float* terms, int64_t stride,
                          Sum3* scratch) {
  Sum3 local = {0.f, 0.f, 0.f};
  for (int64_t j = g.rank(); j < width; j += g.size()) {
    const JsdParts e = jsd_parts(lse_s.log_prob(hs.apply(zs[j], j)), lse_t.log_prob(ht.apply(zt[j], j)), beta);
    local.a += e.fs;
    local.b += e.ft;
    local.c += e.p_s * e.log_s;
  }
  const Sum3 row = all_reduce(g, local, MergeSum3(), scratch);
  if (g.rank() != 0) return;
  terms[0] += row.a;
  terms[stride] += row.b;
  terms[2 * stride] += row.c;
}

// ---------------------------------------------------------------------------------------------------
// Logit gradients (the formulas of kernels/linear_grad.py), given the forward's per-row statistics:
//     reverse KL:  p_s (lp_s − lp_t − D)
//     forward KL:  p_s − p_t
//     JSD(β):      p_s ((1 − β) log(p_s / m) − center), log(p_s / m) = −log1p(x) from jsd_parts
//     token:       [v = y] − p_s
//     logsumexp:   p_s
template <int kMode>
OPD_HD float logit_grad_element(float lp_s, float lp_t, bool hit, float loss, float center, float beta) {
  const float p_s = expf(lp_s);
  if (kMode == kReverseKL) return p_s * (lp_s - lp_t - loss);
  if (kMode == kForwardKL) return p_s - expf(lp_t);
  if (kMode == kJSD) {
    const JsdParts e = jsd_parts(lp_s, lp_t, beta);
    return e.p_s * ((1.f - beta) * e.log_s - center);
  }
  if (kMode == kTokenLogprob) return (hit ? 1.f : 0.f) - p_s;
  return p_s;
}

// One row of G = ∂(w · loss)/∂x with respect to the raw logits x, for the per-token gradient weight
// `scale` = w: the head's chain rule (1/τ included) is folded in, so that the GEMMs that follow give
// dH = G W and dW = Gᵀ H directly. `store(j, value)` writes column j in the output dtype; it may write
// over zs[j] (in place) because each column is read before it is written, by the same thread.
template <int kMode, class Group, class Store>
OPD_HD void row_logit_grad(const Group& g, const float* zs, const float* zt, int64_t width, int64_t y_col,
                           const Head& hs, const Head& ht, RowLse lse_s, RowLse lse_t, float loss, float center,
                           float beta, float scale, Store store) {
  for (int64_t j = g.rank(); j < width; j += g.size()) {
    const float a = hs.apply(zs[j], j);
    const float lp_s = lse_s.log_prob(a);
    const float lp_t = two_models(kMode) ? lse_t.log_prob(ht.apply(zt[j], j)) : 0.f;
    const float element = logit_grad_element<kMode>(lp_s, lp_t, j == y_col, loss, center, beta);
    store(j, scale * hs.chain(a) * element);
  }
}

// ---------------------------------------------------------------------------------------------------
// Top-k selection on packed 64-bit keys (the scheme of kernels/linear_topk.py, unsigned here):
//     key = (ordered(z) << 32) | (2³² − 1 − id)
// ordered() maps the float's bits onto an unsigned int with the same order as the float (flip the sign
// bit of non-negative floats, all bits of negative ones). One integer comparison orders by logit and
// equal logits by the smaller id first, so the selection is exact and deterministic and two keys are
// never equal. Key 0 is the "empty" sentinel: a real key's low word is ≥ 2³² − V > 0.
OPD_HD uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
}

OPD_HD float bits_float(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
}

OPD_HD uint64_t pack_key(float z, int64_t id) {
  uint32_t u = float_bits(z);
  if (u == 0x80000000u) u = 0u;  // −0.0 → +0.0, so equal logits get equal high words
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(u) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(id));
}

OPD_HD float key_logit(uint64_t key) {
  const uint32_t u = static_cast<uint32_t>(key >> 32);
  return bits_float((u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u);
}

OPD_HD int64_t key_id(uint64_t key) {
  return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu));
}

// Sorts buf[0, n) in descending order; n a power of two. Bitonic network: in each stage every pair
// (i, i ^ j) is compared by the one thread that owns the smaller index, then the group synchronizes.
template <class Group>
OPD_HD void bitonic_sort_desc(const Group& g, uint64_t* buf, int n) {
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = g.rank(); i < n; i += g.size()) {
        const int l = i ^ j;
        if (l > i) {
          const uint64_t a = buf[i], b = buf[l];
          // Blocks with (i & k) == 0 sort descending, the others ascending; the last stage (k = n)
          // merges everything descending.
          if (((i & k) == 0) ? (a < b) : (a > b)) {
            buf[i] = b;
            buf[l] = a;
          }
        }
      }
      g.sync();
    }
  }
}

// Sorts the `filled` candidates of buf (capacity `cap`, a power of two), keeps the best k at the front
// and returns the k-th best key, the admission threshold of later candidates.
template <class Group>
OPD_HD uint64_t keep_best(const Group& g, uint64_t* buf, int filled, int cap, int k, int* count) {
  for (int i = filled + g.rank(); i < cap; i += g.size()) buf[i] = 0;
  g.sync();
  bitonic_sort_desc(g, buf, cap);
  const uint64_t threshold = buf[k - 1];
  if (g.rank() == 0) *count = k;
  g.sync();
  return threshold;
}

// The smallest buffer capacity row_topk_update accepts: a power of two ≥ k + one key per thread.
OPD_HD constexpr int topk_buffer_capacity(int64_t k, int group_size) {
  int cap = 1;
  while (cap < k + group_size) cap <<= 1;
  return cap;
}

// Streaming top-k of one row over one chunk, plus the entropy statistics.
//
// `keys` holds the row's running top-k from earlier chunks (k keys, descending, sentinel-padded) and
// `state` its running (m, s, t) at stride `stride`; both are updated. Memory plan: a buffer of `cap`
// keys (cap = topk_buffer_capacity(k, size)) starts with the running top-k. The chunk is scanned in
// rounds of one column per thread; a column is a candidate only if its key beats the k-th best key
// known so far (`threshold`), and candidates are appended to the buffer. When the next round might
// overflow it, the buffer is sorted and cut back to the best k, which also raises the threshold. Keys
// are unique, so the result does not depend on the order in which candidates were appended.
template <class Group>
OPD_HD void row_topk_update(const Group& g, const float* z, int64_t width, int64_t v_lo, const Head& head,
                            uint64_t* keys, int k, float* state, int64_t stride, uint64_t* buf, int cap, int* count,
                            EntropyAcc* scratch) {
  EntropyAcc local = EntropyAcc::empty();
  for (int64_t j = g.rank(); j < width; j += g.size()) local.add(head.apply(z[j], j));
  const EntropyAcc row = all_reduce(g, local, MergeEntropyAcc(), scratch);
  if (g.rank() == 0) {
    const EntropyAcc merged = merge(EntropyAcc{state[0], state[stride], state[2 * stride]}, row);
    state[0] = merged.m;
    state[stride] = merged.s;
    state[2 * stride] = merged.t;
  }

  for (int i = g.rank(); i < k; i += g.size()) buf[i] = keys[i];
  if (g.rank() == 0) *count = k;
  g.sync();
  uint64_t threshold = buf[k - 1];
  for (int64_t base = 0; base < width; base += g.size()) {
    const int64_t j = base + g.rank();
    if (j < width) {
      const uint64_t key = pack_key(head.apply(z[j], j), v_lo + j);
      if (key > threshold) buf[g.append(count)] = key;
    }
    g.sync();
    const int filled = *count;
    g.sync();  // everyone has read the count before the next round appends again
    if (filled > cap - g.size()) threshold = keep_best(g, buf, filled, cap, k, count);
  }
  const int filled = *count;
  if (filled > k) keep_best(g, buf, filled, cap, k, count);
  for (int i = g.rank(); i < k; i += g.size()) keys[i] = buf[i];
}

// Final per-row results: ids and log-probs of the top k (descending), the log-sum-exp and the entropy.
OPD_HD void row_topk_finalize(const uint64_t* keys, int64_t k, float m, float s, float t, int64_t* ids,
                              float* logprobs, float* lse, float* entropy) {
  const float log_s = logf(s);
  for (int64_t i = 0; i < k; ++i) {
    ids[i] = key_id(keys[i]);
    logprobs[i] = (key_logit(keys[i]) - m) - log_s;  // max and log Σ apart: ~ulp(log p), not ~ulp(lse)
  }
  *lse = m + log_s;
  *entropy = log_s - t / s;
}

}  // namespace opd_fast
