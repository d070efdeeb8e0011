// Dense matvecs (fp32 / fp16 / bf16 weights, int8 rows), RMSNorm and SwiGLU: the row kernel the fused step shares
// and the ops of matvec.cpp.
#pragma once

#include "common.h"

namespace pippin {

// One weight row at a time, so the weights stream linearly through memory (the hardware prefetcher's
// best case); 4 accumulators hide FMA latency; the row stays in L1 while it is reused for all M inputs.
template <typename W>
void gemv_rows(const float* x, const W* w, float* y, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  const int64_t K32 = K - K % 32, K8 = K - K % 8;
  for (int64_t n = n0; n < n1; ++n) {
    const W* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k < K32; k += 32) {
        a0 = _mm256_fmadd_ps(load8(wr + k), _mm256_loadu_ps(xm + k), a0);
        a1 = _mm256_fmadd_ps(load8(wr + k + 8), _mm256_loadu_ps(xm + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8(wr + k + 16), _mm256_loadu_ps(xm + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8(wr + k + 24), _mm256_loadu_ps(xm + k + 24), a3);
      }
      for (; k < K8; k += 8) a0 = _mm256_fmadd_ps(load8(wr + k), _mm256_loadu_ps(xm + k), a0);
      float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (; k < K; ++k) s += float(wr[k]) * xm[k];
      y[m * N + n] = s;
    }
  }
}

at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& w);
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& g_in, const at::Tensor& u_in);
at::Tensor gemv_i8(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale_in);

}  // namespace pippin
