// int8 x int8 matmul for x86 CPUs with AVX2: int8 weights and int8 activations, integer dot products.
//
// y[r, n] = scale[n] * sum_b d[r, b] * sum_{k in block b} xq[r, k] * q[n, k]
//
// Activations are quantised per row in blocks of 32 values (d[r, b] = max |x| / 127 over the block,
// xq = x / d rounded to the nearest, ties to even: the Q8_0 activations llama.cpp's CPU backend uses),
// weights per output channel (the same int8 weights as the float-activation kernel, int8_gemm.cpp).
// Each block's integer sum is exact (int32); blocks are added in float, in order.
//
// Weights are packed once as [N/8][K/4][8][4]: one 32-byte load holds 8 output channels x 4 consecutive
// k. The 4 matching activation bytes are broadcast to every channel; `vpmaddubsw` multiplies the
// unsigned |xq| by the weight with xq's sign moved onto it (`vpsignb`; both |.| <= 127, so a pair sum
// never saturates int16) and `vpmaddwd` by ones finishes the 4-term dot product in int32 lanes, one
// per channel: 32 multiply-adds in 4 instructions (sign, maddubs, maddwd, add), where the
// float-activation kernel needs 4 FMAs plus the widening of the weights. So many rows cost little
// more than one: the weights' trip from memory dominates.
//
// Batch invariance: a row's quantisation depends on that row alone, and every output element is the
// same integer sums and the same float chain over blocks whatever the tile, the row count or the
// thread split: a row's result is bit-identical alone or batched.

#include "kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace taps {
namespace {

constexpr int64_t kGroup = 32;     // activation values per scale
constexpr int64_t kRowChunk = 32;  // rows whose quantised activations are built at once

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// 32 floats -> 32 int8 (x * inv rounded to the nearest, ties to even), in order
inline __m256i quant32(const float* x, __m256 inv) {
  const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), inv));
  const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), inv));
  const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16), inv));
  const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 24), inv));
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// rows of x (stride ldx) -> xq (signed), xa (|xq|), d (one scale per 32 values); K a multiple of 32
void quantize_rows(const float* x, int64_t ldx, int64_t R, int64_t K, int8_t* xq, int8_t* xa, float* d) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const int64_t G = K / kGroup;
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const float* p = x + r * ldx + g * kGroup;
      __m256 m = _mm256_and_ps(_mm256_loadu_ps(p), absmask);
      for (int j = 8; j < kGroup; j += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(p + j), absmask));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
      const float amax = _mm_cvtss_f32(h);
      const float scale = amax / 127.0f;
      d[r * G + g] = scale;
      const __m256i q = quant32(p, _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + r * K + g * kGroup), q);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xa + r * K + g * kGroup), _mm256_abs_epi8(q));
    }
  }
}

// RT rows x CT blocks of 8 channels; w points at the first block, blocks K * 8 bytes apart.
template <int RT, int CT>
inline void tile(const int8_t* xq, const int8_t* xa, const float* d, int64_t K, const int8_t* w,
                 const float* scale, float* y, int64_t ldy) {
  const int64_t G = K / kGroup, bstride = K * kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RT][CT];
  #pragma GCC unroll 16
  for (int r = 0; r < RT; ++r)
    #pragma GCC unroll 16
    for (int c = 0; c < CT; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i sum[RT][CT];
    #pragma GCC unroll 16
    for (int r = 0; r < RT; ++r)
      #pragma GCC unroll 16
      for (int c = 0; c < CT; ++c) sum[r][c] = _mm256_setzero_si256();
    #pragma GCC unroll 8
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 4) {
      __m256i wv[CT];
      #pragma GCC unroll 16
      for (int c = 0; c < CT; ++c)
        wv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * bstride + k * kBlock));
      #pragma GCC unroll 16
      for (int r = 0; r < RT; ++r) {
        const __m256i xs = bcast4(xq + r * K + k), xu = bcast4(xa + r * K + k);
        #pragma GCC unroll 16
        for (int c = 0; c < CT; ++c)
          sum[r][c] = _mm256_add_epi32(
              sum[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(xu, _mm256_sign_epi8(wv[c], xs)), ones));
      }
    }
    #pragma GCC unroll 16
    for (int r = 0; r < RT; ++r) {
      const __m256 dv = _mm256_set1_ps(d[r * G + g]);
      #pragma GCC unroll 16
      for (int c = 0; c < CT; ++c) acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r][c]), dv, acc[r][c]);
    }
  }
  #pragma GCC unroll 16
  for (int c = 0; c < CT; ++c) {
    const __m256 s = _mm256_loadu_ps(scale + c * kBlock);
    #pragma GCC unroll 16
    for (int r = 0; r < RT; ++r) _mm256_storeu_ps(y + r * ldy + c * kBlock, _mm256_mul_ps(acc[r][c], s));
  }
}

// the rows [0, rn) against channel blocks [b, b + CT), in passes of RT rows (the blocks' weights stay
// in cache from one pass to the next)
template <int RT, int CT>
void column(const int8_t* xq, const int8_t* xa, const float* d, int64_t rn, int64_t K, const int8_t* w,
            const float* scale, float* y, int64_t ldy) {
  const int64_t G = K / kGroup;
  int64_t r = 0;
  for (; r + RT <= rn; r += RT) tile<RT, CT>(xq + r * K, xa + r * K, d + r * G, K, w, scale, y + r * ldy, ldy);
  for (; r < rn; ++r) tile<1, CT>(xq + r * K, xa + r * K, d + r * G, K, w, scale, y + r * ldy, ldy);
}

template <int RT, int CT>
void blocks(const int8_t* xq, const int8_t* xa, const float* d, int64_t rn, int64_t K, const int8_t* w,
            const float* scale, float* y, int64_t ldy, int64_t b0, int64_t b1) {
  int64_t b = b0;
  for (; b + CT <= b1; b += CT)
    column<RT, CT>(xq, xa, d, rn, K, w + b * K * kBlock, scale + b * kBlock, y + b * kBlock, ldy);
  for (; b < b1; ++b) column<RT, 1>(xq, xa, d, rn, K, w + b * K * kBlock, scale + b * kBlock, y + b * kBlock, ldy);
}

}  // namespace

void w8a8_matmul(const float* x, int64_t ldx, int64_t R, int64_t K, const int8_t* w, const float* scale,
                 int64_t NB, float* y, int64_t ldy) {
  const int64_t G = K / kGroup, rc = std::min(kRowChunk, R);
  std::vector<int8_t> xq(rc * K), xa(rc * K);
  std::vector<float> d(rc * G);
  for (int64_t r0 = 0; r0 < R; r0 += kRowChunk) {
    const int64_t rn = std::min(kRowChunk, R - r0);
    quantize_rows(x + r0 * ldx, ldx, rn, K, xq.data(), xa.data(), d.data());
    float* yr = y + r0 * ldy;
    at::parallel_for(0, NB, 24, [&](int64_t b0, int64_t b1) {
      if (rn == 1)  // (tiles measured on a Zen 3: 1 x 4 for one row, 2 x 3 past it; 4 x 2 and 3 x 2 spill)
        blocks<1, 4>(xq.data(), xa.data(), d.data(), rn, K, w, scale, yr, ldy, b0, b1);
      else
        blocks<2, 3>(xq.data(), xa.data(), d.data(), rn, K, w, scale, yr, ldy, b0, b1);
    });
  }
}

// q: int8 [N, K] (N a multiple of 8, K of 32) -> packed int8 [N/8, K/4, 32]
torch::Tensor pack_w8a8(torch::Tensor q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8, "pack_w8a8: int8 [N, K] expected");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(N % kBlock == 0 && K % kGroup == 0, "pack_w8a8: N must be a multiple of 8 and K of 32, got ", N,
              " x ", K);
  TORCH_CHECK(q.numel() == 0 || q.min().item<int>() >= -127, "pack_w8a8: weights must lie in [-127, 127]");
  return q.contiguous().view({N / kBlock, kBlock, K / 4, 4}).permute({0, 2, 1, 3}).contiguous().view(
      {N / kBlock, K / 4, 4 * kBlock});
}

// x: float32 [R, K]; packed: int8 [N/8, K/4, 32]; scale: float32 [N] -> float32 [R, N]
torch::Tensor mm_w8a8(torch::Tensor x, torch::Tensor packed, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "mm_w8a8: x must be float32 [R, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kInt8 && packed.size(2) == 4 * kBlock &&
                  packed.is_contiguous(), "mm_w8a8: packed must be contiguous int8 [N/8, K/4, 32]");
  TORCH_CHECK(packed.size(1) * 4 == x.size(1), "mm_w8a8: x has ", x.size(1), " columns, weights ",
              packed.size(1) * 4);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() &&
                  scale.numel() == packed.size(0) * kBlock, "mm_w8a8: scale must be contiguous float32 [N]");
  x = x.contiguous();
  const int64_t R = x.size(0), K = x.size(1), NB = packed.size(0);
  auto y = torch::empty({R, NB * kBlock}, x.options());
  if (R) w8a8_matmul(x.data_ptr<float>(), K, R, K, packed.data_ptr<int8_t>(), scale.data_ptr<float>(), NB,
                     y.data_ptr<float>(), NB * kBlock);
  return y;
}

}  // namespace taps
