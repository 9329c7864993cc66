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

// Full unrolling of the loops over a group's columns (constant trip counts), in the device pass (host compilers
// warn on the pragma, and unroll such loops at -O2 anyway).
#if defined(__CUDA_ARCH__)
#define OPD_UNROLL _Pragma("unroll")
#else
#define OPD_UNROLL
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

  // No bias and no softcap (most LM heads): z = (x · pre) · post. The row functions then walk the row with
  // kPlain = true, whose apply and chain have no branch per element; kPlain = false is the general head.
  OPD_HD bool plain() const { return bias == nullptr && !(softcap > 0.f); }

  template <bool kPlain = false>
  OPD_HD float apply(float x, int64_t j) const {
    if (kPlain) return x * pre * post;
    float u = (bias != nullptr ? x + bias[j] : x) * pre;
    if (softcap > 0.f) u = softcap * tanhf(u / softcap);
    return u * post;
  }

  // dz/dx from z itself: pre · post, times 1 − tanh² = 1 − (z / (c · post))² under a softcap.
  template <bool kPlain = false>
  OPD_HD float chain(float z) const {
    if (!kPlain && softcap > 0.f) {
      const float t = z / (softcap * post);
      return pre * post * (1.f - t * t);
    }
    return pre * post;
  }
};

// max and min that return NaN when either operand is NaN. fmaxf/fminf (and PTX max.f32) return the other
// operand, so a NaN logit would vanish from an online max or a clamp; docs/design.md §7 wants it to reach the loss
// and both gradients. sm_80+ has the instruction (max.NaN.f32); elsewhere `a != a` is the NaN test.
OPD_HD float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a > b || a != a) ? a : b;
#endif
}

OPD_HD float min_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a < b || a != a) ? a : b;
#endif
}

// The accumulators below take a group of kN logits at once (kN = 1, 4, or the columns of one round of vector
// loads: walk_row). The group's own max joins the running max first, the running sums are moved to
// the new max once (one exponential per group), then each logit adds its e^{z − m} ≤ 1: exactly the online
// update of a tile with its own max (docs/design.md §7), with no data-dependent branch. The empty state
// (m = −inf, s = 0) needs no special case where e^{−inf} = 0 suffices; where a product with s would be
// 0 · (−inf) it is selected away. A NaN logit makes the max NaN (max_nan) and with it every sum.

// Online softmax: m = max z, s = Σ e^{z−m}, always relative to the current max. s = 0 marks an empty state (a
// non-empty one holds e^0 = 1 for its max).
struct OnlineAcc {
  float m, s;

  OPD_HD static OnlineAcc empty() { return {-INFINITY, 0.f}; }

  template <int kN>
  OPD_HD void add(const float (&z)[kN]) {
    float top = m;
    OPD_UNROLL
    for (int e = 0; e < kN; ++e) top = max_nan(top, z[e]);
    // While every logit so far is −inf the state stays empty (shift 0: each e^{−inf} adds 0), where e^{−inf − (−inf)}
    // would be NaN.
    const float shift = top == -INFINITY ? 0.f : top;
    s *= expf(m - shift);
    OPD_UNROLL
    for (int e = 0; e < kN; ++e) s += expf(z[e] - shift);
    m = top;
  }
};

// Exact merge of two online states: both are brought to the larger max.
OPD_HD OnlineAcc merge(const OnlineAcc& p, const OnlineAcc& q) {
  if (q.s == 0.f) return p;
  if (p.s == 0.f) return q;
  const float m = max_nan(p.m, q.m);
  return {m, p.s * expf(p.m - m) + q.s * expf(q.m - m)};
}

// The online states of one row's two models. `lead` is the model whose probabilities weigh the KL (the
// student for reverse KL, the teacher for forward KL; the student in the other modes), `other` the other
// one (unused with one model), and, in the KL modes,
//     kl = Σ e^{x − m}((x − m) − (y − m_o)),    x the lead's logits, y the other's,
// relative to both maxes: when the maxes grow to (m', m_o'), every earlier term is multiplied by e^{m − m'} and
// moves by (m − m') − (m_o − m_o'). The divergence is then kl / s − log s + log s_o, a sum of small numbers, where
// Σ e^{x − m}(x − y) / s − (lse_x − lse_y) would cancel to ~ulp(|z|) when the two heads' logits sit far apart.
struct PairAcc {
  OnlineAcc lead, other;
  float kl;

  template <int kN>
  OPD_HD void add_kl(const float (&x)[kN], const float (&y)[kN]) {
    float top = lead.m, top_o = other.m;
    OPD_UNROLL
    for (int e = 0; e < kN; ++e) {
      top = max_nan(top, x[e]);
      top_o = max_nan(top_o, y[e]);
    }
    const float f = expf(lead.m - top);
    // An empty state has nothing to move (and its (m − m') − (m_o − m_o') is −inf − (−inf)).
    const float moved = lead.s == 0.f ? 0.f : lead.s * ((lead.m - top) - (other.m - top_o));
    kl = f * (kl + moved);
    lead.s *= f;
    other.s *= expf(other.m - top_o);
    lead.m = top;
    other.m = top_o;
    OPD_UNROLL
    for (int e = 0; e < kN; ++e) {
      const float ex = expf(x[e] - top);
      kl += ex * ((x[e] - top) - (y[e] - top_o));
      lead.s += ex;
      other.s += expf(y[e] - top_o);
    }
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

  template <int kN>
  OPD_HD void add(const float (&z)[kN]) {
    float top = m;
    OPD_UNROLL
    for (int e = 0; e < kN; ++e) top = max_nan(top, z[e]);
    const float f = expf(m - top);
    t = f * (t + (s == 0.f ? 0.f : (m - top) * s));
    s *= f;
    OPD_UNROLL
    for (int e = 0; e < kN; ++e) {
      const float d = z[e] - top, ex = expf(d);
      s += ex;
      t += ex * d;
    }
    m = top;
  }
};

OPD_HD EntropyAcc merge(const EntropyAcc& p, const EntropyAcc& q) {
  if (q.s == 0.f) return p;
  if (p.s == 0.f) return q;
  const float m = max_nan(p.m, q.m);
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
// Walking a row. Every [N, width] operand is row-major with unit column stride and its own row stride (a multiple
// of 64 in the padded workspaces of the sweep); the kernels hand these functions the row's first element. The
// columns go to a visitor's `add<kN>(col, step, x, y)` in groups: x[e] and y[e] are the two operands' raw logits of
// column group_column(col, step, e) (y unused with one operand).

// 16-byte loads each thread issues per round of the main loop, over all operands: 64 bytes in flight per thread,
// 16 fp32 registers of data.
constexpr int kLoadsInFlight = 4;

// Four consecutive fp32 logits, one 16-byte load: the GPU's float4, and on the host a struct of the same layout
// (the host build runs this very code, so the tests take the vector path too).
#if defined(__CUDACC__)
using Vec4 = float4;
#else
struct alignas(16) Vec4 {
  float x, y, z, w;
};
#endif

// p must be 16-byte aligned.
OPD_HD Vec4 load4(const float* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Vec4*>(p);
#else
  Vec4 v;
  memcpy(&v, p, sizeof(v));
  return v;
#endif
}

// Column of element e of a group: kVectors vectors of 4 consecutive columns, `step` columns apart (a single
// column for kN = 1).
OPD_HD constexpr int64_t group_column(int64_t col, int64_t step, int e) { return col + (e / 4) * step + e % 4; }

// Columns of a row before its first 16-byte boundary, where its vector loads start; `width` (no vector loads)
// when the rows a and b sit at different offsets from a boundary, or are not even 4-byte aligned. Rows of
// tiles whose row strides are multiples of 4 floats and whose bases are 16-byte aligned all start at 0.
OPD_HD int64_t vector_head(const float* a, const float* b, int64_t width) {
  const uintptr_t pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  if (((pa ^ pb) & 15u) != 0 || (pa & 3u) != 0) return width;
  const int64_t head = static_cast<int64_t>((16u - (pa & 15u)) & 15u) / 4;
  return head < width ? head : width;
}

// Visits columns [lo, hi) one at a time, strided over the group.
template <bool kTwo, class Group, class Visit>
OPD_HD void visit_columns(const Group& g, const float* a, const float* b, int64_t lo, int64_t hi, Visit& visit) {
  for (int64_t j = lo + g.rank(); j < hi; j += g.size()) {
    const float x[1] = {a[j]}, y[1] = {kTwo ? b[j] : 0.f};
    visit.template add<1>(j, 0, x, y);
  }
}

// Loads kVectors vectors per operand (all issued before any is used), then visits their 4·kVectors columns.
template <bool kTwo, int kVectors, class Visit>
OPD_HD void visit_vectors(const float* a, const float* b, int64_t col, int64_t step, Visit& visit) {
  float x[4 * kVectors], y[4 * kVectors] = {};
  OPD_UNROLL
  for (int u = 0; u < kVectors; ++u) {
    const Vec4 v = load4(a + col + u * step);
    x[4 * u] = v.x;
    x[4 * u + 1] = v.y;
    x[4 * u + 2] = v.z;
    x[4 * u + 3] = v.w;
    if (kTwo) {
      const Vec4 w = load4(b + col + u * step);
      y[4 * u] = w.x;
      y[4 * u + 1] = w.y;
      y[4 * u + 2] = w.z;
      y[4 * u + 3] = w.w;
    }
  }
  visit.template add<4 * kVectors>(col, step, x, y);
}

// Hands every column of a row (a, and b when kTwo) to `visit`, the group's threads sharing it:
//   * the columns before the first 16-byte boundary (vector_head, at most 3) and after the last whole vector (at
//     most 3), one at a time, outside the main loop; with no common boundary (vector_head = width), every column;
//   * the whole vectors in rounds: each thread issues kLoadsInFlight 16-byte loads (kVectors per operand),
//     consecutive threads on consecutive vectors (a warp reads 512 contiguous bytes per load), then visits those
//     4·kVectors columns; the loop over rounds has no branch but its own condition;
//   * the vectors short of a whole round, one per thread.
template <bool kTwo, class Group, class Visit>
OPD_HD void walk_row(const Group& g, const float* a, const float* b, int64_t width, Visit& visit) {
  const int64_t head = vector_head(a, kTwo ? b : a, width);
  const int64_t vectors = (width - head) / 4, tail = head + 4 * vectors;
  constexpr int kVectors = kTwo ? kLoadsInFlight / 2 : kLoadsInFlight;
  const int64_t round = kVectors * g.size();
  const int64_t whole = vectors - vectors % round;  // vectors in whole rounds
  visit_columns<kTwo>(g, a, b, 0, head, visit);
  for (int64_t q = g.rank(); q < whole; q += round) {
    visit_vectors<kTwo, kVectors>(a, b, head + 4 * q, 4 * g.size(), visit);
  }
  for (int64_t q = whole + g.rank(); q < vectors; q += g.size()) visit_vectors<kTwo, 1>(a, b, head + 4 * q, 0, visit);
  visit_columns<kTwo>(g, a, b, tail, width, visit);
}

// A thread's share of a row's forward statistics: the heads applied, then the group added to the online state.
template <int kMode, bool kPlain>
struct StatsVisit {
  Head hs, ht;
  PairAcc acc;

  template <int kN>
  OPD_HD void add(int64_t col, int64_t step, const float (&x)[kN], const float (&y)[kN]) {
    float a[kN], b[kN] = {};
    OPD_UNROLL
    for (int e = 0; e < kN; ++e) {
      const int64_t j = group_column(col, step, e);
      a[e] = hs.apply<kPlain>(x[e], j);
      if (two_models(kMode)) b[e] = ht.apply<kPlain>(y[e], j);
    }
    if (kMode == kReverseKL) {
      acc.add_kl(a, b);
    } else if (kMode == kForwardKL) {
      acc.add_kl(b, a);
    } else {
      acc.lead.add(a);
      if (kMode == kJSD) acc.other.add(b);
    }
  }
};

template <int kMode, bool kPlain, class Group>
OPD_HD PairAcc stats_of_thread(const Group& g, const float* zs, const float* zt, int64_t width, const Head& hs,
                               const Head& ht) {
  StatsVisit<kMode, kPlain> visit = {hs, ht, {OnlineAcc::empty(), OnlineAcc::empty(), 0.f}};
  walk_row<two_models(kMode)>(g, zs, zt, width, visit);
  return visit.acc;
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
  const PairAcc local = hs.plain() && ht.plain() ? stats_of_thread<kMode, true>(g, zs, zt, width, hs, ht)
                                                 : stats_of_thread<kMode, false>(g, zs, zt, width, hs, ht);
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
  const float high = max_nan(a, b);
  return high + log1pf(expf(min_nan(a, b) - high));
}

OPD_HD JsdParts jsd_parts(float lp_s, float lp_t, float beta) {
  const float p_s = expf(lp_s), p_t = expf(lp_t), d = lp_t - lp_s;
  const float x = beta * expm1f(min_nan(d, 30.f)), y = (1.f - beta) * expm1f(min_nan(-d, 30.f));
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

// A thread's share of a row's JSD terms (row_jsd_terms).
template <bool kPlain>
struct JsdVisit {
  Head hs, ht;
  RowLse lse_s, lse_t;
  float beta;
  Sum3 sum;

  template <int kN>
  OPD_HD void add(int64_t col, int64_t step, const float (&x)[kN], const float (&y)[kN]) {
    OPD_UNROLL
    for (int e = 0; e < kN; ++e) {
      const int64_t j = group_column(col, step, e);
      const float lp_s = lse_s.log_prob(hs.apply<kPlain>(x[e], j));
      const JsdParts part = jsd_parts(lp_s, lse_t.log_prob(ht.apply<kPlain>(y[e], j)), beta);
      sum.a += part.fs;
      sum.b += part.ft;
      sum.c += part.p_s * part.log_s;
    }
  }
};

template <bool kPlain, class Group>
OPD_HD Sum3 jsd_of_thread(const Group& g, const float* zs, const float* zt, int64_t width, const Head& hs,
                          const Head& ht, RowLse lse_s, RowLse lse_t, float beta) {
  JsdVisit<kPlain> visit = {hs, ht, lse_s, lse_t, beta, {0.f, 0.f, 0.f}};
  walk_row<true>(g, zs, zt, width, visit);
  return visit.sum;
}

// Second JSD pass: adds this chunk's Σ fs to terms[0], Σ ft to terms[stride] and Σ p_s log(p_s / m) to
// terms[2 · stride] (the gradient's center, consistent with the per-element log(p_s / m): sweep.jsd_loss).
template <class Group>
OPD_HD void row_jsd_terms(const Group& g, const float* zs, const float* zt, int64_t width, const Head& hs,
                          const Head& ht, RowLse lse_s, RowLse lse_t, float beta, float* terms, int64_t stride,
                          Sum3* scratch) {
  const Sum3 local = hs.plain() && ht.plain() ? jsd_of_thread<true>(g, zs, zt, width, hs, ht, lse_s, lse_t, beta)
                                              : jsd_of_thread<false>(g, zs, zt, width, hs, ht, lse_s, lse_t, beta);
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

// What a row's logit gradient needs besides its logits (row_logit_grad's arguments).
struct GradRow {
  Head hs, ht;
  RowLse lse_s, lse_t;
  int64_t y_col;
  float loss, center, beta, scale;
};

// A thread's share of a row's logit gradient; kVectorStore: the store writes whole vectors.
template <int kMode, bool kPlain, bool kVectorStore, class Store>
struct GradVisit {
  GradRow r;
  Store store;

  template <int kN>
  OPD_HD void add(int64_t col, int64_t step, const float (&x)[kN], const float (&y)[kN]) {
    float v[kN];
    OPD_UNROLL
    for (int e = 0; e < kN; ++e) {
      const int64_t j = group_column(col, step, e);
      const float a = r.hs.apply<kPlain>(x[e], j);
      const float lp_s = r.lse_s.log_prob(a);
      const float lp_t = two_models(kMode) ? r.lse_t.log_prob(r.ht.apply<kPlain>(y[e], j)) : 0.f;
      const float element = logit_grad_element<kMode>(lp_s, lp_t, j == r.y_col, r.loss, r.center, r.beta);
      v[e] = r.scale * r.hs.chain<kPlain>(a) * element;
    }
    store.template put<kVectorStore>(col, step, v);
  }
};

template <int kMode, bool kPlain, bool kVectorStore, class Group, class Store>
OPD_HD void grad_of_thread(const Group& g, const float* zs, const float* zt, int64_t width, const GradRow& r,
                           Store store) {
  GradVisit<kMode, kPlain, kVectorStore, Store> visit = {r, store};
  walk_row<two_models(kMode)>(g, zs, zt, width, visit);
}

// One row of G = ∂(w · loss)/∂x with respect to the raw logits x, for the per-token gradient weight
// `scale` = w: the head's chain rule (1/τ included) is folded in, so that the GEMMs that follow give
// dH = G W and dW = Gᵀ H directly. The Store writes G's row in the output dtype:
//     store.aligned4(col)                 whether the 4 columns from `col` on take one vector store
//     store.put<kVector>(col, step, v)    writes a group of values (walk_row), as whole vectors if kVector
// G's vector stores are used when its row is aligned where the loads' vectors start. G may be zs itself (in
// place): each thread reads its columns before it writes them.
template <int kMode, class Group, class Store>
OPD_HD void row_logit_grad(const Group& g, const float* zs, const float* zt, int64_t width, const GradRow& r,
                           Store store) {
  const bool plain = r.hs.plain() && r.ht.plain();
  const bool vector_store = store.aligned4(vector_head(zs, two_models(kMode) ? zt : zs, width));
  if (plain && vector_store) {
    grad_of_thread<kMode, true, true>(g, zs, zt, width, r, store);
  } else if (plain) {
    grad_of_thread<kMode, true, false>(g, zs, zt, width, r, store);
  } else if (vector_store) {
    grad_of_thread<kMode, false, true>(g, zs, zt, width, r, store);
  } else {
    grad_of_thread<kMode, false, false>(g, zs, zt, width, r, store);
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

// A thread's share of a row's entropy statistics (row_topk_update).
template <bool kPlain>
struct EntropyVisit {
  Head head;
  EntropyAcc acc;

  template <int kN>
  OPD_HD void add(int64_t col, int64_t step, const float (&x)[kN], const float (&)[kN]) {
    float z[kN];
    OPD_UNROLL
    for (int e = 0; e < kN; ++e) z[e] = head.apply<kPlain>(x[e], group_column(col, step, e));
    acc.add(z);
  }
};

template <bool kPlain, class Group>
OPD_HD EntropyAcc entropy_of_thread(const Group& g, const float* z, int64_t width, const Head& head) {
  EntropyVisit<kPlain> visit = {head, EntropyAcc::empty()};
  walk_row<false>(g, z, nullptr, width, visit);
  return visit.acc;
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
  const EntropyAcc local = head.plain() ? entropy_of_thread<true>(g, z, width, head)
                                        : entropy_of_thread<false>(g, z, width, head);
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
