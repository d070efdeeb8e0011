// Attention over the KV cache (fp32 or int8), the int8 cache store, and RoPE (attention.cpp).
#pragma once

#include "common.h"

namespace pippin {

void rope_(at::Tensor x, const at::Tensor& cos_in, const at::Tensor& sin_in, int64_t n_heads, int64_t head_dim);

inline __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8f(const int8_t* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(v)));
}

// Causal GQA attention of each (row, new token, head) over its cache slots [0, start + t]: keys and values fp32,
// or int8 with one scale per (row, head, slot) (ksc, vsc; the 8-bit KV cache), read as stored: a score is
// scale_k * (q . k8), a value weight p * scale_v. Softmax with a vectorised exp.
// Units [i0, i1) of the B * H * T (row, head, token) attention units; p holds max_start + T floats of scratch.
template <typename KT>
void attend_units(const float* qp, int64_t width, const KT* kc, const KT* vc, const float* ksc, const float* vsc, float* ap,
                  const int64_t* starts, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t S_max, float* p, int64_t i0, int64_t i1) {
  const int64_t rep = H / Hkv;
  const float scale = 1.0f / std::sqrt(float(D));
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / (H * T), hh = (i / T) % H, t = i % T, g = hh / rep, S = starts[b] + t + 1;
    const float* q = qp + (b * T + t) * width + hh * D;
    const KT* kb = kc + (b * Hkv + g) * S_max * D;
    const KT* vb = vc + (b * Hkv + g) * S_max * D;
    const float* ks = ksc ? ksc + (b * Hkv + g) * S_max : nullptr;
    const float* vs = vsc ? vsc + (b * Hkv + g) * S_max : nullptr;
    float mx = -INFINITY;
    for (int64_t j = 0; j < S; ++j) {
      __m256 acc = _mm256_setzero_ps();
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8f(kb + j * D + d), acc);
      float sc = hsum(acc);
      for (; d < D; ++d) sc += q[d] * float(kb[j * D + d]);
      p[j] = sc * scale * (ks ? ks[j] : 1.0f);
      mx = std::max(mx, p[j]);
    }
    float sum = 0;
    int64_t j = 0;
    const __m256 mx8 = _mm256_set1_ps(mx);
    __m256 sum8 = _mm256_setzero_ps();
    for (; j + 8 <= S; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mx8));
      _mm256_storeu_ps(p + j, e);
      sum8 = _mm256_add_ps(sum8, e);
    }
    sum = hsum(sum8);
    for (; j < S; ++j) sum += (p[j] = std::exp(p[j] - mx));
    if (vs)
      for (j = 0; j < S; ++j) p[j] *= vs[j];
    float* out = ap + (b * T + t) * H * D + hh * D;
    const float inv = 1.0f / sum;
    if (D == 64) {  // the common head size: the output row lives in 8 registers
      __m256 o[8];
      for (int r = 0; r < 8; ++r) o[r] = _mm256_setzero_ps();
      for (j = 0; j < S; ++j) {
        const __m256 w = _mm256_set1_ps(p[j]);
        for (int r = 0; r < 8; ++r) o[r] = _mm256_fmadd_ps(w, load8f(vb + j * D + 8 * r), o[r]);
      }
      for (int r = 0; r < 8; ++r) _mm256_storeu_ps(out + 8 * r, _mm256_mul_ps(o[r], _mm256_set1_ps(inv)));
    } else {
      std::fill(out, out + D, 0.0f);
      for (j = 0; j < S; ++j) {
        const float w = p[j] * inv;
        for (int64_t d = 0; d < D; ++d) out[d] += w * float(vb[j * D + d]);
      }
    }
  }
}

template <typename KT>
void attend(const float* qp, int64_t width, const KT* kc, const KT* vc, const float* ksc, const float* vsc, float* ap,
            const std::vector<int64_t>& starts, int64_t max_start, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t S_max) {
  at::parallel_for(0, B * H * T, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(max_start + T);
    attend_units(qp, width, kc, vc, ksc, vsc, ap, starts.data(), T, H, Hkv, D, S_max, p.data(), i0, i1);
  });
}

// One token's key or value vector into an int8 cache slot: absmax scale, round-half-even, exactly as
// pippin.engine.kv_cache.quantize_kv (so the fused block and the module path hold the same cache).
inline void store_kv8(const float* src, int64_t D, int8_t* dst, float* scale) {
  float mx = 0;
  for (int64_t d = 0; d < D; ++d) mx = std::max(mx, std::fabs(src[d]));
  const float s = std::max(mx, 1e-8f) / 127.0f;
  *scale = s;
  for (int64_t d = 0; d < D; ++d) dst[d] = int8_t(std::min(127.0f, std::max(-127.0f, std::nearbyint(src[d] / s))));
}

}  // namespace pippin
