// Native float32 CPU kernels called through XLA's FFI (see native.py):
// - PackedMatmul: y[M, N] = x[M, K] @ W, W packed as panels [N / 16, K, 16];
// - QuantMatmul: the same with W in GGUF block codes (4- or 8-bit codes and per-block scales, see below);
// - DotMatmul: the same codes against x rounded to int8 per block of 32 (per 256 for Q6_K's), with integer dot
//   products (opt-in);
// - HalfMatmul: the same with W as float16 / bfloat16 panels, widened exactly to float32;
// - HeadArgmax: the argmax of x @ W for greedy rows, from approximate logits with error bounds (an int8 copy of W,
//   or W's int8-dot layout against x rounded to int8) and the few exact panels they leave;
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
#include <type_traits>
#include <thread>
#include <vector>

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
// Weights that a call reads once (decode steps' few rows) are touched with a non-temporal prefetch a line ahead of
// their loads: the hint, not the distance, is what counts (offsets 0-256 bytes measured alike; further ahead the
// lines were dropped before use). Streamed lines then skip the L2 and L3 fills that a cache-friendly load makes
// for data never read again. Batch-1 decode on 2 Zen 4 cores, interleaved with it off: F16 +17%, F32 +11%, Q8_0
// +4-8%, Q4_1 +6%, int8 rows +4%. Building with -DNOVALLM_NO_STREAM_HINTS (NOVALLM_KERNEL_FLAGS) turns it off.
inline void Stream(const void* p, int64_t bytes = 64) {
#if !defined(NOVALLM_NO_STREAM_HINTS)
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(p) + 64 + o, 0, 0);
#endif
}

// A panel's elements: float32, or float16 / bfloat16 bits (`Half`), widened exactly to float32 as they are loaded.
template <bool BF16>
struct Half {
  uint16_t bits;
};
template <bool BF16>
inline v8 LoadHalf(const uint16_t* p);  // with the 16-bit panels below
inline v8 Widen8(const float* p) { return Load(p); }
template <bool BF16>
inline v8 Widen8(const Half<BF16>* p) { return LoadHalf<BF16>(reinterpret_cast<const uint16_t*>(p)); }

// MR rows of x times one panel: 2*MR accumulators, which hide the FMA latency for MR >= 5. `stream`: the panel is
// read once (`Stream` its lines).
template <int MR, typename E = float>
inline void Tile(const float* x, int64_t K, const E* w, float* y, int64_t ldy, bool stream = false) {
  v8 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = Splat(0.f);
  for (int64_t k = 0; k < K; ++k) {
    if (stream && k * kPanel * sizeof(E) % 64 == 0) Stream(w + k * kPanel);
    const v8 w0 = Widen8(w + k * kPanel), w1 = Widen8(w + k * kPanel + 8);
    for (int r = 0; r < MR; ++r) {
      const v8 a = Splat(x[r * K + k]);
      acc[r][0] += a * w0;
      acc[r][1] += a * w1;
    }
  }
  for (int r = 0; r < MR; ++r) { Store(y + r * ldy, acc[r][0]); Store(y + r * ldy + 8, acc[r][1]); }
}

// One row: two interleaved k-streams give four independent accumulators. Float32 or 16-bit elements, widened as
// loaded: the same products and sums in the same order.
template <typename E = float>
inline void Row(const float* x, int64_t K, const E* w, float* y) {
  v8 a0 = Splat(0.f), a1 = a0, b0 = a0, b1 = a0;
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    Stream(w + k * kPanel, 2 * kPanel * sizeof(E));
    const v8 xa = Splat(x[k]), xb = Splat(x[k + 1]);
    a0 += xa * Widen8(w + k * kPanel);
    a1 += xa * Widen8(w + k * kPanel + 8);
    b0 += xb * Widen8(w + (k + 1) * kPanel);
    b1 += xb * Widen8(w + (k + 1) * kPanel + 8);
  }
  for (; k < K; ++k) {
    const v8 xa = Splat(x[k]);
    a0 += xa * Widen8(w + k * kPanel);
    a1 += xa * Widen8(w + k * kPanel + 8);
  }
  Store(y, a0 + b0);
  Store(y + 8, a1 + b1);
}

#if defined(__AVX512F__)
typedef float v16 __attribute__((vector_size(64)));

// MR rows of x times one panel with AVX-512: a 16-float accumulator per row, each weight row one load. Per output
// element these are Tile's products and sums in Tile's order (the same bits); with 32 registers and half the
// instructions, 4-8 rows run ~1.35x Tile's rate on Zen 4 (its 512-bit FMAs need only 4 accumulators in flight).
inline v16 Widen16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <bool BF16>
inline v16 Widen16(const Half<BF16>* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (BF16) {
    return (v16)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return (v16)_mm512_cvtph_ps(h);
  }
}

template <int MR, typename E = float>
inline void Tile16(const float* x, int64_t K, const E* w, float* y, int64_t ldy, bool stream = false) {
  v16 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    if (stream && k * kPanel * sizeof(E) % 64 == 0) Stream(w + k * kPanel);
    const v16 wk = Widen16(w + k * kPanel);
    for (int r = 0; r < MR; ++r) acc[r] += x[r * K + k] * wk;
  }
  for (int r = 0; r < MR; ++r) std::memcpy(y + r * ldy, &acc[r], sizeof acc[r]);
}
#endif

void Panel(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N) {
  if (M == 1) return Row(x, K, w, y);
#if defined(__AVX512F__)
  if (M >= 4) {
    // As few tiles as rows of 8 allow, of near-equal sizes: each has 4-8 rows.
    const int64_t tiles = (M + 7) / 8;
    const bool once = tiles == 1;  // one tile reads the panel: `Stream` its lines
    for (int64_t t = 0, m = 0; t < tiles; ++t) {
      const int64_t rows = M / tiles + (t < M % tiles);
      const float* xt = x + m * K;
      float* yt = y + m * N;
      switch (rows) {
        case 8: Tile16<8>(xt, K, w, yt, N, once); break;
        case 7: Tile16<7>(xt, K, w, yt, N, once); break;
        case 6: Tile16<6>(xt, K, w, yt, N, once); break;
        case 5: Tile16<5>(xt, K, w, yt, N, once); break;
        default: Tile16<4>(xt, K, w, yt, N, once); break;
      }
      m += rows;
    }
    return;
  }
#endif
  int64_t m = 0;
  const bool once = M <= 6;  // one tile reads the panel: `Stream` its lines
  if (M < 30 && M % 6 != 0) {
    // Few rows: tiles of 5 (10 accumulators still hide the FMA latency), where tiles of 6 would leave a tile of 2-4
    // rows (50-65% of the FMA peak) for a large share of the rows. A leftover row joins a 5 to make a 6. With more
    // rows, 6s measured faster in model steps (a 512-token step was ~5% slower in tiles of 5).
    if (M % 5 == 1 && M > 5) { Tile<6>(x, K, w, y, N); m = 6; }
    for (; M - m >= 5; m += 5) Tile<5>(x + m * K, K, w, y + m * N, N, once);
  }
  // Tiles of 6 rows (12 accumulators + 2 weight vectors + 1 broadcast = 15 of 16 AVX2 registers); 8 = 4 + 4.
  while (M - m >= 6 && M - m != 8) { Tile<6>(x + m * K, K, w, y + m * N, N, once); m += 6; }
  while (M - m >= 4) { Tile<4>(x + m * K, K, w, y + m * N, N, once); m += 4; }
  switch (M - m) {
    case 3: Tile<3>(x + m * K, K, w, y + m * N, N, once); break;
    case 2: Tile<2>(x + m * K, K, w, y + m * N, N, once); break;
    case 1: Tile<1>(x + m * K, K, w, y + m * N, N); break;
  }
}

// The calling thread and up to `threads - 1` pool tasks running phases of parallel items. The caller claims chunks
// of items from the front of a phase and the helpers from its back, so that each member streams one contiguous run
// of weight panels: chunks claimed in turn from one end made every chunk a new stream for the hardware prefetcher
// (batch-1 decode, interleaved: Q4_1 and Q4_K_M +4% with two ends, F16 level). A helper that starts late (or never)
// only takes fewer items: no phase waits for a helper that has not claimed one. The state is shared-owned because a
// helper may start after the call has returned (it then finds the team ended and exits).
class Team {
 public:
  Team(ffi::ThreadPool& pool, int64_t threads)
      : threads_(std::max<int64_t>(1, threads)), s_(std::make_shared<State>()) {
    for (int64_t t = 1; t < threads; ++t) pool.Schedule([s = s_] { s->Help(); });
  }
  ~Team() { s_->word.store(kEnd, std::memory_order_release); }

  // Runs body(i) for i in [0, n) on the team; returns when every item is done.
  template <typename F>
  void Run(int64_t n, F& body) {
    for (int64_t first = 0; first < n; first += kMaxItems) {  // phases of at most kMaxItems items
      const int64_t m = std::min(n - first, kMaxItems);
      auto part = [&body, first](int64_t i) { body(first + i); };
      RunPhase(m, part);
    }
  }

 private:
  // word = end flag | phase (15 bits) | front (24 bits) | back (24 bits): the items [front, back) are unclaimed.
  // A claim is a compare-and-swap of the whole word, so it succeeds only on the phase it read: its items are that
  // phase's, the phase is not done before they are, and fn and ctx (written before the phase's word) are still its.
  static constexpr uint64_t kEnd = uint64_t{1} << 63;
  static constexpr int kFrontShift = 24, kPhaseShift = 48;
  static constexpr int64_t kMaxItems = (int64_t{1} << kFrontShift) - 1;
  static constexpr uint64_t kField = (uint64_t{1} << kFrontShift) - 1;

  template <typename F>
  void RunPhase(int64_t n, F& body) {
    s_->done.store(0, std::memory_order_relaxed);
    s_->fn = [](void* ctx, int64_t i) { (*static_cast<F*>(ctx))(i); };
    s_->ctx = &body;
    // A few chunks per member: each claim moves the word's cache line between cores.
    s_->chunk.store(std::max<int64_t>(1, n / (4 * threads_)), std::memory_order_relaxed);
    phase_ = (phase_ + 1) & 0x7FFF;
    s_->word.store((phase_ << kPhaseShift) | static_cast<uint64_t>(n), std::memory_order_release);
    s_->Work(true);
    for (int spins = 0; s_->done.load(std::memory_order_acquire) < n; ++spins) Pause(spins);
  }

  static void Pause(int spins) {
#if defined(__AVX__)  // immintrin.h is included only then
    if (spins < 4096) return _mm_pause();
#endif
    std::this_thread::yield();  // long waits yield: on a busy machine the other member may need this core
  }

  struct State {
    alignas(64) std::atomic<uint64_t> word{0};
    alignas(64) std::atomic<int64_t> done{0};
    alignas(64) std::atomic<int64_t> chunk{1};
    void (*fn)(void*, int64_t) = nullptr;
    void* ctx = nullptr;

    // Claims and runs chunks of items, from the phase's front or back, until it has none left.
    void Work(bool front) {
      uint64_t w = word.load(std::memory_order_acquire);
      for (;;) {
        if (w & kEnd) return;
        const int64_t f = static_cast<int64_t>((w >> kFrontShift) & kField), b = static_cast<int64_t>(w & kField);
        if (f >= b) return;
        const int64_t c = std::min(chunk.load(std::memory_order_relaxed), b - f);
        const uint64_t claimed = front ? w + (static_cast<uint64_t>(c) << kFrontShift) : w - static_cast<uint64_t>(c);
        if (!word.compare_exchange_weak(w, claimed, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
        const int64_t start = front ? f : b - c;
        for (int64_t i = start; i < start + c; ++i) fn(ctx, i);
        done.fetch_add(c, std::memory_order_release);
        w = word.load(std::memory_order_acquire);
      }
    }
    void Help() {
      for (int spins = 0;;) {
        const uint64_t w = word.load(std::memory_order_acquire);
        if (w & kEnd) return;
        if (((w >> kFrontShift) & kField) < (w & kField)) {
          Work(false);
          spins = 0;
        } else {
          Pause(spins++);
        }
      }
    }
  };
  int64_t threads_;
  uint64_t phase_ = 0;
  std::shared_ptr<State> s_;
};

// Items [0, n) on the calling thread and pool tasks, as one phase of a `Team`. Below ~256 KB of memory traffic
// (`bytes`) the call runs inline: waking a worker costs more than it saves, and on a busy machine the caller can end
// up waiting for a descheduled worker's chunk.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t bytes, F body) {
  if (bytes < (256 << 10)) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  Team team(pool, std::min<int64_t>(pool.num_threads(), n));
  team.Run(n, body);
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

// An IEEE half's bits -> the float it holds (exact; the portable path where F16C is missing).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FFu;
  if (exp == 0) return (sign ? -1.f : 1.f) * std::ldexp(float(man), -24);  // zero and subnormals
  const uint32_t bits = sign | (exp == 31 ? 0x7F800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Eight IEEE halves -> floats (exact).
inline v8 LoadF16(const uint16_t* p) {
#if defined(__F16C__)
  return (v8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  v8 out;
  for (int i = 0; i < 8; ++i) out[i] = HalfToFloat(p[i]);
  return out;
#endif
}

// Block-quantised panels (GGUF Q4_0/1/K, Q5_0/1/K and Q8_0 weights in their own codes): per panel, K / 32 blocks
// of {float d[16], float m[16], codes[32][16]} for w[k][j] = d[j] * code[k][j] + m[j]; 4-bit codes are packed two to
// a byte (column j in the low nibble, column j + 8 in the high one), 8-bit codes are signed (Q5 codes are read from
// 8 bits here: decoding to float32 is the bound at batch 1, and 5 bits cost more of it than they save in bytes; the
// int8-dot layout below holds 5 bits). BITS = 6 (Q6_K, whose scales cover 16 weights): 8-bit codes and a third
// scale row, {d[16], m[16], d2[16], codes[32][16]}, with d2 in place of d for k = 16..31. Each weight decodes to the
// float32 value that the `gguf` package dequantises (`Dequantised`) and meets x in the float32 tiles' order: in
// registers for up to 8 rows (`QuantRow`, `QuantTile`, `QuantTile16`), through a float32 scratch panel for more
// (`Dequant`, then `Panel`). So the results are bit-identical to the float32 path's while each weight costs its
// code and a share of its block's scales (below) in memory traffic instead of 4 bytes.
constexpr int64_t kBlock = 32;
// A kind (the `BITS` of the templates below) is the codes' width, plus kHalf where the block's scales are float16:
// a Q4_0/1, Q5_0/1 or Q8_0 file's d and m are, so they are stored as such (the same values, widened exactly as they
// are read): 64 bytes a block fewer, 0.625 bytes a 4-bit weight instead of 0.75, 1.125 an 8-bit one instead of
// 1.25. K-quants' d and m are products of two scales and stay float32.
constexpr int kHalf = 64;
// + kSym: symmetric codes, w = d * code, whose header holds no m (signed 8-bit codes: Q8_0, Q6_K, and Q4_0's and
// Q5_0's q - 8 and q - 16, see `BlockQuant.centred`): 1.0625 bytes an 8-bit weight with float16 d instead of 1.125,
// and a batch-1 step of such weights is bound by the bus.
constexpr int kSym = 128;
template <int BITS> constexpr int kBits = BITS & 15;
template <int BITS> constexpr bool kOffsets = !(BITS & kSym);
template <int BITS> constexpr bool kNibbles = kBits<BITS> == 4 || kBits<BITS> == 5;  // two codes a byte (5: a plane)
template <int BITS> constexpr int64_t kCodeBits = kNibbles<BITS> ? 4 : 8;
template <int BITS> constexpr int kScaleRows = 1 + kOffsets<BITS> + (kBits<BITS> == 6);  // d, m, d2
template <int BITS> constexpr int64_t kHeaderBytes = kScaleRows<BITS> * kPanel * (BITS & kHalf ? 2 : 4);
template <int BITS> constexpr int64_t kCodeBytes = kBlock * kPanel * kCodeBits<BITS> / 8;
template <int BITS>
constexpr int64_t kBlockBytes = kHeaderBytes<BITS> + kCodeBytes<BITS> + (kBits<BITS> == 5) * kBlock * 2;

// A block header's rows: d[16], m[16] (none for kSym kinds) and, for bits 6, d2[16].
enum ScaleRow { kD, kM, kD2 };
template <int BITS> constexpr int kRowAt(ScaleRow row) { return row == kD2 ? kScaleRows<BITS> - 1 : int(row); }

// Scales 8h..8h+7 of a block's header row (m of a symmetric kind: zeros).
template <int BITS>
inline v8 Scales(const uint8_t* block, ScaleRow row, int h) {
  if (!kOffsets<BITS> && row == kM) return Splat(0.f);
  const int i = 2 * kRowAt<BITS>(row) + h;
  if constexpr (BITS & kHalf) {
    return LoadF16(reinterpret_cast<const uint16_t*>(block) + 8 * i);
  } else {
    return Load(reinterpret_cast<const float*>(block) + 8 * i);
  }
}

// d * code + m as the reference dequantisation computes it: a product, then a sum. The product is exact in float32
// for every kind (d has at most 18 significant bits, a float16 times Q6_K's 8-bit or a K-quant's 6-bit scale, and a
// code at most 5 more), so one fused multiply-add, which the compiler may use here, rounds the same: one instruction
// less per 8 weights than keeping them apart.
template <int BITS, class V>
inline V Dequantised(V code, V d, V m) {
  if constexpr (kOffsets<BITS>) {
    return code * d + m;
  } else {
    return code * d;
  }
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
template <> inline void Codes<6>(const uint8_t* c, v8& lo, v8& hi) { Codes<8>(c, lo, hi); }

template <int BITS>
void Dequant(const uint8_t* q, int64_t K, float* w) {
  for (int64_t b = 0; b < K / kBlock; ++b, q += kBlockBytes<BITS>) {
    v8 d0 = Scales<BITS>(q, kD, 0), d1 = Scales<BITS>(q, kD, 1);
    const v8 m0 = Scales<BITS>(q, kM, 0), m1 = Scales<BITS>(q, kM, 1);
    const uint8_t* c = q + kHeaderBytes<BITS>;
    for (int64_t k = 0; k < kBlock; ++k, c += kPanel * kCodeBits<BITS> / 8, w += kPanel) {
      if (kBits<BITS> == 6 && k == kBlock / 2) { d0 = Scales<BITS>(q, kD2, 0); d1 = Scales<BITS>(q, kD2, 1); }
      v8 lo, hi;
      Codes<kBits<BITS>>(c, lo, hi);
      Store(w, Dequantised<BITS>(lo, d0, m0));
      Store(w + 8, Dequantised<BITS>(hi, d1, m1));
    }
  }
}

// One row against a quantised panel, decoding in registers: the same products and sums, in the same order, as `Row`
// on the decoded panel, without writing and re-reading a scratch panel (one row has nothing to amortise it over).
template <int BITS>
void QuantRow(const float* x, const uint8_t* q, int64_t K, float* y) {
  v8 a0 = Splat(0.f), a1 = a0, b0 = a0, b1 = a0;
  constexpr int64_t kRowBytes = kPanel * kCodeBits<BITS> / 8;
  for (int64_t b = 0; b < K / kBlock; ++b, q += kBlockBytes<BITS>, x += kBlock) {
    Stream(q, kBlockBytes<BITS>);
    v8 d0 = Scales<BITS>(q, kD, 0), d1 = Scales<BITS>(q, kD, 1);
    const v8 m0 = Scales<BITS>(q, kM, 0), m1 = Scales<BITS>(q, kM, 1);
    const uint8_t* c = q + kHeaderBytes<BITS>;
    for (int64_t k = 0; k < kBlock; k += 2, c += 2 * kRowBytes) {
      if (kBits<BITS> == 6 && k == kBlock / 2) { d0 = Scales<BITS>(q, kD2, 0); d1 = Scales<BITS>(q, kD2, 1); }
      v8 lo, hi, lo2, hi2;
      Codes<kBits<BITS>>(c, lo, hi);
      Codes<kBits<BITS>>(c + kRowBytes, lo2, hi2);
      const v8 xa = Splat(x[k]), xb = Splat(x[k + 1]);
      a0 += xa * Dequantised<BITS>(lo, d0, m0);
      a1 += xa * Dequantised<BITS>(hi, d1, m1);
      b0 += xb * Dequantised<BITS>(lo2, d0, m0);
      b1 += xb * Dequantised<BITS>(hi2, d1, m1);
    }
  }
  Store(y, a0 + b0);
  Store(y + 8, a1 + b1);
}

// MR (2-4) rows against a quantised panel, decoding in registers once for them all: `Tile<MR>`'s products and sums
// in its order on the decoded panel (the same bits as Panel on the float32 weights, whose AVX-512 `Tile16` keeps that
// order too). Where a decode step verifies a few drafted tokens, this spares writing and re-reading a scratch panel:
// 2 rows cost ~1.3x one instead of ~2.8x.
template <int BITS, int MR>
void QuantTile(const float* x, int64_t K, const uint8_t* q, float* y, int64_t ldy) {
  v8 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = Splat(0.f);
  constexpr int64_t kRowBytes = kPanel * kCodeBits<BITS> / 8;
  for (int64_t b = 0; b < K / kBlock; ++b, q += kBlockBytes<BITS>) {
    Stream(q, kBlockBytes<BITS>);
    v8 d0 = Scales<BITS>(q, kD, 0), d1 = Scales<BITS>(q, kD, 1);
    const v8 m0 = Scales<BITS>(q, kM, 0), m1 = Scales<BITS>(q, kM, 1);
    const uint8_t* c = q + kHeaderBytes<BITS>;
    for (int64_t k = 0; k < kBlock; ++k, c += kRowBytes) {
      if (kBits<BITS> == 6 && k == kBlock / 2) { d0 = Scales<BITS>(q, kD2, 0); d1 = Scales<BITS>(q, kD2, 1); }
      v8 lo, hi;
      Codes<kBits<BITS>>(c, lo, hi);
      const v8 w0 = Dequantised<BITS>(lo, d0, m0), w1 = Dequantised<BITS>(hi, d1, m1);
      for (int r = 0; r < MR; ++r) {
        const v8 a = Splat(x[r * K + b * kBlock + k]);
        acc[r][0] += a * w0;
        acc[r][1] += a * w1;
      }
    }
  }
  for (int r = 0; r < MR; ++r) { Store(y + r * ldy, acc[r][0]); Store(y + r * ldy + 8, acc[r][1]); }
}

#if defined(__AVX512F__)
// A block header's row of 16 scales (m of a symmetric kind: zeros).
template <int BITS>
inline v16 Scales16(const uint8_t* block, ScaleRow row) {
  if (!kOffsets<BITS> && row == kM) return v16{};
  const int i = kRowAt<BITS>(row);
  if constexpr (BITS & kHalf) {
    return (v16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * i)));
  } else {
    v16 v;
    std::memcpy(&v, block + 64 * i, sizeof v);
    return v;
  }
}

inline v16 Join(v8 lo, v8 hi) {  // in registers: through memory, the 64-byte reload stalls on two 32-byte stores
  const __m512d low = _mm512_castpd256_pd512(_mm256_castps_pd((__m256)lo));
  return (v16)_mm512_castpd_ps(_mm512_insertf64x4(low, _mm256_castps_pd((__m256)hi), 1));
}

// MR (4-8) rows as `QuantTile`, with AVX-512's `Tile16` order (per element Tile's, the same bits): one 16-wide
// decode and MR fused multiply-adds per k.
template <int BITS, int MR>
void QuantTile16(const float* x, int64_t K, const uint8_t* q, float* y, int64_t ldy) {
  v16 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = v16{};
  constexpr int64_t kRowBytes = kPanel * kCodeBits<BITS> / 8;
  for (int64_t b = 0; b < K / kBlock; ++b, q += kBlockBytes<BITS>) {
    Stream(q, kBlockBytes<BITS>);
    v16 d = Scales16<BITS>(q, kD);
    const v16 m = Scales16<BITS>(q, kM);
    const uint8_t* c = q + kHeaderBytes<BITS>;
    for (int64_t k = 0; k < kBlock; ++k, c += kRowBytes) {
      if (kBits<BITS> == 6 && k == kBlock / 2) d = Scales16<BITS>(q, kD2);
      v8 lo, hi;
      Codes<kBits<BITS>>(c, lo, hi);
      const v16 w = Dequantised<BITS>(Join(lo, hi), d, m);
      for (int r = 0; r < MR; ++r) acc[r] += x[r * K + b * kBlock + k] * w;
    }
  }
  for (int r = 0; r < MR; ++r) std::memcpy(y + r * ldy, &acc[r], sizeof acc[r]);
}
#endif

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// x [M, K] against block-coded panels [N / 16, K / 32, block bytes], in either code layout.
template <int BITS, typename D>
bool QuantShapesAgree(const D& xd, const D& wd) {
  return xd.size() == 2 && wd.size() == 3 && wd[2] == kBlockBytes<BITS> && wd[1] * kBlock == xd[1];
}

// Rows [M, K] of x against one block-coded panel: one row decodes in registers; more rows decode the panel once
// into a scratch panel that every tile of rows then reads from L1/L2.
// This thread's scratch panel of K x 16 floats, cache-line aligned like XLA's buffers: the tiles' 32-byte loads
// would otherwise straddle lines.
inline float* ScratchPanel(int64_t K) {
  thread_local std::unique_ptr<float, FreeDeleter> scratch;
  thread_local int64_t scratch_size = 0;
  if (scratch_size < K * kPanel) {
    scratch.reset(static_cast<float*>(std::aligned_alloc(64, K * kPanel * sizeof(float))));
    scratch_size = K * kPanel;
  }
  return scratch.get();
}

template <int BITS>
void QuantPanel(const float* x, int64_t M, int64_t K, const uint8_t* w, float* y, int64_t N) {
  switch (M) {
    case 1: return QuantRow<BITS>(x, w, K, y);
    case 2: return QuantTile<BITS, 2>(x, K, w, y, N);
    case 3: return QuantTile<BITS, 3>(x, K, w, y, N);
#if defined(__AVX512F__)
    case 4: return QuantTile16<BITS, 4>(x, K, w, y, N);
    case 5: return QuantTile16<BITS, 5>(x, K, w, y, N);
    case 6: return QuantTile16<BITS, 6>(x, K, w, y, N);
    case 7: return QuantTile16<BITS, 7>(x, K, w, y, N);
    case 8: return QuantTile16<BITS, 8>(x, K, w, y, N);
#else
    case 4: return QuantTile<BITS, 4>(x, K, w, y, N);
#endif
  }
  float* scratch = ScratchPanel(K);
  Dequant<BITS>(w, K, scratch);
  Panel(x, M, K, scratch, y, N);
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
  ParallelFor(pool, wd[0], 4 * (M * K + wd[0] * K * kPanel),
              [=](int64_t p) { QuantPanel<BITS>(xp, M, K, wp + p * panel_bytes, yp + p * kPanel, N); });
  return ffi::Error::Success();
}

// Int8 dot products (llama.cpp's way, opt-in: `native.QuantLinear(int8=True)`): each row of x is quantised to int8
// per block of 32 (x ~ dx * qx, |qx| <= 127, and the block's float sum sx), and a block's 32 products per column
// are one exact integer sum: y[j] += (d[j] * dx) * sum_k code[k][j] * qx[k] + m[j] * sx. Against decoding every
// weight to float32 (QuantRow), a block costs ~5x fewer instructions, so batch-1 decoding is bound by memory again,
// and larger M runs 1.4-2x the float32 FMA rate with AVX2, and 1.4-1.6x that with AVX-512 VNNI (one Zen 4 core, 32
// rows: Q4 117 -> 167, Q8 50 -> 78 G multiply-adds/s); the price is x's rounding to 8 bits (~0.4% per element),
// so the results are close to, not bit-identical with, the float32 path's.
// A block's codes are [8 k-quads][16 columns][4 k] (8-bit, signed), or, 4-bit, [8 k-quads][8 columns][4 k] bytes
// with column c in the low nibble and c + 8 in the high one: a 32-byte load is 8 columns x 4 consecutive k, the
// shape of _mm256_maddubs_epi16 against 4 broadcast bytes of qx. 5-bit codes (Q5_0/1/K, 0..31) are their low 4 bits
// so packed, then 8 bytes per k-quad of their fifth bits (32 for the low nibbles' codes, then 32 for the high ones'):
// 0.875 bytes a weight where 8-bit codes cost 1.25, for a few more instructions per k-quad.
// x's scale group for a weight kind: Q6_K codes (BITS 6) meet x quantised per 256 values, as llama.cpp's q6_K x
// q8_K dot does (K permitting), the others per block of 32.
inline int64_t XGroup(int bits, int64_t K) { return bits == 6 && K % 256 == 0 ? 256 : kBlock; }

#if defined(__AVX2__)
constexpr bool kInt8Dot = true;

// One row of x -> int8 codes q [K], scales dx and float sums sx [K / 32]; dx from the largest |x| of each `group`
// values (32, or 256 for Q6_K: each block of the group gets the group's dx).
inline void QuantizeRow(const float* x, int64_t K, int8_t* q, float* dx, float* sx, int64_t group = kBlock) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  float group_max = 0.f;
  for (int64_t b = 0; b < K / kBlock; ++b, x += kBlock, q += kBlock) {
    if (group > kBlock && b % (group / kBlock) == 0) {
      __m256 gm = _mm256_setzero_ps();
      for (int64_t i = 0; i < group; i += 8) gm = _mm256_max_ps(gm, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
      alignas(32) float g[8];
      _mm256_store_ps(g, gm);
      group_max = 0.f;
      for (int i = 0; i < 8; ++i) group_max = std::max(group_max, g[i]);
    }
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
    if (group > kBlock) m = group_max;
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

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

// MR rows of quantised x times one int8-dot panel, with VNNI: one vpdpbusd is 64 byte products summed in fours into
// the 16 columns' int32 lanes, where AVX2 needs maddubs, madd and add for 32; what is left (the per-block float
// epilogue, x's broadcasts) bounds it at ~1 vpdpbusd a cycle. Tiles of 4 rows measured best (2: -35%, 6-8: -2-5%
// at 32 rows, and slower for few rows). The integer sums are exact either way and the float epilogue is the same,
// so both paths give the same results.
template <int BITS, int MR>
void DotTile(const QuantizedX& x, int64_t row, const uint8_t* w, float* y, int64_t ldy, bool stream) {
  const int64_t KB = x.K / kBlock;
  v16 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = v16{};
  for (int64_t b = 0; b < KB; ++b, w += kBlockBytes<BITS>) {
    if (stream) Stream(w, kBlockBytes<BITS>);
    const uint8_t* c = w + kHeaderBytes<BITS>;
    const int8_t* xq = x.q + row * x.K + b * kBlock;
    __m512i s[MR], lo[MR];  // lo: BITS = 6's sums over k = 0..15 (s then sums k = 16..31)
    for (int r = 0; r < MR; ++r) s[r] = _mm512_setzero_si512();
    if constexpr (kNibbles<BITS>) {
      // 32 bytes of [8 columns][4 k] in both halves; the upper half shifted by 4 bits: columns 0-7 from the low
      // nibbles, 8-15 from the high ones, unsigned as vpdpbusd's first operand wants. 5-bit codes: the k-quad's 64
      // fifth bits, one per byte, add 16.
      const __m512i low4 = _mm512_set1_epi8(0x0F), shift = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);
      for (int kq = 0; kq < 8; ++kq) {
        const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * kq));
        const __m512i packed = _mm512_broadcast_i64x4(half);
        __m512i codes = _mm512_and_si512(_mm512_srlv_epi64(packed, shift), low4);
        if constexpr (kBits<BITS> == 5) {
          uint64_t fifth;
          std::memcpy(&fifth, c + kCodeBytes<BITS> + 8 * kq, sizeof fifth);
          codes = _mm512_mask_add_epi8(codes, fifth, codes, _mm512_set1_epi8(16));
        }
        for (int r = 0; r < MR; ++r) {
          int32_t quad;
          std::memcpy(&quad, xq + r * x.K + 4 * kq, 4);
          s[r] = _mm512_dpbusd_epi32(s[r], codes, _mm512_set1_epi32(quad));
        }
      }
    } else {
      // Signed codes against signed x: x + 128 is unsigned, and 128 * (the codes' column sums) is taken off after.
      const __m512i bias = _mm512_set1_epi8(char(0x80));
      __m512i wsum = _mm512_setzero_si512();
      for (int kq = 0; kq < 8; ++kq) {
        if (kBits<BITS> == 6 && kq == 4) {
          for (int r = 0; r < MR; ++r) {
            lo[r] = _mm512_sub_epi32(s[r], wsum);
            s[r] = _mm512_setzero_si512();
          }
          wsum = _mm512_setzero_si512();
        }
        const __m512i codes = _mm512_loadu_si512(c + 64 * kq);
        wsum = _mm512_dpbusd_epi32(wsum, bias, codes);
        for (int r = 0; r < MR; ++r) {
          uint32_t quad;
          std::memcpy(&quad, xq + r * x.K + 4 * kq, 4);
          s[r] = _mm512_dpbusd_epi32(s[r], _mm512_set1_epi32(int32_t(quad ^ 0x80808080u)), codes);
        }
      }
      for (int r = 0; r < MR; ++r) s[r] = _mm512_sub_epi32(s[r], wsum);
    }
    const v16 d = Scales16<BITS>(w, kD), m = Scales16<BITS>(w, kM);  // zeros for kSym
    for (int r = 0; r < MR; ++r) {
      const float dx = x.dx[(row + r) * KB + b], sx = x.sx[(row + r) * KB + b];
      if constexpr (kBits<BITS> == 6) {
        const v16 d2 = Scales16<BITS>(w, kD2);
        acc[r] += (d * dx) * __builtin_convertvector((__v16si)lo[r], v16) +
                  (d2 * dx) * __builtin_convertvector((__v16si)s[r], v16) + m * sx;
      } else {
        acc[r] += (d * dx) * __builtin_convertvector((__v16si)s[r], v16) + m * sx;
      }
    }
  }
  for (int r = 0; r < MR; ++r) std::memcpy(y + r * ldy, &acc[r], sizeof acc[r]);
}

constexpr int kDotRows = 4;
constexpr bool kVnni = true;
#else
// 32 fifth bits (little-endian) -> 32 bytes of 16 or 0.
inline __m256i FifthBits(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, sizeof bits);
  // byte i takes byte i / 8 of the bits, keeps bit i % 8 of it, and becomes 16 where that bit is set
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(int32_t(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i select = _mm256_set1_epi64x(int64_t(0x8040201008040201));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select), _mm256_set1_epi8(16));
}

// MR rows of quantised x times one int8-dot panel.
template <int BITS, int MR>
void DotTile(const QuantizedX& x, int64_t row, const uint8_t* w, float* y, int64_t ldy, bool stream) {
  const int64_t KB = x.K / kBlock;
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
  v8 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = Splat(0.f);
  for (int64_t b = 0; b < KB; ++b, w += kBlockBytes<BITS>) {
    if (stream) Stream(w, kBlockBytes<BITS>);
    const uint8_t* c = w + kHeaderBytes<BITS>;
    __m256i s[MR][2], lo[MR][2];  // lo: BITS = 6's sums over k = 0..15 (s then sums k = 16..31)
    if constexpr (kNibbles<BITS>) {
      // 16-bit sums are exact here: 8 k-quads of two products of a code (0..15) and a qx (|qx| <= 127) stay under
      // 8 * 2 * 15 * 127 = 30480; 5-bit codes (0..31) are summed in 32 bits every 4 k-quads (31496).
      __m256i h[MR][2];
      for (int r = 0; r < MR; ++r) h[r][0] = h[r][1] = s[r][0] = s[r][1] = _mm256_setzero_si256();
      // Unrolled whole, GCC computes all 64 products first and spills them to the stack before summing.
#pragma GCC unroll 2
      for (int kq = 0; kq < 8; ++kq) {
        if (kBits<BITS> == 5 && kq == 4) {
          for (int r = 0; r < MR; ++r) {
            s[r][0] = _mm256_madd_epi16(h[r][0], ones);
            s[r][1] = _mm256_madd_epi16(h[r][1], ones);
            h[r][0] = h[r][1] = _mm256_setzero_si256();
          }
        }
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * kq));
        __m256i lo = _mm256_and_si256(packed, low4), hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
        if constexpr (kBits<BITS> == 5) {
          lo = _mm256_or_si256(lo, FifthBits(c + kCodeBytes<BITS> + 8 * kq));
          hi = _mm256_or_si256(hi, FifthBits(c + kCodeBytes<BITS> + 8 * kq + 4));
        }
        for (int r = 0; r < MR; ++r) {
          int32_t quad;
          std::memcpy(&quad, x.q + (row + r) * x.K + b * kBlock + 4 * kq, 4);
          const __m256i xq = _mm256_set1_epi32(quad);
          h[r][0] = _mm256_add_epi16(h[r][0], _mm256_maddubs_epi16(lo, xq));
          h[r][1] = _mm256_add_epi16(h[r][1], _mm256_maddubs_epi16(hi, xq));
        }
      }
      for (int r = 0; r < MR; ++r) {
        s[r][0] = _mm256_add_epi32(s[r][0], _mm256_madd_epi16(h[r][0], ones));
        s[r][1] = _mm256_add_epi32(s[r][1], _mm256_madd_epi16(h[r][1], ones));
      }
    } else {
      // maddubs wants unsigned x signed bytes: |code| times qx carrying the code's sign (|pair| <= 2 * 128 * 127).
      for (int r = 0; r < MR; ++r) s[r][0] = s[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 2
      for (int kq = 0; kq < 8; ++kq) {
        if (kBits<BITS> == 6 && kq == 4) {
          for (int r = 0; r < MR; ++r) {
            lo[r][0] = s[r][0];
            lo[r][1] = s[r][1];
            s[r][0] = s[r][1] = _mm256_setzero_si256();
          }
        }
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
    const v8 d0 = Scales<BITS>(w, kD, 0), d1 = Scales<BITS>(w, kD, 1);
    const v8 m0 = Scales<BITS>(w, kM, 0), m1 = Scales<BITS>(w, kM, 1);  // zeros for kSym
    for (int r = 0; r < MR; ++r) {
      const v8 dx = Splat(x.dx[(row + r) * KB + b]), sx = Splat(x.sx[(row + r) * KB + b]);
      if constexpr (kBits<BITS> == 6) {
        const v8 e0 = Scales<BITS>(w, kD2, 0), e1 = Scales<BITS>(w, kD2, 1);
        acc[r][0] += (d0 * dx) * __builtin_convertvector((v8i)lo[r][0], v8) +
                     (e0 * dx) * __builtin_convertvector((v8i)s[r][0], v8) + m0 * sx;
        acc[r][1] += (d1 * dx) * __builtin_convertvector((v8i)lo[r][1], v8) +
                     (e1 * dx) * __builtin_convertvector((v8i)s[r][1], v8) + m1 * sx;
      } else {
        acc[r][0] += (d0 * dx) * __builtin_convertvector((v8i)s[r][0], v8) + m0 * sx;
        acc[r][1] += (d1 * dx) * __builtin_convertvector((v8i)s[r][1], v8) + m1 * sx;
      }
    }
  }
  for (int r = 0; r < MR; ++r) { Store(y + r * ldy, acc[r][0]); Store(y + r * ldy + 8, acc[r][1]); }
}

constexpr int kDotRows = 3;
constexpr bool kVnni = false;
#endif

// The last `rows` (< kDotRows) rows of a panel.
template <int BITS, int MR = kDotRows - 1>
void DotRest(const QuantizedX& x, int64_t rows, int64_t m, const uint8_t* w, float* y, int64_t N, bool stream) {
  if (rows == MR) return DotTile<BITS, MR>(x, m, w, y + m * N, N, stream);
  if constexpr (MR > 1) DotRest<BITS, MR - 1>(x, rows, m, w, y, N, stream);
}

template <int BITS>
void DotPanel(const QuantizedX& x, int64_t M, const uint8_t* w, float* y, int64_t N) {
  // Non-temporal hints (`Stream`) where the panel is read once, or is re-read by each tile of rows from L1.
  const bool stream = M <= kDotRows || x.K / kBlock * kBlockBytes<BITS> <= (16 << 10);
  int64_t m = 0;
  for (; M - m >= kDotRows; m += kDotRows) DotTile<BITS, kDotRows>(x, m, w, y + m * N, N, stream);
  if (M > m) DotRest<BITS>(x, M - m, m, w, y, N, stream);
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
                                               scales.get() + (M + r) * KB, XGroup(kBits<BITS>, K));
  const QuantizedX qx{q.get(), scales.get(), scales.get() + M * KB, K};
  const uint8_t* wp = w.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, wd[0], M * K + wd[0] * panel_bytes,
              [=](int64_t p) { DotPanel<BITS>(qx, M, wp + p * panel_bytes, yp + p * kPanel, N); });
  return ffi::Error::Success();
}
#else
constexpr bool kInt8Dot = false;
constexpr bool kVnni = false;

template <int BITS>
ffi::Error DotMatmul(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::U8>, ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "int8-dot matmul needs AVX2");
}
#endif

// Mixture-of-experts: rows x [A, K], row a through expert e[a]'s weight, the experts' panels stacked as
// w [E, N / 16, K / 32, block bytes]. The rows are grouped by expert (a counting sort), so each active expert's
// weight is read once per call, whatever its number of rows, and an idle expert's not at all: a batch-1 decode step
// reads the top-k experts' bytes only. Per group the arithmetic is QuantMatmul's (or DotMatmul's, `DOT`), so each
// row's result equals its expert's own matmul.
template <int BITS, bool DOT>
ffi::Error ExpertMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> experts,
                        ffi::Buffer<ffi::U8> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), ed = experts.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || ed.size() != 1 || wd.size() != 4 || ed[0] != xd[0] || wd[2] * kBlock != xd[1] ||
      wd[3] != kBlockBytes<BITS>) {
    return ffi::Error::InvalidArgument("expert matmul wants x [A, K], experts [A], w [E, N / 16, K / 32, block bytes]");
  }
  const int64_t A = xd[0], K = xd[1], E = wd[0], P = wd[1], KB = wd[2], N = P * kPanel;
  const int64_t panel_bytes = KB * kBlockBytes<BITS>, expert_bytes = P * panel_bytes;
  const int32_t* ep = experts.typed_data();
  std::vector<int64_t> start(E + 1, 0), order(A);
  for (int64_t a = 0; a < A; ++a) {
    if (ep[a] < 0 || ep[a] >= E) return ffi::Error::InvalidArgument("expert matmul: an expert index out of range");
    ++start[ep[a] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1), active;
  for (int64_t a = 0; a < A; ++a) order[fill[ep[a]]++] = a;
  for (int64_t e = 0; e < E; ++e) if (start[e + 1] > start[e]) active.push_back(e);
  const float* xp = x.typed_data();
  std::unique_ptr<float[]> xs(new float[A * K]), ys(new float[A * N]);
  for (int64_t i = 0; i < A; ++i) std::memcpy(xs.get() + i * K, xp + order[i] * K, K * sizeof(float));
  const uint8_t* wp = w.typed_data();
  const int64_t* st = start.data();
  const int64_t* act = active.data();
  float* ysp = ys.get();
  const int64_t bytes = static_cast<int64_t>(active.size()) * expert_bytes + 4 * A * K;
#if defined(__AVX2__)
  if constexpr (DOT) {
    std::unique_ptr<int8_t[]> q(new int8_t[A * K]);
    std::unique_ptr<float[]> scales(new float[2 * A * KB]);
    for (int64_t r = 0; r < A; ++r) QuantizeRow(xs.get() + r * K, K, q.get() + r * K, scales.get() + r * KB,
                                                 scales.get() + (A + r) * KB, XGroup(kBits<BITS>, K));
    const int8_t* qp = q.get();
    const float* sp = scales.get();
    ParallelFor(pool, static_cast<int64_t>(active.size()) * P, bytes, [=](int64_t i) {
      const int64_t e = act[i / P], p = i % P, s = st[e];
      const QuantizedX qx{qp + s * K, sp + s * KB, sp + (A + s) * KB, K};
      DotPanel<BITS>(qx, st[e + 1] - s, wp + e * expert_bytes + p * panel_bytes, ysp + s * N + p * kPanel, N);
    });
  } else
#else
  if constexpr (DOT) return ffi::Error(ffi::ErrorCode::kUnimplemented, "int8-dot matmul needs AVX2");
#endif
  {
    const float* xsp = xs.get();
    ParallelFor(pool, static_cast<int64_t>(active.size()) * P, bytes, [=](int64_t i) {
      const int64_t e = act[i / P], p = i % P, s = st[e];
      QuantPanel<BITS>(xsp + s * K, st[e + 1] - s, K, wp + e * expert_bytes + p * panel_bytes,
                       ysp + s * N + p * kPanel, N);
    });
  }
  float* yp = y->typed_data();
  for (int64_t i = 0; i < A; ++i) std::memcpy(yp + order[i] * N, ysp + i * N, N * sizeof(float));
  return ffi::Error::Success();
}

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

// K/V pages hold float32, or bfloat16 (the upper half of a float32, rounded to nearest even): half the memory per
// token, so a pool holds twice the tokens. (Attention here measured no faster on bfloat16 pages: see benchmarks/.)
typedef uint16_t bf16;

inline v8 LoadKV(const float* p) { return Load(p); }
inline v8 LoadKV(const bf16* p) {
#if defined(__AVX2__)
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (v8)_mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
#else
  v8 out;
  for (int i = 0; i < 8; ++i) {
    const uint32_t bits = uint32_t(p[i]) << 16;
    std::memcpy(&out[i], &bits, 4);
  }
  return out;
#endif
}

inline void StoreKV(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
// As XLA converts: round to nearest even; a NaN stays a (quiet) NaN.
inline void StoreKV(bf16* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, src + i, 4);
    const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    dst[i] = bf16(nan ? (bits >> 16) | 0x40 : (bits + 0x7FFFu + ((bits >> 16) & 1)) >> 16);
  }
}

// The 8 horizontal sums of a[0..7], as one vector.
inline v8 Reduce8(const v8* a) {
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

inline float HorizontalMax(v8 v) {
  float r = v[0];
  for (int i = 1; i < 8; ++i) r = std::max(r, v[i]);
  return r;
}

inline float HorizontalSum(v8 v) {
  float r = v[0];
  for (int i = 1; i < 8; ++i) r += v[i];
  return r;
}

// The 8 dot products of each of NG queries q[g] [hd] with keys k[0..7] [hd] -> out[g]: 8 * NG independent
// accumulators, then one horizontal reduction per query for all eight keys (a per-key reduction cost more than the
// products).
template <int NG, typename T>
inline void Dot8(const float* const* q, const T* const* k, int64_t hd, v8* out) {
  v8 a[NG][8];
  for (int g = 0; g < NG; ++g) {
    for (int j = 0; j < 8; ++j) a[g][j] = Splat(0.f);
  }
  for (int64_t i = 0; i < hd; i += 8) {
    v8 qv[NG];
    for (int g = 0; g < NG; ++g) qv[g] = Load(q[g] + i);
    for (int j = 0; j < 8; ++j) {
      const v8 kv = LoadKV(k[j] + i);
      for (int g = 0; g < NG; ++g) a[g][j] += qv[g] * kv;
    }
  }
  for (int g = 0; g < NG; ++g) out[g] = Reduce8(a[g]);
}

// One query row (b, t) against its keys, for query heads [g0, g1) of each kv head in [h0, h1): the key blocks are
// the outer loop, so the heads of one page slot, which lie side by side, are read together.
// E: the pages' element type (float or bf16).
template <typename E>
struct Attention {
  const float* q;
  const E *k, *v;
  const int32_t *page_table, *pos;
  float* out;
  int64_t T, KV, G, hd, ps, W, P, window;
  float scale;

  void Row(int64_t bt, int64_t h0, int64_t h1, int64_t g0 = 0, int64_t g1 = -1) const {
    if (g1 < 0) g1 = G;
    const int64_t b = bt / T, ng = g1 - g0, heads = (h1 - h0) * ng;
    auto at = [&](int64_t h, int64_t g) { return ((bt * KV + h) * G + g) * hd; };  // q and out are [B, T, KV, G, hd]
    for (int64_t h = h0; h < h1; ++h) std::fill(out + at(h, g0), out + at(h, g1), 0.f);
    const int64_t p = std::min<int64_t>(pos[bt], W * ps - 1);
    if (p < 0) return;
    const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    // Keys go in blocks: one max and one rescale of the accumulators per block and query head, not per key.
    constexpr int64_t kBlock = 32;
    float m[kMaxHeads], l[kMaxHeads];
    int64_t slots[kBlock];
    const E* keys[kBlock];
    const E* vals[kBlock];
    for (int64_t i = 0; i < heads; ++i) { m[i] = -INFINITY; l[i] = 0.f; }
    for (int64_t j0 = lo; j0 <= p; j0 += kBlock) {
      const int64_t n = std::min(kBlock, p - j0 + 1), n8 = (n + 7) / 8 * 8;
      // Page and offset advance with j: no division per key (ps is not known at compile time).
      int64_t col = j0 / ps, off = j0 % ps;
      int32_t page = 0;
      for (int64_t jj = 0; jj < n; ++jj) {
        if (jj == 0 || off == 0) {
          page = page_table[b * W + col];
          if (page < 0 || page >= P) page = 0;  // the null page; never read for a valid table
        }
        slots[jj] = (page * ps + off) * KV;  // pages are [P, ps, KV, hd]
        if (++off == ps) { off = 0; ++col; }
      }
      for (int64_t jj = n; jj < n8; ++jj) slots[jj] = slots[n - 1];  // a repeat of the last key, masked below
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t jj = 0; jj < n8; ++jj) {
          keys[jj] = k + (slots[jj] + h) * hd;
          vals[jj] = v + (slots[jj] + h) * hd;
        }
        // Up to three query heads at a time share every key and value load from L1 (the loads, not the FMAs,
        // bounded one head at a time).
        for (int64_t g = g0; g < g1;) {
          const int64_t i = (h - h0) * ng + g - g0, left = g1 - g;
          const int64_t take = left == 4 ? 2 : std::min<int64_t>(left, 3);
          const float* qs[3] = {q + at(h, g), q + at(h, g + std::min<int64_t>(1, take - 1)),
                                q + at(h, g + take - 1)};
          float* os[3] = {out + at(h, g), out + at(h, g + std::min<int64_t>(1, take - 1)), out + at(h, g + take - 1)};
          if (take == 3) Heads<3>(qs, keys, vals, n, n8, m + i, l + i, os);
          else if (take == 2) Heads<2>(qs, keys, vals, n, n8, m + i, l + i, os);
          else Heads<1>(qs, keys, vals, n, n8, m + i, l + i, os);
          g += take;
        }
      }
    }
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t g = g0; g < g1; ++g) {
        float* o = out + at(h, g);
        const v8 inv = Splat(1.f / l[(h - h0) * ng + g - g0]);
        for (int64_t d = 0; d < hd; d += 8) Store(o + d, Load(o + d) * inv);
      }
    }
  }

  // NG query heads (of one kv head) over one block of n keys: scores, the online-softmax update, and the weighted
  // values; m, l and og are the heads' running max, sum and output rows.
  template <int NG>
  void Heads(const float* const* qg, const E* const* keys, const E* const* vals, int64_t n, int64_t n8,
             float* m, float* l, float* const* og) const {
    alignas(32) float s[NG][32];
    for (int64_t jj = 0; jj < n8; jj += 8) {
      v8 d[NG];
      Dot8<NG>(qg, keys + jj, hd, d);
      for (int g = 0; g < NG; ++g) Store(s[g] + jj, d[g] * Splat(scale));
    }
    // Vector max and sum (serial scalar chains over 32 keys were a fifth of the time): the keys past n repeat key
    // n - 1, so they leave the max alone, and their weights are zeroed before the sum.
    float correction[NG];
    const v8 tail = __builtin_convertvector(v8i{0, 1, 2, 3, 4, 5, 6, 7} + int32_t(n8 - 8) < int32_t(n), v8);
    for (int g = 0; g < NG; ++g) {
      v8 mx = Load(s[g]);
      for (int64_t jj = 8; jj < n8; jj += 8) mx = mx > Load(s[g] + jj) ? mx : Load(s[g] + jj);
      const float m_new = std::max(m[g], HorizontalMax(mx));
      correction[g] = std::exp(m[g] - m_new);
      m[g] = m_new;
      v8 sum = Splat(0.f);
      for (int64_t jj = 0; jj < n8; jj += 8) {
        v8 e = Exp(Load(s[g] + jj) - Splat(m_new));
        if (jj + 8 == n8) e *= -tail;  // a true compare is -1
        Store(s[g] + jj, e);
        sum += e;
      }
      l[g] = l[g] * correction[g] + HorizontalSum(sum);
    }
    // The output rows stay in registers, 64 floats a head at a time, while the block's values stream past.
    int64_t i0 = 0;
    for (; i0 + 64 <= hd; i0 += 64) Accumulate<NG, 8>(s, vals, n, i0, correction, og);
    switch ((hd - i0) / 8) {
      case 7: Accumulate<NG, 7>(s, vals, n, i0, correction, og); break;
      case 6: Accumulate<NG, 6>(s, vals, n, i0, correction, og); break;
      case 5: Accumulate<NG, 5>(s, vals, n, i0, correction, og); break;
      case 4: Accumulate<NG, 4>(s, vals, n, i0, correction, og); break;
      case 3: Accumulate<NG, 3>(s, vals, n, i0, correction, og); break;
      case 2: Accumulate<NG, 2>(s, vals, n, i0, correction, og); break;
      case 1: Accumulate<NG, 1>(s, vals, n, i0, correction, og); break;
    }
  }

  // og[g][i0 : i0 + 8C] = og[g] * correction[g] + sum_j p[g][j] * vals[j][i0 : i0 + 8C] for the NG heads; C is fixed
  // so the NG * C accumulators stay in registers.
  template <int NG, int C>
  static void Accumulate(const float (*p)[32], const E* const* vals, int64_t n, int64_t i0,
                         const float* correction, float* const* og) {
    v8 acc[NG][C];
    for (int g = 0; g < NG; ++g) {
      for (int k = 0; k < C; ++k) acc[g][k] = Load(og[g] + i0 + 8 * k) * Splat(correction[g]);
    }
    for (int64_t jj = 0; jj < n; ++jj) {
      v8 pj[NG];
      for (int g = 0; g < NG; ++g) pj[g] = Splat(p[g][jj]);
      const E* vr = vals[jj] + i0;
      for (int k = 0; k < C; ++k) {
        const v8 vv = LoadKV(vr + 8 * k);
        for (int g = 0; g < NG; ++g) acc[g][k] += pj[g] * vv;
      }
    }
    for (int g = 0; g < NG; ++g) {
      for (int k = 0; k < C; ++k) Store(og[g] + i0 + 8 * k, acc[g][k]);
    }
  }
};

template <typename E>
void RunAttention(ffi::ThreadPool& pool, const Attention<E>& a, int64_t B) {
  int64_t keys = 0;  // keys read over all queries, for the inline-or-parallel choice
  for (int64_t i = 0; i < B * a.T; ++i) {
    if (a.pos[i] >= 0) keys += a.window > 0 ? std::min<int64_t>(a.pos[i] + 1, a.window) : a.pos[i] + 1;
  }
  // Rows are the work items when there are enough of them for the threads; fewer rows split by kv head.
  const int64_t split = B * a.T >= 4 ? 1 : a.KV, per = a.KV / split;
  ParallelFor(pool, B * a.T * split, keys * a.KV * a.hd * 2 * sizeof(E), [a, split, per](int64_t item) {
    const int64_t h0 = item % split * per;
    a.Row(item / split, h0, h0 + per);
  });
}

// Float32 or bfloat16 pages, both of one type.
inline bool PageTypes(ffi::DataType k, ffi::DataType v) {
  return k == v && (k == ffi::DataType::F32 || k == ffi::DataType::BF16);
}

// fn(k, v) with the pages' data typed as their elements (`PageTypes` checked first): float* or bf16*.
template <typename F>
void WithPages(ffi::DataType type, void* k, void* v, F&& fn) {
  if (type == ffi::DataType::BF16) return fn(static_cast<bf16*>(k), static_cast<bf16*>(v));
  fn(static_cast<float*>(k), static_cast<float*>(v));
}

// q [B, T, KV, G, hd]; pages [P, ps, KV, hd] (float32 or bfloat16); page_table [B, W]; positions [B, T] (< 0:
// padding, output 0).
ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                          ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> page_table,
                          ffi::Buffer<ffi::S32> positions, int64_t window, float scale,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k_pages.dimensions(), td = page_table.dimensions();
  if (qd.size() != 5 || kd.size() != 4 || td.size() != 2 || kd[2] != qd[2] || kd[3] != qd[4] || qd[4] % 8 ||
      td[0] != qd[0] || v_pages.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("paged_attention: shapes disagree (head_dim must be a multiple of 8)");
  }
  if (!PageTypes(k_pages.element_type(), v_pages.element_type())) {
    return ffi::Error::InvalidArgument("paged_attention: K/V pages must both be float32 or both bfloat16");
  }
  const int64_t B = qd[0], T = qd[1], KV = qd[2], G = qd[3], hd = qd[4];
  if (KV * G > kMaxHeads) return ffi::Error::InvalidArgument("paged_attention: at most 256 query heads");
  WithPages(k_pages.element_type(), k_pages.untyped_data(), v_pages.untyped_data(), [&](auto* kp, auto* vp) {
    using E = std::remove_pointer_t<decltype(kp)>;
    const Attention<E> a{q.typed_data(), kp, vp, page_table.typed_data(), positions.typed_data(), out->typed_data(),
                         T, KV, G, hd, kd[1], td[1], kd[0], window, scale};
    RunAttention(pool, a, B);
  });
  return ffi::Error::Success();
}

// ---- 16-bit float weights (GGUF F16 / BF16 files) ----
//
// Panels [N / 16, K, 16] of float16 or bfloat16 bits, widened exactly to float32 (F16C's vcvtph2ps; bfloat16 is the
// upper half of a float32) and multiplied as `Panel` / `Row` multiply float32 panels: the same products and sums in
// the same order, so the results are bit-identical to the float32 weights' while each weight costs 2 bytes.

template <bool BF16>
inline v8 LoadHalf(const uint16_t* p) {
  if constexpr (BF16) {
    return LoadKV(reinterpret_cast<const bf16*>(p));
  } else {
    return LoadF16(p);
  }
}

// Rows [M, K] of x against one 16-bit panel: up to 8 rows (6 without AVX-512) widen it in registers, in the
// float32 kernels' order (`Row`, `Tile16` or `Tile` on `Half` elements, so `Panel`'s bits); more rows widen the panel
// once into a scratch panel that `Panel`'s tiles read. (Widened through the scratch panel, 2 rows had run slower than
// one: F16 decode at batch 2, 4 and 8 runs 2.4x, 1.6x and 1.3x that path's tokens/s.)
template <bool BF16>
void HalfPanel(const float* x, int64_t M, int64_t K, const uint16_t* w, float* y, int64_t N) {
  const Half<BF16>* h = reinterpret_cast<const Half<BF16>*>(w);
  if (M == 1) return Row(x, K, h, y);
#if defined(__AVX512F__)
  switch (M) {
    case 2: return Tile16<2>(x, K, h, y, N, true);
    case 3: return Tile16<3>(x, K, h, y, N, true);
    case 4: return Tile16<4>(x, K, h, y, N, true);
    case 5: return Tile16<5>(x, K, h, y, N, true);
    case 6: return Tile16<6>(x, K, h, y, N, true);
    case 7: return Tile16<7>(x, K, h, y, N, true);
    case 8: return Tile16<8>(x, K, h, y, N, true);
  }
#else
  switch (M) {
    case 2: return Tile<2>(x, K, h, y, N, true);
    case 3: return Tile<3>(x, K, h, y, N, true);
    case 4: return Tile<4>(x, K, h, y, N, true);
    case 5: return Tile<5>(x, K, h, y, N, true);
    case 6: return Tile<6>(x, K, h, y, N, true);
  }
#endif
  float* scratch = ScratchPanel(K);
  for (int64_t i = 0; i < K * kPanel; i += 8) {
    if (i % 32 == 0) Stream(w + i);
    Store(scratch + i, LoadHalf<BF16>(w + i));
  }
  Panel(x, M, K, scratch, y, N);
}

template <bool BF16>
ffi::Error HalfMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || wd[1] != xd[1]) {
    return ffi::Error::InvalidArgument("16-bit matmul wants x [M, K] and w [N / 16, K, 16]");
  }
  const float* xp = x.typed_data();
  const uint16_t* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t M = xd[0], K = xd[1], N = wd[0] * kPanel;
  ParallelFor(pool, wd[0], 4 * M * K + 2 * wd[0] * K * kPanel,
              [=](int64_t p) { HalfPanel<BF16>(xp, M, K, wp + p * K * kPanel, yp + p * kPanel, N); });
  return ffi::Error::Success();
}

// ---- One decoder layer in one call ----
//
// Why: a batch-1 decode step of SmolLM2 on the block codes was ~150 kernel calls of 10-60 us each plus ~300 small
// XLA ops, with 0.6 ms of gaps between the calls, every parallel call waking a pool thread, and attention reading
// keys and values cold (see TouchKV). Here a layer is one call whose threads stay awake through its phases (norm,
// q/k/v, rope and the K/V write, attention, o, norm, gate/up, down), each a set of items of a `Team` (above),
// so a phase costs a few hundred nanoseconds of synchronisation instead of a wake-up. Batch 1 gained 5-8%; 32 rows,
// whose calls already kept every thread busy, nothing.

// Bytes of a block of a code kind (bits, + kHalf, + kSym), 0 for none.
constexpr int64_t BlockBytesOf(int64_t kind) {
  switch (kind) {
    case 4: return kBlockBytes<4>;
    case 5: return kBlockBytes<5>;
    case 6: return kBlockBytes<6>;
    case 8: return kBlockBytes<8>;
    case kHalf + 4: return kBlockBytes<kHalf + 4>;
    case kHalf + 5: return kBlockBytes<kHalf + 5>;
    case kHalf + 8: return kBlockBytes<kHalf + 8>;
    case kSym + 6: return kBlockBytes<kSym + 6>;
    case kSym + 8: return kBlockBytes<kSym + 8>;
    case kSym + kHalf + 8: return kBlockBytes<kSym + kHalf + 8>;
    default: return 0;
  }
}

// A matmul weight of the fused layer: float32 panels (kind 0), block codes decoded to float32 (kind = bits), the
// int8-dot layout (kind = 16 + bits, x quantised per row first), either with float16 block scales (+ kHalf) and
// without offsets (+ kSym), or 16-bit panels (kind 32 float16, 33 bfloat16).
struct Weight {
  int64_t kind = 0;
  const uint8_t* data = nullptr;
  int64_t K = 0, panels = 0, panel_bytes = 0;

  bool dot() const { return kind & 16; }
  int64_t padded_n() const { return panels * kPanel; }
  static bool Coded(int64_t kind) { return kind != 0 && kind != 32 && kind != 33; }

  // The weight in `b`, or nullptr with the error in `error`.
  static const char* Of(const ffi::AnyBuffer& b, int64_t kind, int64_t K, Weight& w) {
    const auto d = b.dimensions();
    w = Weight{kind, static_cast<const uint8_t*>(b.untyped_data()), K, d.size() == 3 ? d[0] : 0, 0};
    bool ok = d.size() == 3;
    if (kind == 0) {
      ok = ok && b.element_type() == ffi::DataType::F32 && d[1] == K && d[2] == kPanel;
      w.panel_bytes = K * kPanel * 4;
    } else if (kind == 32 || kind == 33) {
      ok = ok && b.element_type() == ffi::DataType::U16 && d[1] == K && d[2] == kPanel;
      w.panel_bytes = K * kPanel * 2;
    } else {
      const int64_t block = BlockBytesOf(kind & ~int64_t{16});  // 0: no such kind
      ok = ok && block > 0 && ((kind & 15) != 5 || w.dot()) && (kind & ~int64_t{31 + kHalf + kSym}) == 0 &&
           b.element_type() == ffi::DataType::U8 && d[1] * kBlock == K && d[2] == block;
      if (w.dot() && !kInt8Dot) return "decoder_layer: int8-dot matmuls need AVX2";
      w.panel_bytes = d[1] * block;
    }
    return ok ? nullptr : "decoder_layer: a weight's shape or type disagrees with its kind";
  }
};

// x rows quantised for the int8-dot matmuls: codes [M, K], then scales dx [M, K / 32] and float sums sx [M, K / 32].
struct RowCodes {
  std::vector<int8_t> q;
  std::vector<float> dx, sx;
  int64_t K = 0;

  void Resize(int64_t M, int64_t k) {
    K = k;
    q.resize(M * K);
    dx.resize(M * K / kBlock);
    sx.resize(M * K / kBlock);
  }
  void Quantize(const float* x, int64_t r, int64_t group) {
#if defined(__AVX2__)
    QuantizeRow(x, K, q.data() + r * K, dx.data() + r * K / kBlock, sx.data() + r * K / kBlock, group);
#endif
  }
};

// Output panel p of y [M, ldy] = x [M, K] @ w.
void MatmulPanel(const Weight& w, const float* x, const RowCodes& codes, int64_t M, int64_t p, float* y,
                 int64_t ldy) {
  const uint8_t* wp = w.data + p * w.panel_bytes;
  y += p * kPanel;
  switch (w.kind) {
    case 0: return Panel(x, M, w.K, reinterpret_cast<const float*>(wp), y, ldy);
    case 4: return QuantPanel<4>(x, M, w.K, wp, y, ldy);
    case 6: return QuantPanel<6>(x, M, w.K, wp, y, ldy);
    case 32: return HalfPanel<false>(x, M, w.K, reinterpret_cast<const uint16_t*>(wp), y, ldy);
    case 33: return HalfPanel<true>(x, M, w.K, reinterpret_cast<const uint16_t*>(wp), y, ldy);
    case 8: return QuantPanel<8>(x, M, w.K, wp, y, ldy);
    case kHalf + 4: return QuantPanel<kHalf + 4>(x, M, w.K, wp, y, ldy);
    case kHalf + 8: return QuantPanel<kHalf + 8>(x, M, w.K, wp, y, ldy);
    case kSym + 6: return QuantPanel<kSym + 6>(x, M, w.K, wp, y, ldy);
    case kSym + 8: return QuantPanel<kSym + 8>(x, M, w.K, wp, y, ldy);
    case kSym + kHalf + 8: return QuantPanel<kSym + kHalf + 8>(x, M, w.K, wp, y, ldy);
  }
#if defined(__AVX2__)
  const QuantizedX qx{codes.q.data(), codes.dx.data(), codes.sx.data(), w.K};
  switch (w.kind) {
    case 16 + 4: return DotPanel<4>(qx, M, wp, y, ldy);
    case 16 + 5: return DotPanel<5>(qx, M, wp, y, ldy);
    case 16 + 6: return DotPanel<6>(qx, M, wp, y, ldy);
    case 16 + 8: return DotPanel<8>(qx, M, wp, y, ldy);
    case 16 + kHalf + 4: return DotPanel<kHalf + 4>(qx, M, wp, y, ldy);
    case 16 + kHalf + 5: return DotPanel<kHalf + 5>(qx, M, wp, y, ldy);
    case 16 + kHalf + 8: return DotPanel<kHalf + 8>(qx, M, wp, y, ldy);
    case 16 + kSym + 6: return DotPanel<kSym + 6>(qx, M, wp, y, ldy);
    case 16 + kSym + 8: return DotPanel<kSym + 8>(qx, M, wp, y, ldy);
    case 16 + kSym + kHalf + 8: return DotPanel<kSym + kHalf + 8>(qx, M, wp, y, ldy);
  }
#endif
}

// ---- The greedy head: the exact argmax of x @ W from approximate logits and the few panels they cannot rule out ----
//
// Why: at batch 1 the vocabulary projection is a fifth of a step's bytes (SmolLM2: 57 of 270 MB in float16), and a
// greedy row needs only its argmax. An int8 copy of W with a scale per column (row r of W^T: w_r ~ s_r q_r) gives
// every logit to within a bound: |x.w_r - s_r (x.q_r)| <= |x| c_r, where c_r is |w_r - s_r q_r| plus the float
// rounding of both dot products (native.ArgmaxHead computes it). A block-coded W (8-bit codes, whose exact decode to
// float32 bounds a row's time, not the bus) is approximated by its int8-dot layout instead (see HeadArgmax). A
// column whose upper bound is below the best lower bound cannot be the argmax; the panels of those that can are
// computed exactly by the weight's own kernel (`MatmulPanel`, the bits the full matmul gives) and the first maximum
// among them is the argmax of the full logits: every column left out is strictly below it. Non-finite x or bounds
// compute every panel.

constexpr int64_t kMaxArgmaxRows = 16;  // a step verifying 8 drafted tokens pads to 16 tokens' logits rows

// MR rows of x against one int8 panel [K, 16] (column scales s[16]): the approximate logits y[r * ldy + j].
template <int MR>
void ApproxPanel(const float* x, int64_t K, const int8_t* q, const float* s, float* y, int64_t ldy) {
  auto widen = [](const int8_t* p) { return __builtin_convertvector(Widen(reinterpret_cast<const uint8_t*>(p), true), v8); };
  v8 acc[MR][2], odd[MR][2];  // two k-streams, as `Row`: four independent accumulators at MR = 1
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = odd[r][0] = odd[r][1] = Splat(0.f);
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    Stream(q + k * kPanel, 2 * kPanel);
    const v8 a0 = widen(q + k * kPanel), a1 = widen(q + k * kPanel + 8);
    const v8 b0 = widen(q + (k + 1) * kPanel), b1 = widen(q + (k + 1) * kPanel + 8);
    for (int r = 0; r < MR; ++r) {
      const v8 xa = Splat(x[r * K + k]), xb = Splat(x[r * K + k + 1]);
      acc[r][0] += xa * a0;
      acc[r][1] += xa * a1;
      odd[r][0] += xb * b0;
      odd[r][1] += xb * b1;
    }
  }
  for (; k < K; ++k) {
    const v8 a0 = widen(q + k * kPanel), a1 = widen(q + k * kPanel + 8);
    for (int r = 0; r < MR; ++r) {
      acc[r][0] += Splat(x[r * K + k]) * a0;
      acc[r][1] += Splat(x[r * K + k]) * a1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    Store(y + r * ldy, (acc[r][0] + odd[r][0]) * Load(s));
    Store(y + r * ldy + 8, (acc[r][1] + odd[r][1]) * Load(s + 8));
  }
}

void ApproxPanelRows(const float* x, int64_t M, int64_t K, const int8_t* q, const float* s, float* y, int64_t ldy) {
  for (; M > 8; M -= 8, x += 8 * K, y += 8 * ldy) ApproxPanel<8>(x, K, q, s, y, ldy);
  switch (M) {
    case 1: return ApproxPanel<1>(x, K, q, s, y, ldy);
    case 2: return ApproxPanel<2>(x, K, q, s, y, ldy);
    case 3: return ApproxPanel<3>(x, K, q, s, y, ldy);
    case 4: return ApproxPanel<4>(x, K, q, s, y, ldy);
    case 5: return ApproxPanel<5>(x, K, q, s, y, ldy);
    case 6: return ApproxPanel<6>(x, K, q, s, y, ldy);
    case 7: return ApproxPanel<7>(x, K, q, s, y, ldy);
    case 8: return ApproxPanel<8>(x, K, q, s, y, ldy);
  }
}

// Per row m of x: the panel's greatest lower and upper bounds of its columns' logits, from their approximate logits
// a [M, lda] (this panel's 16 columns, `valid` of them real) and bounds: a -/+ (|x| bound + |a| 2^-21), the second
// term covering float32's rounding here (the bounds' own margin covers that of |x| bound).
void PanelBounds(const float* a, int64_t lda, const float* bound, int64_t M, int64_t valid, const float* norm,
                 float* low, float* high, int64_t ld) {
  for (int64_t m = 0; m < M; ++m) {
    float lo = -INFINITY, hi = -INFINITY;
    for (int64_t j = 0; j < valid; ++j) {
      const float v = a[m * lda + j], slack = norm[m] * bound[j] + std::fabs(v) * 0x1p-21f;
      lo = std::max(lo, v - slack);
      hi = std::max(hi, v + slack);
    }
    low[m * ld] = lo;
    high[m * ld] = hi;
  }
}

// `approx_kind` -1: q is int8 panels [P, K, 16] with column scales, and a column's bound is per unit of |x|. Else q
// is the exact weight in the int8-dot layout of that kind (a block-coded head without offsets, m = 0): the approximate
// logits are its dot products with x rounded to int8 (x~), exact in integers; then |x.w_r - x~.w_r| <= |w_r| |x - x~|,
// so the bounds are the columns' norms |w_r|, per unit of |x - x~| plus both dot products' float32 rounding.
ffi::Error HeadArgmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::AnyBuffer q,
                      ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bound, int64_t kind, int64_t approx_kind,
                      int64_t n, ffi::ResultBuffer<ffi::S32> tokens) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || xd[0] > kMaxArgmaxRows) return ffi::Error::InvalidArgument("head_argmax wants x [M <= 16, K]");
  const int64_t M = xd[0], K = xd[1];
  Weight wt, approx;
  if (const char* error = Weight::Of(w, kind, K, wt)) return ffi::Error::InvalidArgument(error);
  const int64_t P = wt.panels, N = P * kPanel;
  const bool int8_panels = approx_kind < 0;
  if (int8_panels) {
    const auto qd = q.dimensions();
    if (q.element_type() != ffi::DataType::S8 || qd.size() != 3 || qd[0] != P || qd[1] != K || qd[2] != kPanel ||
        scale.element_count() != N) {
      return ffi::Error::InvalidArgument("head_argmax wants int8 panels [P, K, 16] and scales [P * 16]");
    }
  } else if (const char* error = Weight::Of(q, approx_kind, K, approx)) {
    return ffi::Error::InvalidArgument(error);
  }
  if (wt.dot() || (!int8_panels && (!approx.dot() || approx.panels != P)) || bound.element_count() != N || n > N) {
    return ffi::Error::InvalidArgument("head_argmax: the weights' kinds or shapes disagree");
  }
  const float* xp = x.typed_data();
  const float *sp = scale.typed_data(), *bp = bound.typed_data();
  RowCodes codes;
  if (!int8_panels) codes.Resize(M, K);
  float norm[kMaxArgmaxRows];  // per row, what the bounds are per unit of
  bool finite = true;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = xp + m * K;
    double ss = 0, err = 0, ss_q = 0;
    for (int64_t k = 0; k < K; ++k) ss += double(xm[k]) * xm[k];
    if (!int8_panels) {
      codes.Quantize(xm, m, XGroup(approx.kind & 15, K));
      for (int64_t k = 0; k < K; ++k) {
        const double xq = double(codes.dx[(m * K + k) / kBlock]) * codes.q[m * K + k];
        err += (xm[k] - xq) * (xm[k] - xq);
        ss_q += xq * xq;
      }
    }
    const double bound_unit =
        int8_panels ? std::sqrt(ss) : std::sqrt(err) + (K + 2) * 0x1p-22 * (std::sqrt(ss) + std::sqrt(ss_q));
    norm[m] = static_cast<float>(bound_unit * (1 + 2e-6));  // rounded up: the bounds stay bounds
    finite = finite && std::isfinite(norm[m]);
  }
  thread_local std::vector<float> logits, low, high;
  logits.resize(M * N);
  low.resize(M * P);
  high.resize(M * P);
  float *yp = logits.data(), *lp = low.data(), *hp = high.data();
  const float* np_ = norm;
  const int8_t* qp = static_cast<const int8_t*>(q.untyped_data());
  const int64_t approx_bytes = int8_panels ? K * kPanel : approx.panel_bytes;
  ParallelFor(pool, P, M * K * 4 + P * approx_bytes, [=, &approx, &codes](int64_t p) {
    float* a = yp + p * kPanel;
    if (int8_panels) {
      ApproxPanelRows(xp, M, K, qp + p * K * kPanel, sp + p * kPanel, a, N);
    } else {
      MatmulPanel(approx, xp, codes, M, p, yp, N);
    }
    PanelBounds(a, N, bp + p * kPanel, M, std::min(kPanel, n - p * kPanel), np_, lp + p, hp + p, P);
  });
  // The panels that may hold a row's argmax: every panel whose upper bound reaches the row's best lower bound.
  float best[kMaxArgmaxRows];
  for (int64_t m = 0; m < M; ++m) {
    best[m] = *std::max_element(lp + m * P, lp + (m + 1) * P);
    finite = finite && std::isfinite(best[m]);
  }
  std::vector<int64_t> panels;
  for (int64_t p = 0; p < P; ++p) {
    bool keep = !finite;
    for (int64_t m = 0; m < M && !keep; ++m) keep = hp[m * P + p] >= best[m];
    if (keep) panels.push_back(p);
  }
  const int64_t* cp = panels.data();
  ParallelFor(pool, static_cast<int64_t>(panels.size()), static_cast<int64_t>(panels.size()) * wt.panel_bytes,
              [=, &wt, &codes](int64_t i) { MatmulPanel(wt, xp, codes, M, cp[i], yp, N); });
  // jnp.argmax's choice among the exact logits: the first maximum, or the first NaN.
  int32_t* out = tokens->typed_data();
  for (int64_t m = 0; m < M; ++m) {
    const float* y = yp + m * N;
    int64_t arg = -1;
    for (const int64_t p : panels) {
      for (int64_t r = p * kPanel; r < std::min(n, (p + 1) * kPanel); ++r) {
        if (std::isnan(y[r])) { arg = r; break; }
        if (arg < 0 || y[r] > y[arg]) arg = r;
      }
      if (arg >= 0 && std::isnan(y[arg])) break;
    }
    out[m] = static_cast<int32_t>(std::max<int64_t>(arg, 0));
  }
  return ffi::Error::Success();
}

// out = w * x / rms(x) over n values (model.rms_norm). The squares are summed in 8 lanes, then across them, as
// XLA's vectorised reduction does: one running sum over 576 values was measurably less accurate against transformers.
inline void RmsNorm(const float* x, const float* w, int64_t n, float eps, float* out) {
  v8 lanes = Splat(0.f);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) lanes += Load(x + k) * Load(x + k);
  float ss = 0.f;
  for (int j = 0; j < 8; ++j) ss += lanes[j];
  for (; k < n; ++k) ss += x[k] * x[k];
  const float inv = 1.f / std::sqrt(ss / n + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

// x [hd] rotated in place by the angles' cos and sin [hd], in the rotate-half layout (model.rope).
inline void Rope(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

struct LayerDims {
  int64_t M, T, D, H, KV, hd, W, P, ps, window;
  float eps, scale;
};

// Reads every key and value row that attention will read for each sequence's (one) query, so that attention finds
// them in cache. They were evicted by the weights streamed since the last step, and attention reading them cold was
// bound by DRAM latency (~3x its time on warm rows at a few hundred tokens); read while the other members run the
// q/k/v matmul, they arrive in time. (Prefetch instructions did not help here; loads did.) Prefill chunks and large
// batches skip it: their attention has the arithmetic or the rows to keep the memory bus busy.
template <typename E>
float TouchKV(const E* k, const E* v, const int32_t* table, const int32_t* pos, const LayerDims& L) {
  float sum = 0.f;
  if (L.T > 1 || L.M > 4) return sum;
  const int64_t row = L.KV * L.hd;  // a slot's keys (all heads) are one contiguous row
  for (int64_t b = 0; b < L.M; ++b) {
    const int64_t p = std::min<int64_t>(pos[b], L.W * L.ps - 1);
    const int64_t lo = L.window > 0 ? std::max<int64_t>(0, p - L.window + 1) : 0;
    for (int64_t j = lo; j <= p; ++j) {
      const int32_t page = table[b * L.W + j / L.ps];
      if (page < 0 || page >= L.P) continue;
      const int64_t first = (page * L.ps + j % L.ps) * row;
      for (int64_t f = first; f < first + row; f += 64 / sizeof(E)) sum += float(k[f]) + float(v[f]);
    }
  }
  return sum;
}

// x [M, D] -> x_out [M, D] through one pre-norm decoder layer (model.decoder_layer), writing the rows' keys and
// values into the pages (k_pages / v_pages are the outputs', aliased to the inputs').
ffi::Error DecoderLayer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> attn_norm,
                        ffi::AnyBuffer wqkv_b, ffi::Buffer<ffi::F32> bqkv, ffi::Buffer<ffi::F32> q_norm,
                        ffi::Buffer<ffi::F32> k_norm, ffi::AnyBuffer wo_b, ffi::Buffer<ffi::F32> mlp_norm,
                        ffi::AnyBuffer w_gate_up_b, ffi::AnyBuffer w_down_b, ffi::AnyBuffer, ffi::AnyBuffer,
                        ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> positions,
                        ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin, int64_t qkv_kind, int64_t o_kind,
                        int64_t gate_up_kind, int64_t down_kind, int64_t num_heads, int64_t num_kv_heads,
                        int64_t window, float eps, float scale, ffi::ResultBuffer<ffi::F32> x_out,
                        ffi::Result<ffi::AnyBuffer> k_out, ffi::Result<ffi::AnyBuffer> v_out) {
  const auto xd = x.dimensions(), kd = k_out->dimensions(), td = page_table.dimensions(),
             pd = positions.dimensions();
  if (xd.size() != 2 || kd.size() != 4 || td.size() != 2 || pd.size() != 2 || td[0] != pd[0] ||
      pd[0] * pd[1] != xd[0] || kd[2] != num_kv_heads || num_heads % num_kv_heads || kd[3] % 8 ||
      num_heads > kMaxHeads || cos.element_count() != xd[0] * kd[3] || sin.element_count() != xd[0] * kd[3]) {
    return ffi::Error::InvalidArgument("decoder_layer: shapes disagree");
  }
  if (!PageTypes(k_out->element_type(), v_out->element_type())) {
    return ffi::Error::InvalidArgument("decoder_layer: K/V pages must both be float32 or both bfloat16");
  }
  const LayerDims L{xd[0], pd[1], xd[1], num_heads, num_kv_heads, kd[3], td[1], kd[0], kd[1], window, eps, scale};
  const int64_t Q = L.H * L.hd, KVS = L.KV * L.hd;
  const auto dd = w_down_b.dimensions();
  const int64_t F = dd.size() == 3 ? (Weight::Coded(down_kind) ? dd[1] * kBlock : dd[1]) : 0;
  Weight wqkv, wo, wgu, wdown;
  for (const char* error : {Weight::Of(wqkv_b, qkv_kind, L.D, wqkv), Weight::Of(wo_b, o_kind, Q, wo),
                            Weight::Of(w_gate_up_b, gate_up_kind, L.D, wgu),
                            Weight::Of(w_down_b, down_kind, F, wdown)}) {
    if (error) return ffi::Error::InvalidArgument(error);
  }
  if (wqkv.padded_n() < Q + 2 * KVS || wo.padded_n() < L.D || wgu.padded_n() < 2 * F || wdown.padded_n() < L.D ||
      (bqkv.element_count() && bqkv.element_count() != Q + 2 * KVS) ||
      (q_norm.element_count() && q_norm.element_count() != L.hd) ||
      (k_norm.element_count() && k_norm.element_count() != L.hd)) {
    return ffi::Error::InvalidArgument("decoder_layer: weight widths disagree with the heads and sizes");
  }
  const int64_t M = L.M, D = L.D;
  const int64_t ld_qkv = wqkv.padded_n(), ld_o = wo.padded_n(), ld_gu = wgu.padded_n(), ld_down = wdown.padded_n();

  // Scratch, kept by the calling thread from call to call. The phases name it through these references: inside a
  // lambda run by a helper, a thread_local would name the helper's own.
  struct Scratch {
    std::vector<float> h, qkv, q, attn, tmp, gu, act;
    RowCodes codes;
  };
  thread_local Scratch scratch;
  auto &h = scratch.h, &qkv = scratch.qkv, &q = scratch.q, &attn = scratch.attn, &tmp = scratch.tmp,
       &gu = scratch.gu, &act = scratch.act;
  RowCodes& codes = scratch.codes;
  h.resize(M * D);
  qkv.resize(M * ld_qkv);
  q.resize(M * Q);
  attn.resize(M * Q);
  tmp.resize(M * std::max(ld_o, ld_down));
  gu.resize(M * ld_gu);
  act.resize(M * F);
  codes.Resize(M, std::max({D, Q, F}));

  const float* xp = x.typed_data();
  float* xo = x_out->typed_data();
  const int32_t* table = page_table.typed_data();
  const int32_t* pos = positions.typed_data();
  const float *cs = cos.typed_data(), *sn = sin.typed_data();

  Team team(pool, pool.num_threads());
  auto quantize = [&](const Weight& w, const float* rows, int64_t ld) {
    if (!w.dot()) return;
    codes.K = w.K;
    const int64_t group = XGroup(w.kind & 15, w.K);
    auto body = [&](int64_t r) { codes.Quantize(rows + r * ld, r, group); };
    team.Run(M, body);
  };
  auto matmul = [&](const Weight& w, const float* in, float* out, int64_t ld) {
    auto body = [&](int64_t p) { MatmulPanel(w, in, codes, M, p, out, ld); };
    team.Run(w.panels, body);
  };

  auto norm1 = [&](int64_t r) { RmsNorm(xp + r * D, attn_norm.typed_data(), D, eps, h.data() + r * D); };
  team.Run(M, norm1);
  quantize(wqkv, h.data(), D);
  // q/k/v (item 0 reads the keys and values attention will read, see TouchKV), rope and the K/V write, attention:
  // the phases that touch the pages, of either element type.
  auto qkv_rope_attention = [&](auto* kp, auto* vp) {
    using E = std::remove_pointer_t<decltype(kp)>;
    std::atomic<float> touched{0.f};
    auto qkv_and_touch = [&](int64_t i) {
      if (i == 0) return touched.store(TouchKV(kp, vp, table, pos, L), std::memory_order_relaxed);
      MatmulPanel(wqkv, h.data(), codes, M, i - 1, qkv.data(), ld_qkv);
    };
    team.Run(wqkv.panels + 1, qkv_and_touch);

    // Bias, q/k norms, rope; then the row's key and value into its page (rows at padding or past the table: none).
    auto rope = [&](int64_t r) {
      float* row = qkv.data() + r * ld_qkv;
      if (bqkv.element_count()) {
        for (int64_t i = 0; i < Q + 2 * KVS; ++i) row[i] += bqkv.typed_data()[i];
      }
      const float *c = cs + r * L.hd, *s = sn + r * L.hd;
      for (int64_t i = 0; i < L.H + L.KV; ++i) {
        float* head = row + i * L.hd;
        const float* nw = i < L.H ? q_norm.typed_data() : k_norm.typed_data();
        if ((i < L.H ? q_norm : k_norm).element_count()) RmsNorm(head, nw, L.hd, eps, head);
        Rope(head, c, s, L.hd);
      }
      std::memcpy(q.data() + r * Q, row, Q * sizeof(float));
      const int64_t p = pos[r], b = r / L.T;
      if (p < 0 || p >= L.W * L.ps) return;
      const int32_t page = table[b * L.W + p / L.ps];
      if (page < 0 || page >= L.P) return;
      const int64_t slot = (page * L.ps + p % L.ps) * KVS;
      StoreKV(kp + slot, row + Q, KVS);
      StoreKV(vp + slot, row + Q + KVS, KVS);
    };
    team.Run(M, rope);

    const Attention<E> a{q.data(), kp, vp, table, pos, attn.data(), L.T, L.KV, L.H / L.KV, L.hd, L.ps, L.W, L.P,
                         window, scale};
    // Few rows: an item per query head, so that two members split a step's 9 heads 5:4 rather than 3 kv heads 2:1.
    const int64_t split = M < 4 ? L.H : L.KV, G = L.H / L.KV;
    auto attend = [&](int64_t item) {
      const int64_t row = item / split, head = item % split;
      if (split == L.KV) return a.Row(row, head, head + 1);
      a.Row(row, head / G, head / G + 1, head % G, head % G + 1);
    };
    team.Run(M * split, attend);
  };
  WithPages(k_out->element_type(), k_out->untyped_data(), v_out->untyped_data(), qkv_rope_attention);

  quantize(wo, attn.data(), Q);
  matmul(wo, attn.data(), tmp.data(), ld_o);
  auto residual_norm = [&](int64_t r) {
    for (int64_t i = 0; i < D; ++i) xo[r * D + i] = xp[r * D + i] + tmp[r * ld_o + i];
    RmsNorm(xo + r * D, mlp_norm.typed_data(), D, eps, h.data() + r * D);
  };
  team.Run(M, residual_norm);
  quantize(wgu, h.data(), D);
  matmul(wgu, h.data(), gu.data(), ld_gu);

  auto swiglu = [&](int64_t r) {
    const float* g = gu.data() + r * ld_gu;
    float* out = act.data() + r * F;
    int64_t i = 0;
    for (; i + 8 <= F; i += 8) {
      const v8 gi = Load(g + i);
      Store(out + i, gi / (Splat(1.f) + Exp(-gi)) * Load(g + F + i));
    }
    for (; i < F; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * g[F + i];
  };
  team.Run(M, swiglu);
  quantize(wdown, act.data(), F);
  matmul(wdown, act.data(), tmp.data(), ld_down);
  auto residual = [&](int64_t r) {
    for (int64_t i = 0; i < D; ++i) xo[r * D + i] += tmp[r * ld_down + i];
  };
  team.Run(M, residual);
  return ffi::Error::Success();
}

}  // namespace

// native.py builds this file as two translation units compiled side by side, NOVALLM_PART 0 and 1, each defining
// some of the handlers: GCC compiles only the functions a unit's handlers reach, and the fused layer alone takes
// about as long as all the rest (~5.7 s each at -O3 here, 8.1 s as one unit). Without NOVALLM_PART, one unit.
#if !defined(NOVALLM_PART) || NOVALLM_PART == 0

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
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
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
NOVALLM_QUANT_MATMUL(NovallmQ6MatmulF32, QuantMatmul, 6)
NOVALLM_QUANT_MATMUL(NovallmQ8MatmulF32, QuantMatmul, 8)
NOVALLM_QUANT_MATMUL(NovallmQ4HMatmulF32, QuantMatmul, kHalf + 4)
NOVALLM_QUANT_MATMUL(NovallmQ8HMatmulF32, QuantMatmul, kHalf + 8)
NOVALLM_QUANT_MATMUL(NovallmQ4DotMatmulF32, DotMatmul, 4)
NOVALLM_QUANT_MATMUL(NovallmQ5DotMatmulF32, DotMatmul, 5)
NOVALLM_QUANT_MATMUL(NovallmQ6DotMatmulF32, DotMatmul, 6)
NOVALLM_QUANT_MATMUL(NovallmQ8DotMatmulF32, DotMatmul, 8)
NOVALLM_QUANT_MATMUL(NovallmQ4HDotMatmulF32, DotMatmul, kHalf + 4)
NOVALLM_QUANT_MATMUL(NovallmQ5HDotMatmulF32, DotMatmul, kHalf + 5)
NOVALLM_QUANT_MATMUL(NovallmQ8HDotMatmulF32, DotMatmul, kHalf + 8)
NOVALLM_QUANT_MATMUL(NovallmQ6SymMatmulF32, QuantMatmul, kSym + 6)
NOVALLM_QUANT_MATMUL(NovallmQ8SymMatmulF32, QuantMatmul, kSym + 8)
NOVALLM_QUANT_MATMUL(NovallmQ8HSymMatmulF32, QuantMatmul, kSym + kHalf + 8)
NOVALLM_QUANT_MATMUL(NovallmQ6SymDotMatmulF32, DotMatmul, kSym + 6)
NOVALLM_QUANT_MATMUL(NovallmQ8SymDotMatmulF32, DotMatmul, kSym + 8)
NOVALLM_QUANT_MATMUL(NovallmQ8HSymDotMatmulF32, DotMatmul, kSym + kHalf + 8)

#define NOVALLM_EXPERT_MATMUL(name, bits, dot)                                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (ExpertMatmul<bits, dot>), ffi::Ffi::Bind()                     \
                                                                     .Ctx<ffi::ThreadPool>()          \
                                                                     .Arg<ffi::Buffer<ffi::F32>>()    \
                                                                     .Arg<ffi::Buffer<ffi::S32>>()    \
                                                                     .Arg<ffi::Buffer<ffi::U8>>()     \
                                                                     .Ret<ffi::Buffer<ffi::F32>>());
NOVALLM_EXPERT_MATMUL(NovallmQ4ExpertMatmulF32, 4, false)
NOVALLM_EXPERT_MATMUL(NovallmQ6ExpertMatmulF32, 6, false)
NOVALLM_EXPERT_MATMUL(NovallmQ8ExpertMatmulF32, 8, false)
NOVALLM_EXPERT_MATMUL(NovallmQ4HExpertMatmulF32, kHalf + 4, false)
NOVALLM_EXPERT_MATMUL(NovallmQ8HExpertMatmulF32, kHalf + 8, false)
NOVALLM_EXPERT_MATMUL(NovallmQ4DotExpertMatmulF32, 4, true)
NOVALLM_EXPERT_MATMUL(NovallmQ5DotExpertMatmulF32, 5, true)
NOVALLM_EXPERT_MATMUL(NovallmQ6DotExpertMatmulF32, 6, true)
NOVALLM_EXPERT_MATMUL(NovallmQ8DotExpertMatmulF32, 8, true)
NOVALLM_EXPERT_MATMUL(NovallmQ4HDotExpertMatmulF32, kHalf + 4, true)
NOVALLM_EXPERT_MATMUL(NovallmQ5HDotExpertMatmulF32, kHalf + 5, true)
NOVALLM_EXPERT_MATMUL(NovallmQ8HDotExpertMatmulF32, kHalf + 8, true)
NOVALLM_EXPERT_MATMUL(NovallmQ6SymExpertMatmulF32, kSym + 6, false)
NOVALLM_EXPERT_MATMUL(NovallmQ8SymExpertMatmulF32, kSym + 8, false)
NOVALLM_EXPERT_MATMUL(NovallmQ8HSymExpertMatmulF32, kSym + kHalf + 8, false)
NOVALLM_EXPERT_MATMUL(NovallmQ6SymDotExpertMatmulF32, kSym + 6, true)
NOVALLM_EXPERT_MATMUL(NovallmQ8SymDotExpertMatmulF32, kSym + 8, true)
NOVALLM_EXPERT_MATMUL(NovallmQ8HSymDotExpertMatmulF32, kSym + kHalf + 8, true)

#define NOVALLM_HALF_MATMUL(name, bf16)                                                               \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, HalfMatmul<bf16>, ffi::Ffi::Bind()                              \
                                                            .Ctx<ffi::ThreadPool>()                   \
                                                            .Arg<ffi::Buffer<ffi::F32>>()             \
                                                            .Arg<ffi::Buffer<ffi::U16>>()             \
                                                            .Ret<ffi::Buffer<ffi::F32>>());
NOVALLM_HALF_MATMUL(NovallmF16MatmulF32, false)
NOVALLM_HALF_MATMUL(NovallmBf16MatmulF32, true)

extern "C" int NovallmHasInt8Dot() { return kInt8Dot; }
// 2: the int8-dot tiles use AVX-512 VNNI, 1: AVX2.
extern "C" int NovallmInt8DotIsa() { return kInt8Dot ? 1 + kVnni : 0; }

#endif
#if !defined(NOVALLM_PART) || NOVALLM_PART == 1

XLA_FFI_DEFINE_HANDLER_SYMBOL(NovallmHeadArgmaxF32, HeadArgmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::AnyBuffer>()         // w, as the fused layer's weights
                                  .Arg<ffi::AnyBuffer>()         // int8 panels, or w in an int8-dot layout
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the int8 panels' column scales
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the columns' bounds
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("approx_kind")
                                  .Attr<int64_t>("n")
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(NovallmDecoderLayerF32, DecoderLayer,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // attn_norm
                                  .Arg<ffi::AnyBuffer>()         // wqkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bqkv ([0]: none)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q_norm ([0]: none)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_norm ([0]: none)
                                  .Arg<ffi::AnyBuffer>()         // wo
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mlp_norm
                                  .Arg<ffi::AnyBuffer>()         // w_gate_up
                                  .Arg<ffi::AnyBuffer>()         // w_down
                                  .Arg<ffi::AnyBuffer>()         // k_pages (aliased to the second result)
                                  .Arg<ffi::AnyBuffer>()         // v_pages (aliased to the third result)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Attr<int64_t>("qkv_kind")
                                  .Attr<int64_t>("o_kind")
                                  .Attr<int64_t>("gate_up_kind")
                                  .Attr<int64_t>("down_kind")
                                  .Attr<int64_t>("num_heads")
                                  .Attr<int64_t>("num_kv_heads")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("eps")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

#endif
