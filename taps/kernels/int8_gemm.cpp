// Weight-only int8 matmul for x86 CPUs with AVX2 + FMA.
//
// y[r, n] = scale[n] * sum_k x[r, k] * q[n, k]     x: float32 [R, K], q: int8, y: float32 [R, N]
//
// Weights are packed once as [N/8][K][8]: for a block of 8 output channels, the 8 int8 weights of
// column k are adjacent, so one 8-byte load and one widening (int8 -> int32 -> float32) give a
// register of 8 weights, used by one FMA per row with x[r, k] broadcast.
//
// Register tiles: RT rows x CT channel blocks of accumulators (1 x 8, 2 x 4, 3 x 3, 4 x 3), each a
// single FMA chain over k = 0, 1, ..., K-1. A widened weight register serves RT rows and a broadcast
// x serves CT blocks, so many rows cost far less per row than one (a 4 x 3 tile makes 12 FMAs per 3
// weight widenings and 4 broadcasts); one row keeps 8 independent chains in flight to hide the FMA
// latency and streams the weights from memory once. Past 4 rows each 4-row tile widens the weights
// again, from cache: measured faster here than widening once into a float buffer (which leaves L1).
// Rows are taken in chunks of kRowChunk.
//
// Batch invariance: every output element is the same chain (the same FMAs in the same order, then
// one multiply by its scale) whatever the tile, the row count, the chunking or the thread split
// (threads split the channel tiles). A row's result is bit-identical alone or batched.

#include "kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace taps {
namespace {

constexpr int64_t kRowChunk = 32;

inline __m256 widen(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// RT rows x CT blocks; w points at the first block, blocks K * 8 bytes apart.
template <int RT, int CT>
inline void tile(const float* x, int64_t ldx, int64_t K, const int8_t* w, const float* scale, float* y,
                 int64_t ldy) {
  __m256 acc[RT][CT];
  #pragma GCC unroll 16
  for (int r = 0; r < RT; ++r)
    #pragma GCC unroll 16
    for (int c = 0; c < CT; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t bstride = K * kBlock;
  for (int64_t k = 0; k < K; ++k) {
    __m256 wv[CT];
    #pragma GCC unroll 16
    for (int c = 0; c < CT; ++c) wv[c] = widen(w + c * bstride + k * kBlock);
    #pragma GCC unroll 16
    for (int r = 0; r < RT; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
      #pragma GCC unroll 16
      for (int c = 0; c < CT; ++c) acc[r][c] = _mm256_fmadd_ps(xb, wv[c], acc[r][c]);
    }
  }
  #pragma GCC unroll 16
  for (int c = 0; c < CT; ++c) {
    const __m256 s = _mm256_loadu_ps(scale + c * kBlock);
    #pragma GCC unroll 16
    for (int r = 0; r < RT; ++r) _mm256_storeu_ps(y + r * ldy + c * kBlock, _mm256_mul_ps(acc[r][c], s));
  }
}

// Rows [0, RT) of channel blocks [b0, b1): full tiles of CT blocks, then single blocks.
template <int RT, int CT>
void row_tile(const float* x, int64_t ldx, int64_t K, const int8_t* w, const float* scale, float* y,
              int64_t ldy, int64_t b0, int64_t b1) {
  int64_t b = b0;
  for (; b + CT <= b1; b += CT)
    tile<RT, CT>(x, ldx, K, w + b * K * kBlock, scale + b * kBlock, y + b * kBlock, ldy);
  for (; b < b1; ++b) tile<RT, 1>(x, ldx, K, w + b * K * kBlock, scale + b * kBlock, y + b * kBlock, ldy);
}

void rows(int64_t rt, const float* x, int64_t ldx, int64_t K, const int8_t* w, const float* scale, float* y,
          int64_t ldy, int64_t b0, int64_t b1) {
  switch (rt) {
    case 1: row_tile<1, 8>(x, ldx, K, w, scale, y, ldy, b0, b1); break;
    case 2: row_tile<2, 4>(x, ldx, K, w, scale, y, ldy, b0, b1); break;
    case 3: row_tile<3, 3>(x, ldx, K, w, scale, y, ldy, b0, b1); break;
    default: row_tile<4, 3>(x, ldx, K, w, scale, y, ldy, b0, b1); break;
  }
}

}  // namespace

void int8_matmul(const float* x, int64_t ldx, int64_t R, int64_t K, const int8_t* w, const float* scale,
                 int64_t NB, float* y, int64_t ldy) {
  // grain: 24 channel blocks (192 outputs, a multiple of every tile width) per task
  for (int64_t r0 = 0; r0 < R; r0 += kRowChunk) {
    const int64_t rn = std::min(kRowChunk, R - r0);
    const float* xr = x + r0 * ldx;
    float* yr = y + r0 * ldy;
    // passes of at most 4 rows, balanced (5 rows: 3 + 2, not 4 + 1: a 1-row pass widens as much as a
    // 4-row one)
    const int64_t passes = (rn + 3) / 4, rt = (rn + passes - 1) / passes;
    at::parallel_for(0, NB, 24, [&](int64_t b0, int64_t b1) {
      for (int64_t r = 0; r < rn; r += rt)
        rows(std::min<int64_t>(rt, rn - r), xr + r * ldx, ldx, K, w, scale, yr + r * ldy, ldy, b0, b1);
    });
  }
}

// q: int8 [N, K] (N a multiple of 8) -> packed int8 [N/8, K, 8]
torch::Tensor pack(torch::Tensor q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8, "pack: int8 [N, K] expected");
  TORCH_CHECK(q.size(0) % kBlock == 0, "pack: N must be a multiple of 8, got ", q.size(0));
  return q.view({q.size(0) / kBlock, kBlock, q.size(1)}).transpose(1, 2).contiguous();
}

// x: float32 [R, K]; packed: int8 [N/8, K, 8]; scale: float32 [N] -> float32 [R, N]
torch::Tensor mm(torch::Tensor x, torch::Tensor packed, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "mm: x must be float32 [R, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kInt8 && packed.size(2) == kBlock &&
                  packed.is_contiguous(), "mm: packed must be contiguous int8 [N/8, K, 8]");
  TORCH_CHECK(packed.size(1) == x.size(1), "mm: x has ", x.size(1), " columns, weights ", packed.size(1));
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() &&
                  scale.numel() == packed.size(0) * kBlock, "mm: scale must be contiguous float32 [N]");
  x = x.contiguous();
  const int64_t R = x.size(0), K = x.size(1), NB = packed.size(0);
  auto y = torch::empty({R, NB * kBlock}, x.options());
  int8_matmul(x.data_ptr<float>(), K, R, K, packed.data_ptr<int8_t>(), scale.data_ptr<float>(), NB,
              y.data_ptr<float>(), NB * kBlock);
  return y;
}

}  // namespace taps
