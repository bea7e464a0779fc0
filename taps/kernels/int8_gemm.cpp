// Weight-only int8 matmul for small row counts on x86 CPUs with AVX2 + FMA.
//
// y[r, n] = scale[n] * sum_k x[r, k] * q[n, k]     x: float32 [R, K], q: int8, y: float32 [R, N]
//
// Weights are packed once as [N/8][K][8]: for a block of 8 output channels, the 8 int8 weights of
// column k are adjacent, so one 8-byte load, one widening (int8 -> int32 -> float32) and then one
// FMA per row (with x[r, k] broadcast) advance 8 outputs of every row. Every weight byte is read
// from memory once per call whatever the row count (a tree of 8 nodes streams the weights once,
// like one token; further passes over a block of rows read it from L1/L2): a small tree costs
// little more than one token when the weights do not fit the caches, which is what speculative
// decoding needs from the verifier.
//
// Threads split the output channels (at::parallel_for over channel blocks); a row's sums always run
// over k in the same order whatever the row count or thread count, so each output row is
// bit-identical whether it is computed alone or batched with other rows (batch invariance).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kBlock = 8;  // output channels per packed block (one AVX2 register of floats)

constexpr int64_t kChunk = 64;  // columns widened to float32 at a time: 64 x 8 floats = 2 KB, in L1
constexpr int kRows = 3;        // rows per pass over a chunk: 12 accumulators + 1 broadcast register

// Widen columns [k0, k0 + n) of one channel block (int8 [K][8]) to float32 [n][8].
inline void widen(const int8_t* wb, int64_t k0, int64_t n, float* wf) {
  for (int64_t k = 0; k < n; ++k) {
    __m128i w8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + (k0 + k) * kBlock));
    _mm256_storeu_ps(wf + k * kBlock, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w8)));
  }
}

// RB rows over n widened columns starting at column k0. Each row keeps four accumulators in
// acc[r][4][8] (columns with k % 4 == 0, 1, 2, 3): four independent FMA chains per row hide the FMA
// latency even for one row, and every row's arithmetic is the same sequence whatever RB, the row
// count or the chunking (loads and stores of a float are exact): batch invariance.
template <int RB>
void rows_chunk(const float* x, int64_t ldx, int64_t k0, int64_t n, const float* wf, float* acc) {
  __m256 a[RB][4];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = _mm256_loadu_ps(acc + (r * 4 + j) * kBlock);
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int j = 0; j < 4; ++j) {
      __m256 w = _mm256_loadu_ps(wf + (k + j) * kBlock);
      for (int r = 0; r < RB; ++r)
        a[r][j] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * ldx + k0 + k + j), w, a[r][j]);
    }
  for (; k < n; ++k) {  // leftover columns (K % 4) into the first accumulator, for every RB alike
    __m256 w = _mm256_loadu_ps(wf + k * kBlock);
    for (int r = 0; r < RB; ++r) a[r][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * ldx + k0 + k), w, a[r][0]);
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(acc + (r * 4 + j) * kBlock, a[r][j]);
}

void rows_dispatch(int rb, const float* x, int64_t ldx, int64_t k0, int64_t n, const float* wf, float* acc) {
  switch (rb) {
    case 1: rows_chunk<1>(x, ldx, k0, n, wf, acc); break;
    case 2: rows_chunk<2>(x, ldx, k0, n, wf, acc); break;
    default: rows_chunk<3>(x, ldx, k0, n, wf, acc); break;
  }
}

// Up to kRows rows of one channel block in one pass, the weights widened in registers (no buffer):
// the cheapest path for a token or a tiny tree. The same FMA sequence per row as rows_chunk over
// widened chunks (columns k % 4 == j into accumulator j, leftover columns into accumulator 0), so
// a row gets the same bits on either path.
template <int RB>
void block_direct(const float* x, int64_t K, const int8_t* wb, const float* scale, float* y, int64_t ldy) {
  __m256 a[RB][4];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    __m256i w32 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + k * kBlock));
    __m128i lo = _mm256_castsi256_si128(w32), hi = _mm256_extracti128_si256(w32, 1);
    __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    for (int r = 0; r < RB; ++r) a[r][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * K + k), w, a[r][0]);
    w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    for (int r = 0; r < RB; ++r) a[r][1] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * K + k + 1), w, a[r][1]);
    w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    for (int r = 0; r < RB; ++r) a[r][2] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * K + k + 2), w, a[r][2]);
    w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
    for (int r = 0; r < RB; ++r) a[r][3] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * K + k + 3), w, a[r][3]);
  }
  for (; k < K; ++k) {
    __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + k * kBlock))));
    for (int r = 0; r < RB; ++r) a[r][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * K + k), w, a[r][0]);
  }
  __m256 s = _mm256_loadu_ps(scale);
  for (int r = 0; r < RB; ++r) {
    __m256 sum = _mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]), _mm256_add_ps(a[r][2], a[r][3]));
    _mm256_storeu_ps(y + r * ldy, _mm256_mul_ps(sum, s));
  }
}

// One channel block for all R rows: each 64-column chunk of its weights is widened once and read
// from L1 by every pass of up to 3 rows; then y = ((a0 + a1) + (a2 + a3)) * scale.
void block(const float* x, int64_t R, int64_t K, const int8_t* wb, const float* scale, float* y, int64_t ldy,
           float* wf, float* acc) {
  std::fill(acc, acc + R * 4 * kBlock, 0.0f);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t n = std::min(kChunk, K - k0);
    widen(wb, k0, n, wf);
    for (int64_t r0 = 0; r0 < R; r0 += kRows)
      rows_dispatch(static_cast<int>(std::min<int64_t>(kRows, R - r0)), x + r0 * K, K, k0, n, wf,
                    acc + r0 * 4 * kBlock);
  }
  __m256 s = _mm256_loadu_ps(scale);
  for (int64_t r = 0; r < R; ++r) {
    const float* a = acc + r * 4 * kBlock;
    __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(a + kBlock)),
                               _mm256_add_ps(_mm256_loadu_ps(a + 2 * kBlock), _mm256_loadu_ps(a + 3 * kBlock)));
    _mm256_storeu_ps(y + r * ldy, _mm256_mul_ps(sum, s));
  }
}

}  // namespace

// q: int8 [N, K] (N a multiple of 8) -> packed int8 [N/8, K, 8]
torch::Tensor pack(torch::Tensor q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8, "pack: int8 [N, K] expected");
  TORCH_CHECK(q.size(0) % kBlock == 0, "pack: N must be a multiple of 8, got ", q.size(0));
  return q.view({q.size(0) / kBlock, kBlock, q.size(1)}).transpose(1, 2).contiguous();
}

// x: float32 [R, K]; packed: int8 [N/8, K, 8]; scale: float32 [N] -> float32 [R, N]
torch::Tensor mm(torch::Tensor x, torch::Tensor packed, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "mm: x must be float32 [R, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kInt8 && packed.size(2) == kBlock,
              "mm: packed must be int8 [N/8, K, 8]");
  TORCH_CHECK(packed.size(1) == x.size(1), "mm: x has ", x.size(1), " columns, weights ", packed.size(1));
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.numel() == packed.size(0) * kBlock,
              "mm: scale must be float32 [N]");
  x = x.contiguous();
  const int64_t R = x.size(0), K = x.size(1), NB = packed.size(0), N = NB * kBlock;
  auto y = torch::empty({R, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // grain: at least 16 channel blocks (128 outputs) per task
  at::parallel_for(0, NB, 16, [&](int64_t b0, int64_t b1) {
    std::vector<float> wf(R > kRows ? kChunk * kBlock : 0), acc(R > kRows ? R * 4 * kBlock : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* wb = wp + b * K * kBlock;
      if (R == 1) block_direct<1>(xp, K, wb, sp + b * kBlock, yp + b * kBlock, N);
      else if (R == 2) block_direct<2>(xp, K, wb, sp + b * kBlock, yp + b * kBlock, N);
      else if (R == 3) block_direct<3>(xp, K, wb, sp + b * kBlock, yp + b * kBlock, N);
      else block(xp, R, K, wb, sp + b * kBlock, yp + b * kBlock, N, wf.data(), acc.data());
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "int8 [N, K] -> [N/8, K, 8]");
  m.def("mm", &mm, "float32 [R, K] x packed int8 weights -> float32 [R, N]");
}
