// A Llama decoder stack for one forward over the rows of many requests, in one C++ call: RMSNorm,
// fused q/k/v, rotary embedding, the KV cache writes, grouped-query attention under each request's
// own mask, o_proj, RMSNorm, fused gate/up, SiLU, down_proj and both residual adds, with the int8
// matmul of int8_gemm.cpp for every projection. It computes what taps.models.llama's eager
// `forward_segments` computes over PackedInt8Linear weights, without ~25 eager ops per layer: at
// one row that overhead was more than half of the forward (docs/performance.md).
//
// Batch invariance: every step is per row (norms, rope, SiLU, the matmul) or per (row, head) over
// that request's own cache (attention), in a fixed order, so a row's numbers do not depend on which
// other rows share the call or on the thread count; attention runs over the row's visible keys
// only, gathered in order, so neither do they depend on the masked keys (a tree's other branches). Softmax and SiLU use one AVX2 exp (exp256),
// within 2 ulp of expf; the engine is defined by these kernels (a target model of its own).

#include "kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace taps {
namespace {

// e^x for float32 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial,
// 2^n through the exponent bits. Inputs below -87.3 give 0, above 88 are clamped to e^88.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)), H a multiple of 8
void rms_norm(const float* x, int64_t R, int64_t H, const float* w, float eps, float* y) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * H;
    __m256 ss = _mm256_setzero_ps();
    for (int64_t i = 0; i < H; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      ss = _mm256_fmadd_ps(v, v, ss);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / std::sqrt(hsum(ss) / H + eps));
    for (int64_t i = 0; i < H; i += 8)
      _mm256_storeu_ps(y + r * H + i, _mm256_mul_ps(_mm256_loadu_ps(w + i),
                                                    _mm256_mul_ps(_mm256_loadu_ps(xr + i), inv)));
  }
}

// rotate-half rotary embedding of `heads` heads of dimension D in place: x * cos + rotate_half(x) * sin
void rope(float* x, int64_t heads, int64_t D, const float* cos, const float* sin) {
  const int64_t h2 = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * D;
    for (int64_t i = 0; i < h2; i += 8) {
      const __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + h2 + i);
      _mm256_storeu_ps(v + i, _mm256_fnmadd_ps(b, _mm256_loadu_ps(sin + i), _mm256_mul_ps(a, _mm256_loadu_ps(cos + i))));
      _mm256_storeu_ps(v + h2 + i,
                       _mm256_fmadd_ps(a, _mm256_loadu_ps(sin + h2 + i), _mm256_mul_ps(b, _mm256_loadu_ps(cos + h2 + i))));
    }
  }
}

// q . K[j] for N keys (1 to 4) at once, key j at k[j]: one FMA chain per key over D (a multiple of 8),
// so a key's score is the same whichever group it is computed in
template <int N>
inline void dots(const float* q, const float* const* k, int64_t D, float* out) {
  __m256 s[N];
  const __m256 q0 = _mm256_loadu_ps(q);
  #pragma GCC unroll 16
  for (int j = 0; j < N; ++j) s[j] = _mm256_mul_ps(q0, _mm256_loadu_ps(k[j]));
  for (int64_t i = 8; i < D; i += 8) {
    const __m256 qi = _mm256_loadu_ps(q + i);
    #pragma GCC unroll 16
    for (int j = 0; j < N; ++j) s[j] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k[j] + i), s[j]);
  }
  #pragma GCC unroll 16
  for (int j = 0; j < N; ++j) out[j] = hsum(s[j]);
}

struct Seg {
  float* k;  // this layer's key cache [nkv, S, D]
  float* v;
  int64_t row, rows, base, slots;  // slots: the cache's S
  const bool* mask;                // [rows, base + rows]
};

// out[0, 8 NC) = inv * sum_t p[t] V[idx[t], 0, 8 NC): NC registers, one FMA chain each over the keys
template <int NC>
inline void weigh(const float* p, const float* V, const int64_t* idx, int64_t n, int64_t D, __m256 inv, float* out) {
  __m256 o[NC];
  #pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) o[c] = _mm256_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const __m256 pt = _mm256_set1_ps(p[t]);
    const float* v = V + idx[t] * D;
    #pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) o[c] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + c * 8), o[c]);
  }
  #pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) _mm256_storeu_ps(out + c * 8, _mm256_mul_ps(o[c], inv));
}

// softmax(q K^T / sqrt(D)) V for one query row and head over the keys j < n of one kv head where
// mask[j]; D a multiple of 16. The visible keys are gathered first (idx) and everything after runs
// over that list in order, so the result depends only on the visible keys' values and order, not
// on where they sit in the cache or how many masked keys lie between them: a tree node's row equals
// the row of the same token decoded alone after its ancestors (the lossless guarantee across batch
// shapes). `scores` and `idx` are scratch of n entries.
void attend(const float* q, const float* K, const float* V, const bool* mask, int64_t n, int64_t D,
            float scale, float* scores, int64_t* idx, float* out) {
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j)
    if (mask[j]) idx[m++] = j;
  if (m == 0) {
    std::fill_n(out, D, 0.0f);
    return;
  }
  int64_t t = 0;
  for (; t + 4 <= m; t += 4) {
    const float* k[4] = {K + idx[t] * D, K + idx[t + 1] * D, K + idx[t + 2] * D, K + idx[t + 3] * D};
    dots<4>(q, k, D, scores + t);
  }
  for (; t < m; ++t) {
    const float* k[1] = {K + idx[t] * D};
    dots<1>(q, k, D, scores + t);
  }
  float mx = -std::numeric_limits<float>::infinity();
  for (t = 0; t < m; ++t) {
    scores[t] *= scale;
    mx = std::max(mx, scores[t]);
  }
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (t = 0; t + 8 <= m; t += 8) {
    const __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + t), mv));
    _mm256_storeu_ps(scores + t, p);
    acc = _mm256_add_ps(acc, p);
  }
  float sum = hsum(acc);
  for (; t < m; ++t) {  // the tail through the same exp, one lane
    const float p = _mm256_cvtss_f32(exp256(_mm256_set1_ps(scores[t] - mx)));
    scores[t] = p;
    sum += p;
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (int64_t i0 = 0; i0 < D; i0 += 64) {
    switch (std::min<int64_t>(64, D - i0) / 8) {
      case 2: weigh<2>(scores, V + i0, idx, m, D, inv, out + i0); break;
      case 4: weigh<4>(scores, V + i0, idx, m, D, inv, out + i0); break;
      case 6: weigh<6>(scores, V + i0, idx, m, D, inv, out + i0); break;
      default: weigh<8>(scores, V + i0, idx, m, D, inv, out + i0); break;
    }
  }
}

struct Linear {
  const int8_t* w;
  const float* s;
  int64_t NB, K;
  bool a8;

  // y [R, NB * 8] (row stride ldy) = x [R, K] (row stride ldx) times the weights
  void operator()(const float* x, int64_t ldx, int64_t R, float* y, int64_t ldy) const {
    (a8 ? w8a8_matmul : int8_matmul)(x, ldx, R, K, w, s, NB, y, ldy);
  }
};

Linear linear(const torch::Tensor& packed, const torch::Tensor& scale, int64_t out, int64_t in, const char* name) {
  const bool a8 = packed.dim() == 3 && packed.size(2) == 4 * kBlock;
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kInt8 && packed.is_contiguous() &&
                  packed.size(0) * kBlock == out && packed.size(1) * (a8 ? 4 : 1) == in,
              "Decoder: ", name, " must be packed int8 [", out / kBlock, ", ", in, ", 8] or [", out / kBlock, ", ",
              in / 4, ", 32]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() == out,
              "Decoder: ", name, " scales must be float32 [", out, "]");
  return {packed.data_ptr<int8_t>(), scale.data_ptr<float>(), packed.size(0), in, a8};
}

}  // namespace

// The decoder layers of one model (weights shared with the Python modules, not copied).
class Decoder {
 public:
  // layers: per layer [input_norm, qkv_packed, qkv_scale, o_packed, o_scale, post_norm, gate_up_packed,
  // gate_up_scale, down_packed, down_scale]
  Decoder(std::vector<std::vector<torch::Tensor>> layers, int64_t nh, int64_t nkv, int64_t D, double eps)
      : weights_(std::move(layers)), nh_(nh), nkv_(nkv), D_(D), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(!weights_.empty(), "Decoder: no layers");
    for (auto& l : weights_) TORCH_CHECK(l.size() == 10, "Decoder: 10 tensors per layer");
    TORCH_CHECK(D % 16 == 0 && nh % nkv == 0, "Decoder: head dim must be a multiple of 16, heads of kv heads");
    H_ = weights_[0][0].numel();
    TORCH_CHECK(H_ % 8 == 0, "Decoder: hidden size must be a multiple of 8");
    I_ = weights_[0][6].size(0) * kBlock / 2;  // (gate_up: 2 * I output channels in either layout)
    TORCH_CHECK(I_ % 8 == 0, "Decoder: intermediate size must be a multiple of 8");
    for (auto& l : weights_) {
      for (int i : {0, 5})
        TORCH_CHECK(l[i].scalar_type() == torch::kFloat && l[i].is_contiguous() && l[i].numel() == H_,
                    "Decoder: norm weights must be float32 [", H_, "]");
      layers_.push_back({l[0].data_ptr<float>(), linear(l[1], l[2], (nh + 2 * nkv) * D, H_, "qkv"),
                         linear(l[3], l[4], H_, nh * D, "o_proj"), l[5].data_ptr<float>(),
                         linear(l[6], l[7], 2 * I_, H_, "gate_up"), linear(l[8], l[9], H_, I_, "down_proj")});
    }
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x: float32 [R, H], updated in place through every layer (returned); cos, sin: float32 [R, D].
  // Segment i owns rows [row[i], row[i] + rows[i]) and extends caches k[i], v[i] (float32, [L, nkv, S, D]
  // with any leading 1-dims) at slot base[i]; mask[i]: bool [rows, base + rows] (leading 1-dims allowed).
  // Rows in no segment (padding) go through the projections and attend to nothing.
  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> k,
                        std::vector<torch::Tensor> v, std::vector<int64_t> row, std::vector<int64_t> rows,
                        std::vector<int64_t> base, std::vector<torch::Tensor> mask) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == H_ && x.scalar_type() == torch::kFloat && x.is_contiguous(),
                "Decoder.forward: x must be contiguous float32 [R, ", H_, "]");
    const int64_t R = x.size(0), D = D_, L = num_layers();
    cos = cos.contiguous();
    sin = sin.contiguous();
    TORCH_CHECK(cos.scalar_type() == torch::kFloat && cos.numel() == R * D && sin.scalar_type() == torch::kFloat &&
                    sin.numel() == R * D, "Decoder.forward: cos, sin must be float32 [R, D]");
    const size_t n = k.size();
    TORCH_CHECK(v.size() == n && row.size() == n && rows.size() == n && base.size() == n && mask.size() == n,
                "Decoder.forward: one k, v, row, rows, base, mask per segment");
    std::vector<int64_t> seg_of(R, -1);
    for (size_t i = 0; i < n; ++i) {
      mask[i] = mask[i].contiguous();
      for (const auto* t : {&k[i], &v[i]})
        TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->dim() >= 4 &&
                        t->numel() == L * nkv_ * t->size(-2) * D && t->size(-1) == D,
                    "Decoder.forward: caches must be contiguous float32 [L, nkv, S, D]");
      TORCH_CHECK(row[i] >= 0 && rows[i] >= 0 && row[i] + rows[i] <= R && base[i] >= 0 &&
                      base[i] + rows[i] <= k[i].size(-2), "Decoder.forward: segment ", i, " out of range");
      TORCH_CHECK(mask[i].scalar_type() == torch::kBool && mask[i].numel() == rows[i] * (base[i] + rows[i]),
                  "Decoder.forward: mask ", i, " must be bool [rows, base + rows]");
      for (int64_t r = row[i]; r < row[i] + rows[i]; ++r) {
        TORCH_CHECK(seg_of[r] < 0, "Decoder.forward: row ", r, " in two segments");
        seg_of[r] = static_cast<int64_t>(i);
      }
    }
    const int64_t QKV = (nh_ + 2 * nkv_) * D, g = nh_ / nkv_;
    auto opt = x.options();
    auto xn_t = torch::empty({R, H_}, opt), qkv_t = torch::empty({R, QKV}, opt);
    auto att_t = torch::zeros({R, nh_ * D}, opt), tmp_t = torch::empty({R, H_}, opt);
    auto gu_t = torch::empty({R, 2 * I_}, opt), act_t = torch::empty({R, I_}, opt);
    float *xp = x.data_ptr<float>(), *xn = xn_t.data_ptr<float>(), *qkv = qkv_t.data_ptr<float>();
    float *att = att_t.data_ptr<float>(), *tmp = tmp_t.data_ptr<float>(), *gu = gu_t.data_ptr<float>();
    float* act = act_t.data_ptr<float>();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    int64_t max_keys = 1;
    for (size_t i = 0; i < n; ++i) max_keys = std::max(max_keys, base[i] + rows[i]);
    std::vector<int64_t> work;  // (row, head) pairs of rows in a segment
    for (int64_t r = 0; r < R; ++r)
      if (seg_of[r] >= 0)
        for (int64_t h = 0; h < nh_; ++h) work.push_back(r * nh_ + h);

    for (int64_t l = 0; l < L; ++l) {
      const Layer& w = layers_[l];
      rms_norm(xp, R, H_, w.ln1, eps_, xn);
      w.qkv(xn, H_, R, qkv, QKV);
      std::vector<Seg> segs(n);
      for (size_t i = 0; i < n; ++i) {
        const int64_t S = k[i].size(-2);
        segs[i] = {k[i].data_ptr<float>() + l * nkv_ * S * D, v[i].data_ptr<float>() + l * nkv_ * S * D,
                   row[i], rows[i], base[i], S, mask[i].data_ptr<bool>()};
      }
      for (int64_t r = 0; r < R; ++r) {  // rope on q and k, then k and v into the request's cache
        float* q = qkv + r * QKV;
        rope(q, nh_ + nkv_, D, cp + r * D, sp + r * D);
        if (seg_of[r] < 0) continue;
        const Seg& s = segs[seg_of[r]];
        const int64_t slot = s.base + (r - s.row);
        for (int64_t h = 0; h < nkv_; ++h) {
          std::copy_n(q + (nh_ + h) * D, D, s.k + (h * s.slots + slot) * D);
          std::copy_n(q + (nh_ + nkv_ + h) * D, D, s.v + (h * s.slots + slot) * D);
        }
      }
      const int64_t items = static_cast<int64_t>(work.size());
      at::parallel_for(0, items, std::max<int64_t>(1, 16384 / (max_keys * D)), [&](int64_t a, int64_t b) {
        std::vector<float> scores(max_keys);
        std::vector<int64_t> idx(max_keys);
        for (int64_t it = a; it < b; ++it) {
          const int64_t r = work[it] / nh_, h = work[it] % nh_;
          const Seg& s = segs[seg_of[r]];
          const int64_t t = r - s.row, keys = s.base + s.rows, kv = h / g;
          attend(qkv + r * QKV + h * D, s.k + kv * s.slots * D, s.v + kv * s.slots * D, s.mask + t * keys, keys, D,
                 scale, scores.data(), idx.data(), att + r * nh_ * D + h * D);
        }
      });
      w.o(att, nh_ * D, R, tmp, H_);
      for (int64_t i = 0; i < R * H_; i += 8)
        _mm256_storeu_ps(xp + i, _mm256_add_ps(_mm256_loadu_ps(xp + i), _mm256_loadu_ps(tmp + i)));
      rms_norm(xp, R, H_, w.ln2, eps_, xn);
      w.gu(xn, H_, R, gu, 2 * I_);
      for (int64_t r = 0; r < R; ++r) {  // silu(gate) * up
        const float* gr = gu + r * 2 * I_;
        for (int64_t i = 0; i < I_; i += 8) {
          const __m256 gv = _mm256_loadu_ps(gr + i);
          const __m256 sg = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f),
                                                            exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
          _mm256_storeu_ps(act + r * I_ + i, _mm256_mul_ps(sg, _mm256_loadu_ps(gr + I_ + i)));
        }
      }
      w.down(act, I_, R, tmp, H_);
      for (int64_t i = 0; i < R * H_; i += 8)
        _mm256_storeu_ps(xp + i, _mm256_add_ps(_mm256_loadu_ps(xp + i), _mm256_loadu_ps(tmp + i)));
    }
    return x;
  }

 private:
  struct Layer {
    const float* ln1;
    Linear qkv, o;
    const float* ln2;
    Linear gu, down;
  };
  std::vector<std::vector<torch::Tensor>> weights_;  // keeps the tensors behind layers_' pointers alive
  std::vector<Layer> layers_;
  int64_t nh_, nkv_, D_, H_ = 0, I_ = 0;
  float eps_;
};

}  // namespace taps

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &taps::pack, "int8 [N, K] -> [N/8, K, 8]");
  m.def("mm", &taps::mm, "float32 [R, K] x packed int8 weights -> float32 [R, N]");
  m.def("pack_w8a8", &taps::pack_w8a8, "int8 [N, K] -> [N/8, K/4, 32]");
  m.def("mm_w8a8", &taps::mm_w8a8, "float32 [R, K] (quantised to int8 per 32 values) x packed int8 weights -> "
        "float32 [R, N]");
  pybind11::class_<taps::Decoder>(m, "Decoder")
      .def(pybind11::init<std::vector<std::vector<torch::Tensor>>, int64_t, int64_t, int64_t, double>())
      .def_property_readonly("num_layers", &taps::Decoder::num_layers)
      .def("forward", &taps::Decoder::forward);
}
