// Native float32 CPU kernels called through XLA's FFI (see native.py):
// - PackedMatmul: y[M, N] = x[M, K] @ W, W packed as panels [N / 16, K, 16];
// - QuantMatmul: the same with W in GGUF block codes (4- or 8-bit codes and per-block scales, see below);
// - DotMatmul: the same codes against x rounded to int8 per block of 32, with integer dot products (opt-in);
// - PagedAttention: causal (optionally sliding-window) GQA attention that reads K/V straight from the page pool
//   through each row's page table, and only up to each query's position.
//
// Why the matmul: XLA:CPU's small-M float32 dots (decode steps of 1..64 rows) run at a fraction of the machine's FMA
// throughput (~30-70 GFLOP/s on 2 Zen3 cores), and a [K, N] row-major weight read 16 columns at a time is a strided
// stream. A panel-major weight is one contiguous stream per 16 output columns, held in L1/L2 while every 6-row tile
// of x passes over it: each weight byte comes from DRAM once per call whatever M is.
//
// Why the attention: as XLA ops, paged attention gathers every row's pages (padded to the page-table bucket) into a
// new array and runs batched matrix-vector dots on it; at a few hundred tokens of context that cost more than all
// the weight matmuls of a decode step, and a prefill chunk scores every key of the table, causal or not. Here each
// query streams only its own keys, in place, with an online softmax, and the G query heads that share a kv head
// share every key and value load.
//
// Compiled on the user's machine with -march=native (see native.py), so GCC vector extensions become AVX2/AVX-512
// or NEON as the CPU allows. Panels are split across XLA's intra-op thread pool.

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));
constexpr int64_t kPanel = 16;
constexpr int64_t kMaxHeads = 256;  // query heads per attention call

inline v8 Load(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void Store(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline v8 Splat(float a) { return v8{a, a, a, a, a, a, a, a}; }

// MR rows of x times one panel: 2*MR accumulators, which hide the FMA latency for MR >= 5.
template <int MR>
inline void Tile(const float* x, int64_t K, const float* w, float* y, int64_t ldy) {
  v8 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = Splat(0.f);
  for (int64_t k = 0; k < K; ++k) {
    const v8 w0 = Load(w + k * kPanel), w1 = Load(w + k * kPanel + 8);
    for (int r = 0; r < MR; ++r) {
      const v8 a = Splat(x[r * K + k]);
      acc[r][0] += a * w0;
      acc[r][1] += a * w1;
    }
  }
  for (int r = 0; r < MR; ++r) { Store(y + r * ldy, acc[r][0]); Store(y + r * ldy + 8, acc[r][1]); }
}

// One row: two interleaved k-streams give four independent accumulators.
inline void Row(const float* x, int64_t K, const float* w, float* y) {
  v8 a0 = Splat(0.f), a1 = a0, b0 = a0, b1 = a0;
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    const v8 xa = Splat(x[k]), xb = Splat(x[k + 1]);
    a0 += xa * Load(w + k * kPanel);
    a1 += xa * Load(w + k * kPanel + 8);
    b0 += xb * Load(w + (k + 1) * kPanel);
    b1 += xb * Load(w + (k + 1) * kPanel + 8);
  }
  for (; k < K; ++k) {
    const v8 xa = Splat(x[k]);
    a0 += xa * Load(w + k * kPanel);
    a1 += xa * Load(w + k * kPanel + 8);
  }
  Store(y, a0 + b0);
  Store(y + 8, a1 + b1);
}

void Panel(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N) {
  if (M == 1) return Row(x, K, w, y);
  int64_t m = 0;
  if (M < 30 && M % 6 != 0) {
    // Few rows: tiles of 5 (10 accumulators still hide the FMA latency), where tiles of 6 would leave a tile of 2-4
    // rows (50-65% of the FMA peak) for a large share of the rows. A leftover row joins a 5 to make a 6. With more
    // rows, 6s measured faster in model steps (a 512-token step was ~5% slower in tiles of 5).
    if (M % 5 == 1 && M > 5) { Tile<6>(x, K, w, y, N); m = 6; }
    for (; M - m >= 5; m += 5) Tile<5>(x + m * K, K, w, y + m * N, N);
  }
  // Tiles of 6 rows (12 accumulators + 2 weight vectors + 1 broadcast = 15 of 16 AVX2 registers); 8 = 4 + 4.
  while (M - m >= 6 && M - m != 8) { Tile<6>(x + m * K, K, w, y + m * N, N); m += 6; }
  while (M - m >= 4) { Tile<4>(x + m * K, K, w, y + m * N, N); m += 4; }
  switch (M - m) {
    case 3: Tile<3>(x + m * K, K, w, y + m * N, N); break;
    case 2: Tile<2>(x + m * K, K, w, y + m * N, N); break;
    case 1: Tile<1>(x + m * K, K, w, y + m * N, N); break;
  }
}

// Items [0, n) shared between the calling thread and pool tasks; a task that starts after the work is done exits
// at once. The state is shared-owned because a task may start after the handler has returned. Below ~256 KB of
// memory traffic (`bytes`) the call runs inline: waking a worker costs more than it saves, and on a busy machine
// the caller can end up waiting for a descheduled worker's chunk.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t bytes, F body) {
  if (bytes < (256 << 10)) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct State {
    F body;
    int64_t n, chunk;
    std::atomic<int64_t> next{0}, done{0};
    explicit State(F f) : body(std::move(f)) {}
    void Work() {
      for (int64_t start; (start = next.fetch_add(chunk)) < n;) {
        const int64_t end = std::min(start + chunk, n);
        for (int64_t i = start; i < end; ++i) body(i);
        done.fetch_add(end - start, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(std::move(body));
  state->n = n;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
  // A few chunks per thread balance the load without much contention on the counter.
  state->chunk = std::max<int64_t>(1, n / (4 * threads));
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([state] { state->Work(); });
  state->Work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || wd[1] != xd[1]) {
    return ffi::Error::InvalidArgument("packed_matmul wants x [M, K] and w [N / 16, K, 16]");
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t M = xd[0], K = xd[1], N = wd[0] * kPanel;
  ParallelFor(pool, wd[0], 4 * (M * K + wd[0] * K * kPanel),
              [=](int64_t p) { Panel(xp, M, K, wp + p * K * kPanel, yp + p * kPanel, N); });
  return ffi::Error::Success();
}

typedef int32_t v8i __attribute__((vector_size(32)));

// Block-quantised panels (GGUF Q4_0/Q4_1/Q4_K/Q8_0 weights in their own codes): per panel, K / 32 blocks of
// {float d[16], float m[16], codes[32][16]} for w[k][j] = d[j] * code[k][j] + m[j]; 4-bit codes are packed two to a
// byte (column j in the low nibble, column j + 8 in the high one), 8-bit codes are signed. A panel is decoded into
// a float32 scratch panel (bit-identical to the float32 weights that the `gguf` package dequantises: a product,
// then a sum, never fused) and multiplied by the same tiles as float32 weights, so the results are bit-identical
// to the float32 path's while each weight costs 0.75 (4-bit) or 1.25 (8-bit) bytes of memory traffic instead of 4.
constexpr int64_t kBlock = 32;
template <int BITS> constexpr int64_t kBlockBytes = 2 * kPanel * 4 + kBlock * kPanel * BITS / 8;

// Keeps the compiler from contracting `NoFuse(a * b) + c` into an FMA, whose single rounding would differ from the
// reference dequantisation.
inline v8 NoFuse(v8 v) {
#if defined(__AVX__)  // a 32-byte vector fits an "x" (ymm) register only with AVX
  asm("" : "+x"(v));
#else
  asm volatile("" : : "r"(&v) : "memory");
#endif
  return v;
}

// Eight codes widened to int32 (GCC scalarises __builtin_convertvector from an 8-byte vector, hence the intrinsics).
inline v8i Widen(const uint8_t* c, bool sign) {
#if defined(__AVX2__)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c));
  return (v8i)(sign ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
#else
  v8i w;
  for (int i = 0; i < 8; ++i) w[i] = sign ? int32_t(int8_t(c[i])) : int32_t(c[i]);
  return w;
#endif
}

// The 16 codes of one k of a panel, as floats: columns 0-7 in `lo`, 8-15 in `hi`.
template <int BITS> inline void Codes(const uint8_t* c, v8& lo, v8& hi);
template <> inline void Codes<4>(const uint8_t* c, v8& lo, v8& hi) {
  const v8i w = Widen(c, false);
  lo = __builtin_convertvector(w & 15, v8);
  hi = __builtin_convertvector(w >> 4, v8);
}
template <> inline void Codes<8>(const uint8_t* c, v8& lo, v8& hi) {
  lo = __builtin_convertvector(Widen(c, true), v8);
  hi = __builtin_convertvector(Widen(c + 8, true), v8);
}

template <int BITS>
void Dequant(const uint8_t* q, int64_t K, float* w) {
  for (int64_t b = 0; b < K / kBlock; ++b, q += kBlockBytes<BITS>) {
    const float* dm = reinterpret_cast<const float*>(q);
    const v8 d0 = Load(dm), d1 = Load(dm + 8), m0 = Load(dm + 16), m1 = Load(dm + 24);
    const uint8_t* c = q + 2 * kPanel * 4;
    for (int64_t k = 0; k < kBlock; ++k, c += kPanel * BITS / 8, w += kPanel) {
      v8 lo, hi;
      Codes<BITS>(c, lo, hi);
      Store(w, NoFuse(lo * d0) + m0);
      Store(w + 8, NoFuse(hi * d1) + m1);
    }
  }
}

// One row against a quantised panel, decoding in registers: the same products and sums, in the same order, as `Row`
// on the decoded panel, without writing and re-reading a scratch panel (one row has nothing to amortise it over).
template <int BITS>
void QuantRow(const float* x, const uint8_t* q, int64_t K, float* y) {
  v8 a0 = Splat(0.f), a1 = a0, b0 = a0, b1 = a0;
  constexpr int64_t kRowBytes = kPanel * BITS / 8;
  for (int64_t b = 0; b < K / kBlock; ++b, q += kBlockBytes<BITS>, x += kBlock) {
    const float* dm = reinterpret_cast<const float*>(q);
    const v8 d0 = Load(dm), d1 = Load(dm + 8), m0 = Load(dm + 16), m1 = Load(dm + 24);
    const uint8_t* c = q + 2 * kPanel * 4;
    for (int64_t k = 0; k < kBlock; k += 2, c += 2 * kRowBytes) {
      v8 lo, hi, lo2, hi2;
      Codes<BITS>(c, lo, hi);
      Codes<BITS>(c + kRowBytes, lo2, hi2);
      const v8 xa = Splat(x[k]), xb = Splat(x[k + 1]);
      a0 += xa * (NoFuse(lo * d0) + m0);
      a1 += xa * (NoFuse(hi * d1) + m1);
      b0 += xb * (NoFuse(lo2 * d0) + m0);
      b1 += xb * (NoFuse(hi2 * d1) + m1);
    }
  }
  Store(y, a0 + b0);
  Store(y + 8, a1 + b1);
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// x [M, K] against block-coded panels [N / 16, K / 32, block bytes], in either code layout.
template <int BITS, typename D>
bool QuantShapesAgree(const D& xd, const D& wd) {
  return xd.size() == 2 && wd.size() == 3 && wd[2] == kBlockBytes<BITS> && wd[1] * kBlock == xd[1];
}

template <int BITS>
ffi::Error QuantMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (!QuantShapesAgree<BITS>(xd, wd)) {
    return ffi::Error::InvalidArgument("quantised matmul wants x [M, K] and w [N / 16, K / 32, block bytes]");
  }
  const float* xp = x.typed_data();
  const uint8_t* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t M = xd[0], K = xd[1], N = wd[0] * kPanel, panel_bytes = wd[1] * kBlockBytes<BITS>;
  // Decoding costs about what reading float32 weights does, so the inline-or-parallel choice counts those bytes.
  ParallelFor(pool, wd[0], 4 * (M * K + wd[0] * K * kPanel), [=](int64_t p) {
    if (M == 1) return QuantRow<BITS>(xp, wp + p * panel_bytes, K, yp + p * kPanel);
    // Cache-line aligned like XLA's buffers: the tiles' 32-byte loads would otherwise straddle lines.
    thread_local std::unique_ptr<float, FreeDeleter> scratch;
    thread_local int64_t scratch_size = 0;
    if (scratch_size < K * kPanel) {
      scratch.reset(static_cast<float*>(std::aligned_alloc(64, K * kPanel * sizeof(float))));
      scratch_size = K * kPanel;
    }
    Dequant<BITS>(wp + p * panel_bytes, K, scratch.get());
    Panel(xp, M, K, scratch.get(), yp + p * kPanel, N);
  });
  return ffi::Error::Success();
}

// Int8 dot products (llama.cpp's way, opt-in: `native.QuantLinear(int8=True)`): each row of x is quantised to int8
// per block of 32 (x ~ dx * qx, |qx| <= 127, and the block's float sum sx), and a block's 32 products per column
// are one exact integer sum: y[j] += (d[j] * dx) * sum_k code[k][j] * qx[k] + m[j] * sx. Against decoding every
// weight to float32 (QuantRow), a block costs ~5x fewer instructions, so batch-1 decoding is bound by memory again,
// and larger M runs 1.4-2x the float32 FMA rate; the price is x's rounding to 8 bits (~0.4% per element), so the results
// are close to, not bit-identical with, the float32 path's.
// A block's codes are [8 k-quads][16 columns][4 k] (8-bit, signed), or, 4-bit, [8 k-quads][8 columns][4 k] bytes
// with column c in the low nibble and c + 8 in the high one: a 32-byte load is 8 columns x 4 consecutive k, the
// shape of _mm256_maddubs_epi16 against 4 broadcast bytes of qx.
#if defined(__AVX2__)
constexpr bool kInt8Dot = true;

// One row of x -> int8 codes q [K], scales dx and float sums sx [K / 32].
inline void QuantizeRow(const float* x, int64_t K, int8_t* q, float* dx, float* sx) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t b = 0; b < K / kBlock; ++b, x += kBlock, q += kBlock) {
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      sum = _mm256_add_ps(sum, v[i]);
    }
    alignas(32) float a[8], s[8];
    _mm256_store_ps(a, amax);
    _mm256_store_ps(s, sum);
    float m = 0.f, t = 0.f;
    for (int i = 0; i < 8; ++i) { m = std::max(m, a[i]); t += s[i]; }
    dx[b] = m / 127.f;
    sx[b] = t;
    const __m256 inv = _mm256_set1_ps(m > 0.f ? 127.f / m : 0.f);
    __m256i n[4];
    for (int i = 0; i < 4; ++i) {
      const __m256 scaled = _mm256_mul_ps(v[i], inv);
      n[i] = _mm256_cvtps_epi32(_mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    // packs interleave the 128-bit lanes; the permute puts the 32 codes back in order.
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
}

struct QuantizedX {
  const int8_t* q;
  const float *dx, *sx;
  int64_t K;
};

// MR rows of quantised x times one int8-dot panel.
template <int BITS, int MR>
void DotTile(const QuantizedX& x, int64_t row, const uint8_t* w, float* y, int64_t ldy) {
  const int64_t KB = x.K / kBlock;
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
  v8 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = Splat(0.f);
  for (int64_t b = 0; b < KB; ++b, w += kBlockBytes<BITS>) {
    const uint8_t* c = w + 2 * kPanel * 4;
    __m256i s[MR][2];
    if constexpr (BITS == 4) {
      // 16-bit sums are exact here: 8 k-quads of two products of a code (0..15) and a qx (|qx| <= 127) stay under
      // 8 * 2 * 15 * 127 = 30480.
      __m256i h[MR][2];
      for (int r = 0; r < MR; ++r) h[r][0] = h[r][1] = _mm256_setzero_si256();
      // Unrolled whole, GCC computes all 64 products first and spills them to the stack before summing.
#pragma GCC unroll 2
      for (int kq = 0; kq < 8; ++kq) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * kq));
        const __m256i lo = _mm256_and_si256(packed, low4), hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
        for (int r = 0; r < MR; ++r) {
          int32_t quad;
          std::memcpy(&quad, x.q + (row + r) * x.K + b * kBlock + 4 * kq, 4);
          const __m256i xq = _mm256_set1_epi32(quad);
          h[r][0] = _mm256_add_epi16(h[r][0], _mm256_maddubs_epi16(lo, xq));
          h[r][1] = _mm256_add_epi16(h[r][1], _mm256_maddubs_epi16(hi, xq));
        }
      }
      for (int r = 0; r < MR; ++r) {
        s[r][0] = _mm256_madd_epi16(h[r][0], ones);
        s[r][1] = _mm256_madd_epi16(h[r][1], ones);
      }
    } else {
      // maddubs wants unsigned x signed bytes: |code| times qx carrying the code's sign (|pair| <= 2 * 128 * 127).
      for (int r = 0; r < MR; ++r) s[r][0] = s[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 2
      for (int kq = 0; kq < 8; ++kq) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 64 * kq));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 64 * kq + 32));
        const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
        for (int r = 0; r < MR; ++r) {
          int32_t quad;
          std::memcpy(&quad, x.q + (row + r) * x.K + b * kBlock + 4 * kq, 4);
          const __m256i xq = _mm256_set1_epi32(quad);
          const __m256i p0 = _mm256_maddubs_epi16(a0, _mm256_sign_epi8(xq, w0));
          const __m256i p1 = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(xq, w1));
          s[r][0] = _mm256_add_epi32(s[r][0], _mm256_madd_epi16(p0, ones));
          s[r][1] = _mm256_add_epi32(s[r][1], _mm256_madd_epi16(p1, ones));
        }
      }
    }
    const float* dm = reinterpret_cast<const float*>(w);
    const v8 d0 = Load(dm), d1 = Load(dm + 8), m0 = Load(dm + 16), m1 = Load(dm + 24);
    for (int r = 0; r < MR; ++r) {
      const v8 dx = Splat(x.dx[(row + r) * KB + b]), sx = Splat(x.sx[(row + r) * KB + b]);
      acc[r][0] += (d0 * dx) * __builtin_convertvector((v8i)s[r][0], v8) + m0 * sx;
      acc[r][1] += (d1 * dx) * __builtin_convertvector((v8i)s[r][1], v8) + m1 * sx;
    }
  }
  for (int r = 0; r < MR; ++r) { Store(y + r * ldy, acc[r][0]); Store(y + r * ldy + 8, acc[r][1]); }
}

template <int BITS>
void DotPanel(const QuantizedX& x, int64_t M, const uint8_t* w, float* y, int64_t N) {
  int64_t m = 0;
  for (; M - m >= 3; m += 3) DotTile<BITS, 3>(x, m, w, y + m * N, N);
  switch (M - m) {
    case 2: DotTile<BITS, 2>(x, m, w, y + m * N, N); break;
    case 1: DotTile<BITS, 1>(x, m, w, y + m * N, N); break;
  }
}

template <int BITS>
ffi::Error DotMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (!QuantShapesAgree<BITS>(xd, wd)) {
    return ffi::Error::InvalidArgument("int8-dot matmul wants x [M, K] and w [N / 16, K / 32, block bytes]");
  }
  const int64_t M = xd[0], K = xd[1], KB = wd[1], N = wd[0] * kPanel, panel_bytes = KB * kBlockBytes<BITS>;
  const float* xp = x.typed_data();
  std::unique_ptr<int8_t[]> q(new int8_t[M * K]);
  std::unique_ptr<float[]> scales(new float[2 * M * KB]);
  for (int64_t r = 0; r < M; ++r) QuantizeRow(xp + r * K, K, q.get() + r * K, scales.get() + r * KB,
                                               scales.get() + (M + r) * KB);
  const QuantizedX qx{q.get(), scales.get(), scales.get() + M * KB, K};
  const uint8_t* wp = w.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, wd[0], M * K + wd[0] * panel_bytes,
              [=](int64_t p) { DotPanel<BITS>(qx, M, wp + p * panel_bytes, yp + p * kPanel, N); });
  return ffi::Error::Success();
}
#else
constexpr bool kInt8Dot = false;

template <int BITS>
ffi::Error DotMatmul(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::U8>, ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "int8-dot matmul needs AVX2");
}
#endif

// exp of 8 floats (Cephes' expf polynomial, ~1 ulp): the scalar std::exp per score was most of the attention time.
inline v8 Exp(v8 x) {
  x = x < Splat(-87.3f) ? Splat(-87.3f) : x;
  x = x > Splat(88.3f) ? Splat(88.3f) : x;
  const v8 fx = x * Splat(1.44269504088896341f) + Splat(0.5f);
  v8i n = __builtin_convertvector(fx, v8i);  // truncates toward zero,
  n += __builtin_convertvector(n, v8) > fx;  // a true compare is -1: floor
  const v8 t = __builtin_convertvector(n, v8);
  const v8 r = x - t * Splat(0.693359375f) + t * Splat(2.12194440e-4f);
  v8 y = Splat(1.9875691500e-4f);
  y = y * r + Splat(1.3981999507e-3f);
  y = y * r + Splat(8.3334519073e-3f);
  y = y * r + Splat(4.1665795894e-2f);
  y = y * r + Splat(1.6666665459e-1f);
  y = y * r + Splat(5.0000001201e-1f);
  y = y * r * r + r + Splat(1.f);
  const v8i bits = (n + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// The 8 dot products of q [hd] with keys k[0..7] [hd]: eight independent accumulators, then one horizontal
// reduction for all eight (a per-key reduction cost more than the products).
inline v8 Dot8(const float* q, const float* const* k, int64_t hd) {
  v8 a[8];
  for (int j = 0; j < 8; ++j) a[j] = Splat(0.f);
  for (int64_t i = 0; i < hd; i += 8) {
    const v8 qv = Load(q + i);
    for (int j = 0; j < 8; ++j) a[j] += qv * Load(k[j] + i);
  }
#if defined(__AVX__)
  const __m256 t0 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]), t1 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
  const __m256 t2 = _mm256_hadd_ps((__m256)a[4], (__m256)a[5]), t3 = _mm256_hadd_ps((__m256)a[6], (__m256)a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return (v8)_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#else
  v8 out;
  for (int j = 0; j < 8; ++j) {
    float s = 0.f;
    for (int i = 0; i < 8; ++i) s += a[j][i];
    out[j] = s;
  }
  return out;
#endif
}

// One query row (b, t) against its keys, for kv heads [h0, h1): the key blocks are the outer loop, so the heads of
// one page slot, which lie side by side, are read together.
struct Attention {
  const float *q, *k, *v;
  const int32_t *page_table, *pos;
  float* out;
  int64_t T, KV, G, hd, ps, W, P, window;
  float scale;

  void Row(int64_t bt, int64_t h0, int64_t h1) const {
    const int64_t b = bt / T, heads = (h1 - h0) * G;
    const float* qs = q + (bt * KV + h0) * G * hd;  // q and out are [B, T, KV, G, hd]
    float* o = out + (bt * KV + h0) * G * hd;
    std::fill(o, o + heads * hd, 0.f);
    const int64_t p = std::min<int64_t>(pos[bt], W * ps - 1);
    if (p < 0) return;
    const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    // Keys go in blocks: one max and one rescale of the accumulators per block and query head, not per key.
    constexpr int64_t kBlock = 32;
    float m[kMaxHeads], l[kMaxHeads];
    int64_t slots[kBlock];
    const float* keys[kBlock];
    const float* vals[kBlock];
    for (int64_t i = 0; i < heads; ++i) { m[i] = -INFINITY; l[i] = 0.f; }
    for (int64_t j0 = lo; j0 <= p; j0 += kBlock) {
      const int64_t n = std::min(kBlock, p - j0 + 1), n8 = (n + 7) / 8 * 8;
      for (int64_t jj = 0; jj < n8; ++jj) {
        const int64_t j = j0 + std::min(jj, n - 1);  // past n: a repeat of the last key, its score masked below
        int32_t page = page_table[b * W + j / ps];
        if (page < 0 || page >= P) page = 0;  // the null page; never read for a valid table
        slots[jj] = (page * ps + j % ps) * KV;  // pages are [P, ps, KV, hd]
      }
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t jj = 0; jj < n8; ++jj) {
          keys[jj] = k + (slots[jj] + h) * hd;
          vals[jj] = v + (slots[jj] + h) * hd;
        }
        for (int64_t gi = (h - h0) * G; gi < (h - h0 + 1) * G; ++gi) Head(qs + gi * hd, keys, vals, n, n8,
                                                                          m[gi], l[gi], o + gi * hd);
      }
    }
    for (int64_t i = 0; i < heads; ++i) {
      const v8 inv = Splat(1.f / l[i]);
      for (int64_t d = 0; d < hd; d += 8) Store(o + i * hd + d, Load(o + i * hd + d) * inv);
    }
  }

  // One query head over one block of n keys: scores, the online-softmax update, and the weighted values.
  void Head(const float* qg, const float* const* keys, const float* const* vals, int64_t n, int64_t n8, float& m,
            float& l, float* og) const {
    alignas(32) float s[32];
    for (int64_t jj = 0; jj < n8; jj += 8) Store(s + jj, Dot8(qg, keys + jj, hd) * Splat(scale));
    float block_max = -INFINITY;
    for (int64_t jj = 0; jj < n; ++jj) block_max = std::max(block_max, s[jj]);
    const float m_new = std::max(m, block_max), correction = std::exp(m - m_new);
    m = m_new;
    for (int64_t jj = 0; jj < n8; jj += 8) Store(s + jj, Exp(Load(s + jj) - Splat(m_new)));
    float sum = 0.f;
    for (int64_t jj = 0; jj < n; ++jj) sum += s[jj];
    l = l * correction + sum;
    // The output row stays in registers, 64 floats at a time, while the block's values stream past.
    int64_t i0 = 0;
    for (; i0 + 64 <= hd; i0 += 64) Accumulate<8>(s, vals, n, i0, correction, og);
    switch ((hd - i0) / 8) {
      case 7: Accumulate<7>(s, vals, n, i0, correction, og); break;
      case 6: Accumulate<6>(s, vals, n, i0, correction, og); break;
      case 5: Accumulate<5>(s, vals, n, i0, correction, og); break;
      case 4: Accumulate<4>(s, vals, n, i0, correction, og); break;
      case 3: Accumulate<3>(s, vals, n, i0, correction, og); break;
      case 2: Accumulate<2>(s, vals, n, i0, correction, og); break;
      case 1: Accumulate<1>(s, vals, n, i0, correction, og); break;
    }
  }

  // og[i0 : i0 + 8C] = og * correction + sum_j p[j] * vals[j][i0 : i0 + 8C]; C is fixed so acc stays in registers.
  template <int C>
  static void Accumulate(const float* p, const float* const* vals, int64_t n, int64_t i0, float correction,
                         float* og) {
    v8 acc[C];
    for (int k = 0; k < C; ++k) acc[k] = Load(og + i0 + 8 * k) * Splat(correction);
    for (int64_t jj = 0; jj < n; ++jj) {
      const v8 pj = Splat(p[jj]);
      const float* vr = vals[jj] + i0;
      for (int k = 0; k < C; ++k) acc[k] += pj * Load(vr + 8 * k);
    }
    for (int k = 0; k < C; ++k) Store(og + i0 + 8 * k, acc[k]);
  }
};

// q [B, T, KV, G, hd]; pages [P, ps, KV, hd]; page_table [B, W]; positions [B, T] (< 0: padding, output 0).
ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pages,
                          ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> page_table,
                          ffi::Buffer<ffi::S32> positions, int64_t window, float scale,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k_pages.dimensions(), td = page_table.dimensions();
  if (qd.size() != 5 || kd.size() != 4 || td.size() != 2 || kd[2] != qd[2] || kd[3] != qd[4] || qd[4] % 8 ||
      td[0] != qd[0]) {
    return ffi::Error::InvalidArgument("paged_attention: shapes disagree (head_dim must be a multiple of 8)");
  }
  const int64_t B = qd[0], T = qd[1], KV = qd[2], G = qd[3], hd = qd[4];
  if (KV * G > kMaxHeads) return ffi::Error::InvalidArgument("paged_attention: at most 256 query heads");
  const Attention a{q.typed_data(), k_pages.typed_data(), v_pages.typed_data(), page_table.typed_data(),
                    positions.typed_data(), out->typed_data(), T, KV, G, hd, kd[1], td[1], kd[0], window, scale};
  int64_t keys = 0;  // keys read over all queries, for the inline-or-parallel choice
  for (int64_t i = 0; i < B * T; ++i) {
    if (a.pos[i] >= 0) keys += window > 0 ? std::min<int64_t>(a.pos[i] + 1, window) : a.pos[i] + 1;
  }
  // Rows are the work items when there are enough of them for the threads; fewer rows split by kv head.
  const int64_t split = B * T >= 4 ? 1 : KV, per = KV / split;
  ParallelFor(pool, B * T * split, keys * KV * hd * 8, [a, split, per](int64_t item) {
    const int64_t h0 = item % split * per;
    a.Row(item / split, h0, h0 + per);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NovallmPackedMatmulF32, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(NovallmPagedAttentionF32, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

#define NOVALLM_QUANT_MATMUL(name, fn, bits)                                                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, fn<bits>, ffi::Ffi::Bind()                        \
                                                             .Ctx<ffi::ThreadPool>()             \
                                                             .Arg<ffi::Buffer<ffi::F32>>()       \
                                                             .Arg<ffi::Buffer<ffi::U8>>()        \
                                                             .Ret<ffi::Buffer<ffi::F32>>());
NOVALLM_QUANT_MATMUL(NovallmQ4MatmulF32, QuantMatmul, 4)
NOVALLM_QUANT_MATMUL(NovallmQ8MatmulF32, QuantMatmul, 8)
NOVALLM_QUANT_MATMUL(NovallmQ4DotMatmulF32, DotMatmul, 4)
NOVALLM_QUANT_MATMUL(NovallmQ8DotMatmulF32, DotMatmul, 8)

extern "C" int NovallmHasInt8Dot() { return kInt8Dot; }
