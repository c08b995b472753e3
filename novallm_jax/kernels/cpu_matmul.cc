// y[M, N] = x[M, K] @ W for float32 on CPU, W packed as panels [N / 16, K, 16].
//
// Why: XLA:CPU's small-M float32 dots (decode steps of 1..64 rows) run at a fraction of the machine's FMA throughput
// (~30-70 GFLOP/s on 2 Zen3 cores), and a [K, N] row-major weight read 16 columns at a time is a strided stream.
// A panel-major weight is one contiguous stream per 16 output columns, held in L1/L2 while every 6-row tile of x
// passes over it: each weight byte comes from DRAM once per call whatever M is.
//
// Compiled on the user's machine with -march=native (see native.py), so GCC vector extensions become AVX2/AVX-512
// or NEON as the CPU allows. Panels are split across XLA's intra-op thread pool.

#include <algorithm>
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

// Work shared between the calling thread and pool tasks; a task that starts after the work is done exits at once.
struct Job {
  const float* x; const float* w; float* y;
  int64_t M, K, N, panels, chunk;
  std::atomic<int64_t> next{0}, done{0};

  void Work() {
    for (int64_t start; (start = next.fetch_add(chunk)) < panels;) {
      const int64_t end = std::min(start + chunk, panels);
      for (int64_t p = start; p < end; ++p) Panel(x, M, K, w + p * K * kPanel, y + p * kPanel, N);
      done.fetch_add(end - start, std::memory_order_release);
    }
  }
};

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel || wd[1] != xd[1]) {
    return ffi::Error::InvalidArgument("packed_matmul wants x [M, K] and w [N / 16, K, 16]");
  }
  auto job = std::make_shared<Job>();
  job->x = x.typed_data(); job->w = w.typed_data(); job->y = y->typed_data();
  job->M = xd[0]; job->K = xd[1]; job->panels = wd[0]; job->N = wd[0] * kPanel;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), job->panels));
  // A few chunks per thread balance the load without much contention on the counter.
  job->chunk = std::max<int64_t>(1, job->panels / (4 * threads));
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->panels) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NovallmPackedMatmulF32, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
