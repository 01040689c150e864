// GQA attention of a block of T new tokens over one layer of the KV cache, on CPU (XLA FFI).
//
//   out[b, t, hq, :] = softmax_j(q[b, t, hq] . k[layer, b, j, h] * scale | mask[b, t, j]) @ v[..]
//
// with h = hq / G (G query heads per KV head). Only slots j < limit[b] are read: a cache of 2,048
// slots holding a 200-token conversation costs 200 slots, not 2,048 (XLA's einsum reads them all,
// after copying K and V to a head-major layout on every layer).
//
// Vectorisation: the rows of one KV head (t, g) are the lanes of a vector (16 on AVX-512, 8 on
// AVX2) for q.k, the softmax and p @ v. Numerics: each row's scores, max, exponentials, sum
// (j ascending) and output are computed in the same order whatever T, the other rows or the lane
// they sit in, so a row's result does not depend on the block it is part of (greedy speculative =
// AR). Masked slots contribute exactly nothing; a row that sees no slot gets zeros (a task of
// such rows only is skipped).
//
// Long contexts: past kSplit slots the slots are cut at fixed multiples of kSplit, each piece a
// task of its own (its max, sum of exponentials and unnormalised p @ v), merged per row by
// log-sum-exp in piece order: a decode step at 8K slots has 16 tasks per KV head for 2 threads
// instead of one. The cuts depend on slot indices alone, so a row's result still does not depend
// on its block: a piece it sees nothing of weighs exactly 0, and with one visible piece the merge
// reproduces the one-piece result bit for bit (its weight exp(0) is exactly 1).
//
// `specdec_cache_attention_lse` also returns each row's log-sum-exp of scaled scores (-1e30 for a
// row that sees no slot), so a caller can merge this attention with attention over other keys
// (a shared prefix, `specdec.attention.attend_shared`).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Lanes per vector: 16 floats on AVX-512, 8 on AVX2 (a 16-lane vector there is two ymm halves:
// the p @ v accumulators no longer fit the 16 registers and spilled, measured on Zen 3: the AR step
// was ~5 ms slower than with XLA's attention). Rows of a KV head fill the lanes.
template <int L>
struct Vec {
  typedef float f __attribute__((vector_size(4 * L)));
  typedef int32_t i __attribute__((vector_size(4 * L)));
  typedef float fu __attribute__((vector_size(4 * L), aligned(4)));  // in scratch buffers: unaligned
};

constexpr int64_t kSplit = 512;  // slots per piece of a long context (see the top)
constexpr float kNoneLse = -1e30f;  // the log-sum-exp of a row that sees no slot (XLA side: NEG_INF)

struct Problem {
  const float* q;        // [B, T, Hq, D]
  const float* k;        // [L, B, S, Hkv, D]
  const float* v;        // [L, B, S, Hkv, D]
  const bool* mask;      // [B, T, S]
  const int32_t* limit;  // [B]
  float* out;            // [B, T, Hq * D]
  float* lse;            // [B, T, Hq] or null
  int64_t b, t, hq, hkv, d, s, layer;
  float scale;
};

// exp for x <= 0 (x = score - row max), lane-wise: Cody-Waite reduction and a degree-6 polynomial
// (relative error ~2 ulp); always this function, so every row gets identical exponentials.
template <typename vf, typename vi>
__attribute__((always_inline)) static inline vf vexp(vf x) {
  x = x < -87.0f ? vf{} - 87.0f : x;  // exp(-87) ~ 1.6e-38: still a normal float
  const vf magic = vf{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * 1.44269504f + magic) - magic;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// One task: KV head h of row b, block rows r0 .. r0+nr-1 (row r = t * G + g), nr <= L, over the
// slots [j0, j1). `part` null: the whole visible range, normalised into `out`; else one piece's
// partial result for `merge_rows`: part = [max (L), sum (L), p @ v (d x L)], lanes innermost.
template <int L>
__attribute__((always_inline)) inline void attend_rows(const Problem& p, int64_t b, int64_t h, int64_t r0,
                                                       int64_t nr, int64_t j0, int64_t j1, float* part,
                                                       std::vector<float>& buf) {
  typedef typename Vec<L>::f vf;
  typedef typename Vec<L>::i vi;
  typedef typename Vec<L>::fu vf_u;
  constexpr int kLanes = L;
  const int64_t g_per = p.hq / p.hkv, d = p.d;
  const int64_t lim = std::min<int64_t>(std::min<int64_t>(std::max<int32_t>(p.limit[b], 0), p.s), j1);
  buf.resize((d + std::max<int64_t>(lim - j0, 0)) * kLanes);
  vf_u* qt = reinterpret_cast<vf_u*>(buf.data());  // q transposed: qt[i][lane] = q[row lane][i] * scale
  vf_u* sc = qt + d;                                // scores, then exponentials: sc[j - j0][lane]
  int64_t trow[kLanes];
  for (int lane = 0; lane < kLanes; ++lane) trow[lane] = lane < nr ? (r0 + lane) / g_per : -1;
  for (int64_t i = 0; i < d; ++i) {
    vf col{};
    for (int lane = 0; lane < nr; ++lane) {
      const int64_t r = r0 + lane, hq = h * g_per + r % g_per;
      col[lane] = p.q[((b * p.t + r / g_per) * p.hq + hq) * d + i] * p.scale;
    }
    qt[i] = col;
  }
  const int64_t stride = p.hkv * d;
  const float* kb = p.k + ((p.layer * p.b + b) * p.s) * stride + h * d;
  const float* vb = p.v + ((p.layer * p.b + b) * p.s) * stride + h * d;
  const bool* mb = p.mask + b * p.t * p.s;
  // A task none of whose rows sees a slot (block tokens a flattened ragged block did not compute,
  // masked out entirely) writes zeros, as any such row would get, and skips the work.
  const float neg_inf = -std::numeric_limits<float>::infinity();
  bool seen = false;
  for (int64_t j = j0; j < lim && !seen; ++j)
    for (int lane = 0; lane < nr && !seen; ++lane) seen = mb[trow[lane] * p.s + j];
  if (!seen && part != nullptr) {  // max -inf, sum 0, p @ v 0: weighs exactly nothing in the merge
    std::fill(part, part + kLanes, neg_inf);
    std::fill(part + kLanes, part + (2 + d) * kLanes, 0.f);
    return;
  }
  if (!seen) {
    for (int lane = 0; lane < nr; ++lane) {
      const int64_t r = r0 + lane, o = (b * p.t + r / g_per) * p.hq + h * g_per + r % g_per;
      std::memset(p.out + o * d, 0, d * sizeof(float));
      if (p.lse != nullptr) p.lse[o] = kNoneLse;
    }
    return;
  }
  auto visible = [&](int64_t j) __attribute__((always_inline)) {
    vi vis{};
    for (int lane = 0; lane < nr; ++lane) vis[lane] = mb[trow[lane] * p.s + j] ? -1 : 0;
    return vis;
  };
  // q . k: four slots at a time (four independent FMA chains share each q load); each score is
  // still one chain over i in order.
  vf mx = vf{} + neg_inf;
  int64_t j = j0;
  for (; j + 4 <= lim; j += 4) {
    const float *k0 = kb + j * stride, *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
    vf s0{}, s1{}, s2{}, s3{};
    for (int64_t i = 0; i < d; ++i) {
      const vf q = qt[i];
      s0 += q * k0[i];
      s1 += q * k1[i];
      s2 += q * k2[i];
      s3 += q * k3[i];
    }
    const vf s4[4] = {s0, s1, s2, s3};
    for (int u = 0; u < 4; ++u) {
      const vf sv = visible(j + u) ? s4[u] : vf{} + neg_inf;
      sc[j - j0 + u] = sv;
      mx = sv > mx ? sv : mx;
    }
  }
  for (; j < lim; ++j) {
    const float* kr = kb + j * stride;
    vf sv{};
    for (int64_t i = 0; i < d; ++i) sv += qt[i] * kr[i];
    sv = visible(j) ? sv : vf{} + neg_inf;
    sc[j - j0] = sv;
    mx = sv > mx ? sv : mx;
  }
  vf sum{};
  const vi none = mx == neg_inf;  // rows that see no slot
  const vf mx0 = none ? vf{} : mx;
  for (j = j0; j < lim; ++j) {
    const vf sv = sc[j - j0];
    const vf e = sv == neg_inf ? vf{} : vexp<vf, vi>(sv - mx0);
    sc[j - j0] = e;
    sum += e;
  }
  // p @ v with rows as lanes: 8 output columns at a time, each one chain over j in order.
  const vf inv = sum > 0.f ? 1.f / sum : vf{};
  vf_u* pv = reinterpret_cast<vf_u*>(part);  // partial: [max, sum, p @ v columns]
  if (part != nullptr) {
    pv[0] = mx;
    pv[1] = sum;
  }
  float* outs[kLanes];
  for (int lane = 0; lane < nr; ++lane) {
    const int64_t r = r0 + lane, o = (b * p.t + r / g_per) * p.hq + h * g_per + r % g_per;
    outs[lane] = p.out + o * d;
    if (part == nullptr && p.lse != nullptr) p.lse[o] = sum[lane] > 0.f ? mx[lane] + std::log(sum[lane]) : kNoneLse;
  }
  constexpr int kCols = 8;
  for (int64_t c = 0; c < d; c += kCols) {
    const int64_t nc = std::min<int64_t>(kCols, d - c);
    vf acc[kCols] = {};
    if (nc == kCols) {
      for (j = j0; j < lim; ++j) {
        const vf pj = sc[j - j0];
        const float* vr = vb + j * stride + c;
        for (int u = 0; u < kCols; ++u) acc[u] += pj * vr[u];
      }
    } else {
      for (j = j0; j < lim; ++j)
        for (int u = 0; u < nc; ++u) acc[u] += sc[j - j0] * vb[j * stride + c + u];
    }
    if (part != nullptr) {
      for (int u = 0; u < nc; ++u) pv[2 + c + u] = acc[u];
      continue;
    }
    for (int u = 0; u < nc; ++u) {
      const vf o = acc[u] * inv;
      for (int lane = 0; lane < nr; ++lane) outs[lane][c + u] = o[lane];
    }
  }
}

// Merge a task's `pieces` partial results (`attend_rows` with `part`, piece order) into `out`:
// weights exp(max_piece - max) (exactly 0 for a piece a row saw nothing of), sums and p @ v
// accumulated in piece order, then normalised as the one-piece path does.
template <int L>
__attribute__((always_inline)) inline void merge_rows(const Problem& p, int64_t b, int64_t h, int64_t r0,
                                                      int64_t nr, const float* parts, int64_t pieces) {
  typedef typename Vec<L>::f vf;
  typedef typename Vec<L>::i vi;
  typedef typename Vec<L>::fu vf_u;
  const int64_t g_per = p.hq / p.hkv, d = p.d, size = (2 + d);
  const vf_u* pv = reinterpret_cast<const vf_u*>(parts);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  vf mx = vf{} + neg_inf;
  for (int64_t k = 0; k < pieces; ++k) mx = pv[k * size] > mx ? pv[k * size] : mx;
  const vf mx0 = mx == neg_inf ? vf{} : mx;
  vf sum{};
  std::vector<float> wbuf(pieces * L);
  vf_u* w = reinterpret_cast<vf_u*>(wbuf.data());  // per-piece weights (unaligned storage, as `buf`)
  for (int64_t k = 0; k < pieces; ++k) {
    const vf m = pv[k * size];
    w[k] = m == neg_inf ? vf{} : vexp<vf, vi>(m - mx0);
    sum += w[k] * pv[k * size + 1];
  }
  const vf inv = sum > 0.f ? 1.f / sum : vf{};
  if (p.lse != nullptr)
    for (int lane = 0; lane < nr; ++lane) {
      const int64_t r = r0 + lane;
      p.lse[(b * p.t + r / g_per) * p.hq + h * g_per + r % g_per] =
          sum[lane] > 0.f ? mx0[lane] + std::log(sum[lane]) : kNoneLse;
    }
  for (int64_t c = 0; c < d; ++c) {
    vf acc{};
    for (int64_t k = 0; k < pieces; ++k) acc += w[k] * pv[k * size + 2 + c];
    const vf o = acc * inv;
    for (int lane = 0; lane < nr; ++lane) {
      const int64_t r = r0 + lane;
      p.out[((b * p.t + r / g_per) * p.hq + h * g_per + r % g_per) * d + c] = o[lane];
    }
  }
}

__attribute__((target("avx512f"))) void attend_rows16(const Problem& p, int64_t b, int64_t h, int64_t r0,
                                                      int64_t nr, int64_t j0, int64_t j1, float* part,
                                                      std::vector<float>& buf) {
  attend_rows<16>(p, b, h, r0, nr, j0, j1, part, buf);
}
__attribute__((target("avx2,fma"))) void attend_rows8(const Problem& p, int64_t b, int64_t h, int64_t r0,
                                                     int64_t nr, int64_t j0, int64_t j1, float* part,
                                                     std::vector<float>& buf) {
  attend_rows<8>(p, b, h, r0, nr, j0, j1, part, buf);
}
void attend_rows_default(const Problem& p, int64_t b, int64_t h, int64_t r0, int64_t nr, int64_t j0, int64_t j1,
                         float* part, std::vector<float>& buf) {
  attend_rows<8>(p, b, h, r0, nr, j0, j1, part, buf);
}
__attribute__((target("avx512f"))) void merge_rows16(const Problem& p, int64_t b, int64_t h, int64_t r0,
                                                     int64_t nr, const float* parts, int64_t pieces) {
  merge_rows<16>(p, b, h, r0, nr, parts, pieces);
}
__attribute__((target("avx2,fma"))) void merge_rows8(const Problem& p, int64_t b, int64_t h, int64_t r0,
                                                    int64_t nr, const float* parts, int64_t pieces) {
  merge_rows<8>(p, b, h, r0, nr, parts, pieces);
}
void merge_rows_default(const Problem& p, int64_t b, int64_t h, int64_t r0, int64_t nr, const float* parts,
                        int64_t pieces) {
  merge_rows<8>(p, b, h, r0, nr, parts, pieces);
}

ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                  ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::PRED> mask,
                  ffi::Buffer<ffi::S32> limit, float* out, float* lse, float scale, int64_t isa_attr,
                  int64_t threads_attr) {
  const auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || md.size() != 3 ||
      !std::equal(kd.begin(), kd.end(), v.dimensions().begin(), v.dimensions().end()))
    return ffi::Error::InvalidArgument("cache_attention: want q [B,T,Hq,D], k/v [L,B,S,Hkv,D], mask [B,T,S]");
  Problem p{q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(), limit.typed_data(),
            out, lse, qd[0], qd[1], qd[2], kd[3], qd[3], kd[2], layer.typed_data()[0], scale};
  if (kd[1] != p.b || kd[4] != p.d || p.hq % p.hkv || md[0] != p.b || md[1] != p.t || md[2] != p.s)
    return ffi::Error::InvalidArgument("cache_attention: shapes of q, k/v and mask disagree");
  if (p.layer < 0 || p.layer >= kd[0]) return ffi::Error::InvalidArgument("cache_attention: layer out of range");
  const specdec::Isa isa = specdec::run_isa(isa_attr);
  const int64_t lanes = isa == specdec::kAvx512 ? 16 : 8;
  const auto rows_fn = isa == specdec::kAvx512 ? attend_rows16
                       : isa == specdec::kAvx2 ? attend_rows8
                                               : attend_rows_default;
  const auto merge_fn = isa == specdec::kAvx512 ? merge_rows16
                        : isa == specdec::kAvx2 ? merge_rows8
                                                : merge_rows_default;
  const int64_t rows = p.t * (p.hq / p.hkv), groups = (rows + lanes - 1) / lanes;
  const int64_t tasks = p.b * p.hkv * groups;
  int64_t work = 0, longest = 0;
  for (int64_t b = 0; b < p.b; ++b) {
    work += p.limit[b];
    longest = std::max<int64_t>(longest, std::min<int64_t>(p.limit[b], p.s));
  }
  // A helper is worth its wake-up only for enough work (rows x slots x head dim).
  const int64_t threads =
      threads_attr > 0 ? threads_attr : (work * rows * p.hkv * p.d > (1 << 18) ? pool.num_threads() : 1);
  const int64_t pieces = (longest + kSplit - 1) / kSplit;
  if (pieces <= 1) {
    specdec::parallel_for(pool, tasks, std::min<int64_t>(threads, 2), [&](int64_t i) {
      thread_local std::vector<float> buf;
      const int64_t g = i % groups, h = (i / groups) % p.hkv, b = i / (groups * p.hkv);
      rows_fn(p, b, h, g * lanes, std::min<int64_t>(lanes, rows - g * lanes), 0, p.s, nullptr, buf);
    });
    return ffi::Error::Success();
  }
  const int64_t size = (2 + p.d) * lanes;  // one piece's partial result
  // Every entry is written by its task before the merge reads it: a buffer that only grows, so a
  // call (every layer of every step) neither allocates nor zero-fills it.
  thread_local std::vector<float> parts_buf;
  if (parts_buf.size() < static_cast<size_t>(tasks * pieces * size)) parts_buf.resize(tasks * pieces * size);
  float* const parts = parts_buf.data();
  specdec::parallel_for(pool, tasks * pieces, std::min<int64_t>(threads, 2), [&](int64_t i) {
    thread_local std::vector<float> buf;
    const int64_t k = i % pieces, t = i / pieces;
    const int64_t g = t % groups, h = (t / groups) % p.hkv, b = t / (groups * p.hkv);
    rows_fn(p, b, h, g * lanes, std::min<int64_t>(lanes, rows - g * lanes), k * kSplit, (k + 1) * kSplit,
            parts + i * size, buf);
  });
  specdec::parallel_for(pool, tasks, std::min<int64_t>(threads, 2), [&](int64_t t) {
    const int64_t g = t % groups, h = (t / groups) % p.hkv, b = t / (groups * p.hkv);
    merge_fn(p, b, h, g * lanes, std::min<int64_t>(lanes, rows - g * lanes), parts + t * pieces * size,
             pieces);
  });
  return ffi::Error::Success();
}

ffi::Error CacheAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                              ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> layer,
                              ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> limit,
                              ffi::ResultBuffer<ffi::F32> out, float scale, int64_t isa_attr,
                              int64_t threads_attr) {
  return Attend(pool, q, k, v, layer, mask, limit, out->typed_data(), nullptr, scale, isa_attr, threads_attr);
}

ffi::Error CacheAttentionLseImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                 ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> layer,
                                 ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> limit,
                                 ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, float scale,
                                 int64_t isa_attr, int64_t threads_attr) {
  return Attend(pool, q, k, v, layer, mask, limit, out->typed_data(), lse->typed_data(), scale, isa_attr,
                threads_attr);
}

}  // namespace

#define SPECDEC_ATTENTION_ARGS                  \
  ffi::Ffi::Bind()                              \
      .Ctx<ffi::ThreadPool>()                   \
      .Arg<ffi::Buffer<ffi::F32>>() /* q */     \
      .Arg<ffi::Buffer<ffi::F32>>() /* k */     \
      .Arg<ffi::Buffer<ffi::F32>>() /* v */     \
      .Arg<ffi::Buffer<ffi::S32>>() /* layer */ \
      .Arg<ffi::Buffer<ffi::PRED>>() /* mask */ \
      .Arg<ffi::Buffer<ffi::S32>>() /* limit */

XLA_FFI_DEFINE_HANDLER_SYMBOL(CacheAttention, CacheAttentionImpl,
                              SPECDEC_ATTENTION_ARGS.Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CacheAttentionLse, CacheAttentionLseImpl,
                              SPECDEC_ATTENTION_ARGS.Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()                    // lse
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads"));
