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
#include <type_traits>

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

// Op codes: the numbers of MODES in opd_fast/backends/epilogue.py (kernels/_common.py takes them). The codes below
// kTokenLogprob are two-model divergences; kJSD to kTVD (has_terms) take a second pass for their terms. kEntropy
// is only a gradient (of the student's entropy; its statistics come with any other mode's statistics pass,
// row_softmax_stats with kWithEntropy, or from the top-k kernel's EntropyAcc).
enum Mode : int {
  kReverseKL = 0,
  kForwardKL = 1,
  kJSD = 2,
  kSkewForwardKL = 3,
  kSkewReverseKL = 4,
  kTVD = 5,
  kTokenLogprob = 6,
  kLogSumExp = 7,
  kEntropy = 8
};

// Output dtypes of the logit gradient (the student weight's dtype, so dH and dW GEMMs take it as is).
enum GradDtype : int { kGradFloat32 = 0, kGradBFloat16 = 1, kGradFloat16 = 2 };

// Largest top-k a block keeps in shared memory (as the Triton kernel's MAX_K); longer lists go to the
// torch backend.
constexpr int64_t kMaxTopK = 1024;

OPD_HD constexpr bool two_models(int mode) { return mode >= kReverseKL && mode < kTokenLogprob; }
OPD_HD constexpr bool is_kl(int mode) { return mode == kReverseKL || mode == kForwardKL; }
// The divergences whose per-element terms need both rows' final log-sum-exps (row_divergence_terms): their
// statistics pass keeps only each model's online (m, s).
OPD_HD constexpr bool has_terms(int mode) { return mode >= kJSD && mode <= kTVD; }
// The modes whose logit gradient reads the row's center (logit_grad_element).
OPD_HD constexpr bool reads_center(int mode) { return mode == kForwardKL || has_terms(mode) || mode == kEntropy; }

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
//
// The statistics pass may also keep the student's entropy sum t = Σ e^{z − m}(z − m) (EntropyAcc's t) relative to
// the student's own online (m, s), which are then EntropyAcc's m and s: one more accumulator per thread and one FMA
// per logit, the exponential shared. The adds below take it through a pointer `t` (a template flag, or kTrack, says
// whether; without it the code is the plain (m, s) update). When the max grows from m to m', t moves by the kl_shift
// rule against a model whose logits are all 0: t → e^{m − m'}(t + s (m − m')), 0 for an empty state.

// Which of a PairAcc's online states also keeps the entropy sum t (PairAcc::add_kl).
enum Track : int { kTrackNone = 0, kTrackLead = 1, kTrackOther = 2 };

// Online softmax: m = max z, s = Σ e^{z−m}, always relative to the current max. s = 0 marks an empty state (a
// non-empty one holds e^0 = 1 for its max).
struct OnlineAcc {
  float m, s;

  OPD_HD static OnlineAcc empty() { return {-INFINITY, 0.f}; }

  // kWithEntropy: *t is the entropy sum of the same logits, moved and added to alongside s.
  template <int kN, bool kWithEntropy = false>
  OPD_HD void add(const float (&z)[kN], float* t = nullptr) {
    float top = m;
    OPD_UNROLL
    for (int e = 0; e < kN; ++e) top = max_nan(top, z[e]);
    // While every logit so far is −inf the state stays empty (shift 0: each e^{−inf} adds 0), where e^{−inf − (−inf)}
    // would be NaN.
    const float shift = top == -INFINITY ? 0.f : top;
    const float f = expf(m - shift);
    if (kWithEntropy) *t = f * (*t + (s == 0.f ? 0.f : s * (m - shift)));
    s *= f;
    OPD_UNROLL
    for (int e = 0; e < kN; ++e) {
      const float d = z[e] - shift, ex = expf(d);
      s += ex;
      if (kWithEntropy) *t += ex * d;
    }
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

  // kTrack: which state's logits (x: lead, y: other) *t is the entropy sum of.
  template <int kN, int kTrack = kTrackNone>
  OPD_HD void add_kl(const float (&x)[kN], const float (&y)[kN], float* t = nullptr) {
    float top = lead.m, top_o = other.m;
    OPD_UNROLL
    for (int e = 0; e < kN; ++e) {
      top = max_nan(top, x[e]);
      top_o = max_nan(top_o, y[e]);
    }
    const float f = expf(lead.m - top);
    // An empty state has nothing to move (and its (m − m') − (m_o − m_o') is −inf − (−inf)).
    const float moved = lead.s == 0.f ? 0.f : lead.s * ((lead.m - top) - (other.m - top_o));
    if (kTrack == kTrackLead) *t = f * (*t + (lead.s == 0.f ? 0.f : lead.s * (lead.m - top)));
    if (kTrack == kTrackOther) {
      *t = expf(other.m - top_o) * (*t + (other.s == 0.f ? 0.f : other.s * (other.m - top_o)));
    }
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
      const float ey = expf(y[e] - top_o);
      other.s += ey;
      if (kTrack == kTrackLead) *t += ex * (x[e] - top);
      if (kTrack == kTrackOther) *t += ey * (y[e] - top_o);
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

// The statistics pass's state with the student's entropy (row_softmax_stats with kWithEntropy): the pair of online
// states and t = Σ e^{z_s − m_s}(z_s − m_s) of the student's final logits relative to the student's online
// (m_s, s_s), which with t make the student's EntropyAcc.
struct PairEntropyAcc {
  PairAcc pair;
  float t;
};

// The student's online state in a mode's PairAcc: the other model in forward KL, else the lead.
template <int kMode>
OPD_HD const OnlineAcc& student_of(const PairAcc& p) {
  return kMode == kForwardKL ? p.other : p.lead;
}

template <int kMode>
OPD_HD EntropyAcc student_entropy(const PairEntropyAcc& p) {
  const OnlineAcc& st = student_of<kMode>(p.pair);
  return {st.m, st.s, p.t};
}

// The pairs merge as MergePairAcc merges them, t as EntropyAcc's merge does (its m and s are the student's merged
// ones).
template <int kMode>
struct MergePairEntropyAcc {
  OPD_HD PairEntropyAcc operator()(const PairEntropyAcc& p, const PairEntropyAcc& q) const {
    const EntropyAcc student = merge(student_entropy<kMode>(p), student_entropy<kMode>(q));
    return {MergePairAcc<is_kl(kMode)>()(p.pair, q.pair), student.t};
  }
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

// A thread's share of a row's forward statistics: the heads applied, then the group added to the online state (with
// kWithEntropy, t the student's entropy sum next to its (m, s): PairEntropyAcc; unused, and no register, without it).
template <int kMode, bool kPlain, bool kWithEntropy>
struct StatsVisit {
  Head hs, ht;
  PairAcc acc;
  float t;

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
      acc.add_kl<kN, kWithEntropy ? kTrackLead : kTrackNone>(a, b, &t);  // the student leads
    } else if (kMode == kForwardKL) {
      acc.add_kl<kN, kWithEntropy ? kTrackOther : kTrackNone>(b, a, &t);  // the teacher leads
    } else {
      acc.lead.add<kN, kWithEntropy>(a, &t);
      if (has_terms(kMode)) acc.other.add(b);
    }
  }
};

template <int kMode, bool kPlain, bool kWithEntropy, class Group>
OPD_HD PairEntropyAcc stats_of_thread(const Group& g, const float* zs, const float* zt, int64_t width, const Head& hs,
                                      const Head& ht) {
  StatsVisit<kMode, kPlain, kWithEntropy> visit = {hs, ht, {OnlineAcc::empty(), OnlineAcc::empty(), 0.f}, 0.f};
  walk_row<two_models(kMode)>(g, zs, zt, width, visit);
  return {visit.acc, visit.t};
}

// The group-shared scratch of row_softmax_stats: one state per thread (20 or 24 bytes).
template <bool kWithEntropy>
using StatsScratch = typename std::conditional<kWithEntropy, PairEntropyAcc, PairAcc>::type;

// The group's merge of its threads' states; without the entropy, of the pairs alone (t stays 0).
template <int kMode, bool kWithEntropy, class Group>
OPD_HD PairEntropyAcc all_reduce_stats(const Group& g, const PairEntropyAcc& local,
                                       StatsScratch<kWithEntropy>* scratch) {
  if constexpr (kWithEntropy) {
    return all_reduce(g, local, MergePairEntropyAcc<kMode>(), scratch);
  } else {
    return {all_reduce(g, local.pair, MergePairAcc<is_kl(kMode)>(), scratch), 0.f};
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward statistics. The running state of a row lives in `state` at stride `stride` (= N) as
//     [m_s, s_s, m_t, s_t, acc]
// with, per mode (opd_fast.backends.online_softmax.finalize; lse = m + log s):
//     reverse KL:  acc = Σ e^{z_s − m_s}((z_s − m_s) − (z_t − m_t))   D = acc/s_s − log s_s + log s_t
//     forward KL:  acc = Σ e^{z_t − m_t}((z_t − m_t) − (z_s − m_s))   D = acc/s_t − log s_t + log s_s
//     token:       acc = z_y, the logit of the row's token (from the one chunk that holds it)
//     JSD, skew KLs, TVD, logsumexp: acc unused (the divergences' terms need the final lse: row_divergence_terms,
//                     a second pass)
// Each chunk's row state is reduced over the group, then merged into the running state by rank 0.
//
// With kWithEntropy, the same read also merges the student's final logits into its entropy state [m, s, a] at
// `entropy` (same stride; fresh: −inf, 0, 0; opd_fast.backends.online_softmax.finalize_entropy: H = log s − a / s), an
// EntropyAcc (m, s, t = a) reduced and merged exactly as the top-k kernel's: every mode but kEntropy may ask for it.
// The stats state is bitwise the same with and without it (the student's (m, s) are computed as they are without t).
template <int kMode, bool kWithEntropy, class Group>
OPD_HD void row_softmax_stats(const Group& g, const float* zs, const float* zt, int64_t width, int64_t y_col,
                              const Head& hs, const Head& ht, float* state, int64_t stride, float* entropy,
                              StatsScratch<kWithEntropy>* scratch) {
  const PairEntropyAcc local = hs.plain() && ht.plain()
                                   ? stats_of_thread<kMode, true, kWithEntropy>(g, zs, zt, width, hs, ht)
                                   : stats_of_thread<kMode, false, kWithEntropy>(g, zs, zt, width, hs, ht);
  const PairEntropyAcc reduced = all_reduce_stats<kMode, kWithEntropy>(g, local, scratch);
  if (g.rank() != 0) return;
  if (kWithEntropy) {
    const EntropyAcc merged =
        merge(EntropyAcc{entropy[0], entropy[stride], entropy[2 * stride]}, student_entropy<kMode>(reduced));
    entropy[0] = merged.m;
    entropy[stride] = merged.s;
    entropy[2 * stride] = merged.t;
  }
  const MergePairAcc<is_kl(kMode)> merge_rows;
  const PairAcc& row = reduced.pair;
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

// JSD(β) of one element without cancellation at any β (opd_fast/backends/torch_math.py: jsd_parts):
// with d = lp_t − lp_s, m/p_s = 1 + x, x = β·expm1(d), and m/p_t = 1 + y, y = (1 − β)·expm1(−d). Since
// Σ p_s x = Σ p_t y = 0, KL(p_s ‖ m) = Σ p_s (x − log1p x) and KL(p_t ‖ m) = Σ p_t (y − log1p y): terms ≥ 0,
// O(β²) as β → 0, where p_s log(p_s/m) would cancel. Returns (p_s, p_t, log(p_s / m), log(p_t / m), fs, ft).
struct JsdParts {
  float p_s, p_t, log_s, log_t, fs, ft;
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
  return {p_s, p_t, log_s, log_t, fs, ft};
}

// sign(d), 0 at ±0, NaN at NaN (d · 0), so that a NaN logit reaches TVD's gradient as it reaches the others.
OPD_HD float sign_nan(float d) { return d > 0.f ? 1.f : d < 0.f ? -1.f : d * 0.f; }

// One element of a divergence with a terms pass (has_terms), from the final log-probs: (p_s, a, b, pg), where Σ a
// and Σ b make the row's D (online_softmax.terms_loss) and pg = p_s · ∂D/∂p_s up to a per-row constant, so that the
// gradient is ∂D/∂z_s = pg − p_s · center with center = Σ pg. With m = β p_t + (1 − β) p_s (0 < β < 1; skew_forward_kl(α) =
// KL(p_t ‖ m) is β = α, skew_reverse_kl(α) = KL(p_s ‖ m) is β = 1 − α), fs and ft from jsd_parts and
// r = e^{log(p_t / m)} − 1 (expm1; log(p_t / m) ≤ log(1 / β), so nothing overflows):
//     mode             a              b    pg                           D
//     JSD(β)           fs             ft   (1 − β) p_s log(p_s / m)     β Σ ft + (1 − β) Σ fs
//     skew forward KL  fs             ft   −(1 − β) p_s r               Σ ft
//     skew reverse KL  fs             ft   p_s (log(p_s / m) + β r)     Σ fs
//     TVD              ½ |p_s − p_t|  0    ½ p_s sign(p_s − p_t)        Σ a     (β unused)
// (∂/∂p_s of −Σ p_t log m is −(1 − β) p_t / m; of Σ p_s log(p_s / m) it is log(p_s / m) + 1 − (1 − β) p_s / m =
// log(p_s / m) + β p_t / m, as m − (1 − β) p_s = β p_t; JSD's β and 1 − β mix of the two leaves (1 − β) log(p_s / m).
// The skew KLs' constants, −(1 − β) and β, are left out of pg (the centering removes them) so that every pg
// vanishes where p_s = p_t: subtracting a constant from itself in G = pg − p_s Σ pg left ~(Σ p_s − 1)·β per element
// on near-uniform rows.)
// Summing pg separately, rather than taking D as the center, keeps the center consistent with the per-element pg
// (online_softmax.terms_loss says why that matters).
struct TermsParts {
  float p_s, a, b, pg;
};

template <int kMode>
OPD_HD TermsParts terms_parts(float lp_s, float lp_t, float beta) {
  if (kMode == kTVD) {
    const float p_s = expf(lp_s), diff = p_s - expf(lp_t);
    return {p_s, 0.5f * fabsf(diff), 0.f, 0.5f * p_s * sign_nan(diff)};
  }
  const JsdParts e = jsd_parts(lp_s, lp_t, beta);
  const float pg = kMode == kJSD             ? (1.f - beta) * e.p_s * e.log_s
                   : kMode == kSkewForwardKL ? -(1.f - beta) * e.p_s * expm1f(e.log_t)
                                             : e.p_s * (e.log_s + beta * expm1f(e.log_t));
  return {e.p_s, e.fs, e.ft, pg};
}

// A row's log-sum-exp as the pair (lse, lo): lse rounded to fp32 and its residual lo = (m − lse) + log Σ e^{z − m}
// (opd_fast.backends.online_softmax.split_lse), kept apart like log_softmax keeps the max and log Σ apart. A
// log-probability (z − lse) − lo is accurate to ~ulp(log p); z − lse alone would carry ~ulp(lse) (5e-4 at lse ≈ 1e4).
// Stored as [2, N] per-row arrays: lse in row 0, lo in row 1.
struct RowLse {
  float lse;
  float lo;
  OPD_HD float log_prob(float z) const { return (z - lse) - lo; }
};

OPD_HD RowLse row_lse(const float* lse, int64_t i_n, int64_t n_rows) { return {lse[i_n], lse[n_rows + i_n]}; }

// A thread's share of a row's divergence terms (row_divergence_terms). Registers: the round's 16 logits (walk_row)
// plus one element's terms_parts at a time and the three sums.
template <int kMode, bool kPlain>
struct TermsVisit {
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
      const TermsParts part = terms_parts<kMode>(lp_s, lse_t.log_prob(ht.apply<kPlain>(y[e], j)), beta);
      sum.a += part.a;
      sum.b += part.b;
      sum.c += part.pg;
    }
  }
};

template <int kMode, bool kPlain, class Group>
OPD_HD Sum3 terms_of_thread(const Group& g, const float* zs, const float* zt, int64_t width, const Head& hs,
                            const Head& ht, RowLse lse_s, RowLse lse_t, float beta) {
  TermsVisit<kMode, kPlain> visit = {hs, ht, lse_s, lse_t, beta, {0.f, 0.f, 0.f}};
  walk_row<true>(g, zs, zt, width, visit);
  return visit.sum;
}

// The second pass of the has_terms modes, once both rows' lse are final: adds this chunk's Σ a to terms[0], Σ b to
// terms[stride] and Σ pg to terms[2 · stride] (terms_parts; online_softmax.terms_loss turns them into D and the
// center).
template <int kMode, class Group>
OPD_HD void row_divergence_terms(const Group& g, const float* zs, const float* zt, int64_t width, const Head& hs,
                                 const Head& ht, RowLse lse_s, RowLse lse_t, float beta, float* terms, int64_t stride,
                                 Sum3* scratch) {
  const Sum3 local = hs.plain() && ht.plain()
                         ? terms_of_thread<kMode, true>(g, zs, zt, width, hs, ht, lse_s, lse_t, beta)
                         : terms_of_thread<kMode, false>(g, zs, zt, width, hs, ht, lse_s, lse_t, beta);
  const Sum3 row = all_reduce(g, local, MergeSum3(), scratch);
  if (g.rank() != 0) return;
  terms[0] += row.a;
  terms[stride] += row.b;
  terms[2 * stride] += row.c;
}

// ---------------------------------------------------------------------------------------------------
// Logit gradients (the formulas of kernels/linear_grad.py), given the forward's per-row statistics:
//     reverse KL:            p_s (lp_s − lp_t − D)
//     forward KL:            p_s − p_t − p_s · center
//     JSD, skew KLs, TVD:    pg − p_s · center, pg from terms_parts
//     token:                 [v = y] − p_s
//     logsumexp:             p_s
//     entropy:               p_s (lp_s − center)
// The statistics give center = Σ pg (has_terms) and 0 (forward KL); the entropy's gradient pass gets center = −H and
// the row weight −w, so that G = w ∂H/∂z = −w p_s (lp_s + H). A hard-label cross-entropy term of weight w is
// folded in by the sweep: it scales the row weights by (1 − w) and lowers the center (reverse KL: D) by w / (1 − w),
// which adds CE's p_s part to G; its one-hot part is added outside the kernels.
template <int kMode>
OPD_HD float logit_grad_element(float lp_s, float lp_t, bool hit, float loss, float center, float beta) {
  if (has_terms(kMode)) {
    const TermsParts e = terms_parts<kMode>(lp_s, lp_t, beta);
    return e.pg - e.p_s * center;
  }
  const float p_s = expf(lp_s);
  if (kMode == kReverseKL) return p_s * (lp_s - lp_t - loss);
  if (kMode == kForwardKL) return p_s - expf(lp_t) - p_s * center;
  if (kMode == kTokenLogprob) return (hit ? 1.f : 0.f) - p_s;
  if (kMode == kEntropy) return p_s * (lp_s - center);
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
