// Weight-streaming matmul for few rows on CPU: Y[M, N] = X[M, K] @ W[K, N], an XLA FFI custom call.
//
// W is packed once (specdec/matmul.py) as column tiles [NB, K, 16] (NB = ceil(N / 16), zero padded):
// tile b holds columns 16b..16b+15, row k of the tile is 16 contiguous floats. One pass over a
// block of tiles reads each weight once from memory and keeps it in L2 while every group of rows
// runs over it, so a block of T rows costs ~ one row's memory traffic plus T FMAs per weight —
// the memory-bound regime where a verification block of 2-16 tokens costs about one token.
//
// Numerics: every output element is one FMA chain over k = 0..K-1 in order, whatever M, the row
// group or the ISA, so a row's result does not depend on which other rows are in the call
// (greedy speculative decoding sees the same logits as AR decoding).
//
// Threads: chunks of column blocks, shared with a helper on XLA's thread pool (parallel.h).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 16;
#ifndef SPECDEC_PREFETCH
#define SPECDEC_PREFETCH 8
#endif
// Software prefetch distance in weight rows (cache lines) ahead of the FMAs: more misses in
// flight than the hardware prefetcher keeps alone (measured: benchmarks/ar_vs_hf.py).
constexpr int64_t kPrefetch = SPECDEC_PREFETCH;

struct Problem {
  const float* x;  // [M, K]
  const float* w;  // [NB, K, 16]
  float* y;        // [M, N]
  int64_t m, k, n, nb;
};

// ---- AVX-512: blocks of NT tiles (NT zmm per row), MR rows --------------------------------------
template <int MR, int NT>
__attribute__((target("avx512f"))) void block512(const Problem& p, int64_t r0, int64_t b0) {
  __m512 acc[MR][NT];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  const float* w = p.w + b0 * p.k * kTile;
  const float* x = p.x + r0 * p.k;
  for (int64_t kk = 0; kk < p.k; ++kk) {
    __m512 wv[NT];
    for (int t = 0; t < NT; ++t) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (t * p.k + kk + kPrefetch) * kTile), _MM_HINT_T0);
      wv[t] = _mm512_loadu_ps(w + (t * p.k + kk) * kTile);
    }
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * p.k + kk]);
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fmadd_ps(xv, wv[t], acc[r][t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    const int64_t col = (b0 + t) * kTile;
    const int64_t rem = std::min<int64_t>(kTile, p.n - col);
    const __mmask16 mask = static_cast<__mmask16>((1u << rem) - 1u);
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(p.y + (r0 + r) * p.n + col, mask, acc[r][t]);
  }
}

// ---- AVX2 + FMA: one tile per block (two ymm per row), MR rows ----------------------------------
// Pass g of G over the tile (G row groups): G == 1 prefetches its own tile ahead; with several
// passes the tile is in L1/L2 after the first, so every pass prefetches 1/G of the *next* tile,
// spread over its k steps: memory streams while the later passes compute (Zen 3, one run:
// T=8 1.97x -> 1.29x, T=16 3.5x -> 1.6x a T=1 pass over the embedded target's weights).
// K in a local, restrict and unrolled row loops: without them GCC kept the accumulators in memory
// and stored all 2*MR of them on every k step (a third of the FMA rate).
template <int MR>
__attribute__((target("avx2,fma"))) void block256(const Problem& p, int64_t r0, int64_t b0, int64_t g,
                                                  int64_t groups) {
  const int64_t K = p.k;
  const float* __restrict w = p.w + b0 * K * kTile;
  const float* __restrict x = p.x + r0 * K;
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    lo[r] = _mm256_setzero_ps();
    hi[r] = _mm256_setzero_ps();
  }
  const bool ahead = groups > 1 && b0 + 1 < p.nb;
  const char* pf = reinterpret_cast<const char*>(ahead ? w + (K + g * K / groups) * kTile : w + kPrefetch * kTile);
  const int64_t every = ahead ? groups : 1;
  for (int64_t kk = 0, count = 0; kk < K; ++kk) {
    if (++count == every) {
      count = 0;
      _mm_prefetch(pf, _MM_HINT_T0);
      pf += kTile * sizeof(float);
    }
    const __m256 w0 = _mm256_loadu_ps(w + kk * kTile), w1 = _mm256_loadu_ps(w + kk * kTile + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * K + kk);
      lo[r] = _mm256_fmadd_ps(xv, w0, lo[r]);
      hi[r] = _mm256_fmadd_ps(xv, w1, hi[r]);
    }
  }
  const int64_t col = b0 * kTile;
  const int64_t rem = std::min<int64_t>(kTile, p.n - col);
  alignas(32) float buf[kTile];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    float* out = p.y + (r0 + r) * p.n + col;
    if (rem == kTile) {
      _mm256_storeu_ps(out, lo[r]);
      _mm256_storeu_ps(out + 8, hi[r]);
    } else {  // the last, partial tile
      _mm256_store_ps(buf, lo[r]);
      _mm256_store_ps(buf + 8, hi[r]);
      std::copy(buf, buf + rem, out);
    }
  }
}

// ---- portable fallback (no AVX2): the same FMA chain per element, in scalar code ---------------
void block_scalar(const Problem& p, int64_t r0, int64_t rows, int64_t b0) {
  const int64_t col = b0 * kTile, rem = std::min<int64_t>(kTile, p.n - col);
  const float* w = p.w + b0 * p.k * kTile;
  for (int64_t r = r0; r < r0 + rows; ++r)
    for (int64_t j = 0; j < rem; ++j) {
      float a = 0.f;
      for (int64_t kk = 0; kk < p.k; ++kk) a = __builtin_fmaf(p.x[r * p.k + kk], w[kk * kTile + j], a);
      p.y[r * p.n + col + j] = a;
    }
}

// Rows in balanced groups of at most `max_rows` (16 rows = 8 + 8, not 12 + 4: a small group
// leaves most accumulator registers idle while it re-reads the weights).
template <typename Fn>
void rows_in_groups(int64_t m, int64_t max_rows, const Fn& fn) {
  const int64_t groups = (m + max_rows - 1) / max_rows, base = m / groups, extra = m % groups;
  for (int64_t g = 0, r0 = 0; g < groups; ++g) {
    const int64_t mr = base + (g < extra ? 1 : 0);
    fn(r0, mr, g, groups);
    r0 += mr;
  }
}

template <int NT, int... MRs>
void rows512(const Problem& p, int64_t b0, std::integer_sequence<int, MRs...>) {
  constexpr int kMaxRows = 12;  // 12 rows x 2 tiles = 24 accumulators of the 32 zmm registers
  using Fn = void (*)(const Problem&, int64_t, int64_t);
  static constexpr Fn table[] = {block512<MRs + 1, NT>...};
  rows_in_groups(p.m, kMaxRows, [&](int64_t r0, int64_t mr, int64_t, int64_t) { table[mr - 1](p, r0, b0); });
}

template <int... MRs>
void rows256(const Problem& p, int64_t b0, std::integer_sequence<int, MRs...>) {
  constexpr int kMaxRows = 6;  // 6 rows x 2 ymm = 12 accumulators + 2 weights + 1 broadcast
  using Fn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t);
  static constexpr Fn table[] = {block256<MRs + 1>...};
  rows_in_groups(p.m, kMaxRows,
                 [&](int64_t r0, int64_t mr, int64_t g, int64_t groups) { table[mr - 1](p, r0, b0, g, groups); });
}

using specdec::Isa, specdec::kScalar, specdec::kAvx2, specdec::kAvx512;

// Column blocks [c0, c1): a block is 2 tiles on AVX-512, 1 tile otherwise.
void run_blocks(const Problem& p, Isa isa, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    if (isa == kAvx512) {
      const int64_t b0 = 2 * c;
      if (b0 + 1 < p.nb)
        rows512<2>(p, b0, std::make_integer_sequence<int, 12>{});
      else
        rows512<1>(p, b0, std::make_integer_sequence<int, 12>{});
    } else if (isa == kAvx2) {
      rows256(p, c, std::make_integer_sequence<int, 6>{});
    } else {
      block_scalar(p, 0, p.m, c);
    }
  }
}

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> y, int64_t isa_attr, int64_t threads_attr) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kTile)
    return ffi::Error::InvalidArgument("packed_matmul: want x [M, K], w [NB, K, 16], y [M, N]");
  const int64_t m = xd[0], k = xd[1], n = yd[1], nb = wd[0];
  if (wd[1] != k || yd[0] != m || nb != (n + kTile - 1) / kTile)
    return ffi::Error::InvalidArgument("packed_matmul: shapes of x, w and y disagree");
  if (m == 0 || n == 0) return ffi::Error::Success();

  const Isa isa = specdec::run_isa(isa_attr);
  const Problem p{x.typed_data(), w.typed_data(), y->typed_data(), m, k, n, nb};
  const int64_t blocks = isa == kAvx512 ? (nb + 1) / 2 : nb;
  int64_t threads = threads_attr > 0 ? threads_attr : std::min<int64_t>(pool.num_threads(), 2);
  // Several chunks per thread, so a helper that starts late still takes a fair share.
  const int64_t chunk = std::max<int64_t>(1, blocks / (4 * std::max<int64_t>(threads, 1)));
  const int64_t chunks = (blocks + chunk - 1) / chunk;
  specdec::parallel_for(pool, chunks, threads, [&](int64_t c) {
    run_blocks(p, isa, c * chunk, std::min(blocks, (c + 1) * chunk));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads"));

