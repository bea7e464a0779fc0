// Shared declarations of this project's CPU kernels (one extension module: int8_gemm.cpp, w8a8_gemm.cpp,
// decoder.cpp).
#pragma once

#include <torch/extension.h>

namespace taps {

constexpr int64_t kBlock = 8;  // output channels per packed weight block (one AVX2 register of floats)

// y[r, n] = scale[n] * sum_k x[r, k] * w[n, k] for r < R, n < NB * 8; x float32 rows of stride ldx,
// w packed int8 [NB][K][8], y float32 rows of stride ldy. Parallel over output channels.
void int8_matmul(const float* x, int64_t ldx, int64_t R, int64_t K, const int8_t* w, const float* scale,
                 int64_t NB, float* y, int64_t ldy);

// The same product with int8 activations (w8a8_gemm.cpp): x quantised per row in blocks of 32, integer
// dot products; w packed int8 [NB][K/4][8][4], K a multiple of 32.
void w8a8_matmul(const float* x, int64_t ldx, int64_t R, int64_t K, const int8_t* w, const float* scale,
                 int64_t NB, float* y, int64_t ldy);

torch::Tensor pack(torch::Tensor q);
torch::Tensor mm(torch::Tensor x, torch::Tensor packed, torch::Tensor scale);
torch::Tensor pack_w8a8(torch::Tensor q);
torch::Tensor mm_w8a8(torch::Tensor x, torch::Tensor packed, torch::Tensor scale);

}  // namespace taps
