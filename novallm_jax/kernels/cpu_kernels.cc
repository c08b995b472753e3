// Native float32 CPU kernels called through XLA's FFI (see native.py):
// - PackedMatmul: y[M, N] = x[M, K] @ W, W packed as panels [N / 16, K, 16];
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
// the weight matmuls of a decode step. Here each (row, query, kv head) streams only its own keys, once, with an
// online softmax, and the G query heads that share a kv head share every key and value load.
//
// Compiled on the user's machine with -march=native (see native.py), so GCC vector extensions become AVX2/AVX-512
// or NEON as the CPU allows. Panels are split across XLA's intra-op thread pool.

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));
constexpr int64_t kPanel = 16;

inline v8 Load(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void Store(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline v8 Splat(float a) { return v8{a, a, a, a, a, a, a, a}; }

// MR rows of x times one panel: 2*MR accumulators, so that the FMA latency is hidden for MR >= 2.
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

inline float Dot(const float* a, const float* b, int64_t n) {
  v8 acc = Splat(0.f);
  for (int64_t i = 0; i < n; i += 8) acc += Load(a + i) * Load(b + i);
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += acc[i];
  return s;
}

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
  const int64_t B = qd[0], T = qd[1], KV = qd[2], G = qd[3], hd = qd[4], ps = kd[1], W = td[1], P = kd[0];
  if (G > 64) return ffi::Error::InvalidArgument("paged_attention: at most 64 query heads per kv head");
  const float* qp = q.typed_data();
  const float* kp = k_pages.typed_data();
  const float* vp = v_pages.typed_data();
  const int32_t* pt = page_table.typed_data();
  const int32_t* pos = positions.typed_data();
  float* op = out->typed_data();
  int64_t keys = 0;  // keys read over all queries, for the inline-or-parallel choice
  for (int64_t i = 0; i < B * T; ++i) {
    if (pos[i] >= 0) keys += window > 0 ? std::min<int64_t>(pos[i] + 1, window) : pos[i] + 1;
  }
  ParallelFor(pool, B * T * KV, keys * KV * hd * 8, [=](int64_t item) {
    const int64_t h = item % KV, bt = item / KV, b = bt / T;
    const float* qs = qp + item * G * hd;
    float* o = op + item * G * hd;
    std::fill(o, o + G * hd, 0.f);
    const int64_t p = std::min<int64_t>(pos[bt], W * ps - 1);
    if (p < 0) return;
    const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    // Keys go in blocks: one max and one rescale of the accumulators per block and query head, not per key.
    constexpr int64_t kBlock = 32;
    float m[64], l[64], s[64][kBlock];
    const float* keys[kBlock];
    const float* vals[kBlock];
    for (int64_t g = 0; g < G; ++g) { m[g] = -INFINITY; l[g] = 0.f; }
    for (int64_t j0 = lo; j0 <= p; j0 += kBlock) {
      const int64_t n = std::min(kBlock, p - j0 + 1);
      for (int64_t jj = 0; jj < n; ++jj) {
        const int64_t j = j0 + jj;
        int32_t page = pt[b * W + j / ps];
        if (page < 0 || page >= P) page = 0;  // the null page; never read for a valid table
        const int64_t slot = (page * ps + j % ps) * KV + h;  // pages are [P, ps, KV, hd]
        keys[jj] = kp + slot * hd;
        vals[jj] = vp + slot * hd;
      }
      for (int64_t g = 0; g < G; ++g) {
        float block_max = -INFINITY;
        for (int64_t jj = 0; jj < n; ++jj) {
          s[g][jj] = Dot(qs + g * hd, keys[jj], hd) * scale;
          block_max = std::max(block_max, s[g][jj]);
        }
        const float m_new = std::max(m[g], block_max), correction = std::exp(m[g] - m_new);
        m[g] = m_new;
        float sum = 0.f;
        for (int64_t jj = 0; jj < n; ++jj) sum += s[g][jj] = std::exp(s[g][jj] - m_new);
        l[g] = l[g] * correction + sum;
        float* og = o + g * hd;
        for (int64_t i = 0; i < hd; i += 8) {
          v8 acc = Load(og + i) * Splat(correction);
          for (int64_t jj = 0; jj < n; ++jj) acc += Splat(s[g][jj]) * Load(vals[jj] + i);
          Store(og + i, acc);
        }
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const v8 inv = Splat(1.f / l[g]);
      for (int64_t i = 0; i < hd; i += 8) Store(o + g * hd + i, Load(o + g * hd + i) * inv);
    }
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
