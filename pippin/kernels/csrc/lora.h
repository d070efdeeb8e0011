// Per-row LoRA slots: the down / up halves (shared by lora_add_ and the fused step) and lora_add_ (lora.cpp).
#pragma once

#include "common.h"

namespace pippin {

// One projection's LoRA slots: A (S, r, K) and B (S, N, r) fp16 with contiguous rows per slot (slot strides sA, sB:
// views into the model's LoraBank) and per-slot scales (S,) fp32; slot 0 is "no adapter" (scale 0).
struct StepLora {
  const c10::Half* A = nullptr;
  const c10::Half* B = nullptr;
  const float* scale = nullptr;
  int64_t S = 0, r = 0, sA = 0, sB = 0;
};

// h[u] for units u in [u0, u1) of M * r: h[m * r + i] = A[s_m][i] . x_m (0 for rows whose slot has scale 0).
inline void lora_down(const StepLora& lo, const int64_t* slot, const float* x, int64_t K, float* h, int64_t u0, int64_t u1) {
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t m = u / lo.r, i = u % lo.r, s = slot[m];
    if (lo.scale[s] == 0.0f) {
      h[u] = 0.0f;
      continue;
    }
    const c10::Half* a = lo.A + s * lo.sA + i * K;
    const float* xm = x + m * K;
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(load8(a + k), _mm256_loadu_ps(xm + k), acc);
    float t = hsum(acc);
    for (; k < K; ++k) t += float(a[k]) * xm[k];
    h[u] = t;
  }
}

// y[m, n] += scale[s_m] * B[s_m][n] . h_m for rows n in [n0, n1).
inline void lora_up(const StepLora& lo, const int64_t* slot, const float* h, float* y, int64_t ldy, int64_t M, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m) {
    const int64_t s = slot[m];
    const float sc = lo.scale[s];
    if (sc == 0.0f) continue;
    const float* hm = h + m * lo.r;
    for (int64_t n = n0; n < n1; ++n) {
      const c10::Half* bp = lo.B + s * lo.sB + n * lo.r;
      float t = 0.0f;
      int64_t j = 0;
      if (lo.r % 8 == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (; j < lo.r; j += 8) acc = _mm256_fmadd_ps(load8(bp + j), _mm256_loadu_ps(hm + j), acc);
        t = hsum(acc);
      }
      for (; j < lo.r; ++j) t += float(bp[j]) * hm[j];
      y[m * ldy + n] += sc * t;
    }
  }
}

void lora_add_(at::Tensor y, const at::Tensor& x_in, const at::Tensor& A, const at::Tensor& Bw, const at::Tensor& scale,
               const at::Tensor& idx);

}  // namespace pippin
