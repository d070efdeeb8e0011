// gemv (dense weights, a few rows), rms_norm, silu_mul and gemv_i8 (int8 rows with per-row scales).
#include "matvec.h"

namespace pippin {

at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "gemv: weight must be a contiguous 2-D tensor");
  TORCH_CHECK(x_in.size(-1) == w.size(1), "gemv: x has ", x_in.size(-1), " features, weight expects ", w.size(1));
  auto x = x_in.reshape({-1, w.size(1)}).to(at::kFloat).contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  auto y = at::empty({M, N}, x.options());
  // Grain: small matrices run on one thread, where waking a second costs more than it saves.
  const int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(K, 1));
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto run = [&](auto* wp) {
    at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) { gemv_rows(xp, wp, yp, M, N, K, a, b); });
  };
  if (w.scalar_type() == at::kFloat) run(w.data_ptr<float>());
  else if (w.scalar_type() == at::kHalf) run(w.data_ptr<c10::Half>());
  else if (w.scalar_type() == at::kBFloat16) run(w.data_ptr<c10::BFloat16>());
  else TORCH_CHECK(false, "gemv: unsupported weight dtype ", w.scalar_type());
  return y.view(sizes);
}
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm: fp32 only");
  auto x = x_in.contiguous();
  const int64_t D = x.size(-1), R = x.numel() / D;
  TORCH_CHECK(weight.numel() == D, "rms_norm: weight size mismatch");
  auto y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const auto w = weight.contiguous();  // kept alive: a temporary's data_ptr would dangle
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm_row(xp + r * D, wp, yp + r * D, D, eps);
  });
  return y;
}

at::Tensor silu_mul(const at::Tensor& g_in, const at::Tensor& u_in) {
  TORCH_CHECK(g_in.sizes() == u_in.sizes(), "silu_mul: shape mismatch");
  auto g = g_in.contiguous().to(at::kFloat), u = u_in.contiguous().to(at::kFloat);
  auto y = at::empty_like(g);
  const float *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, g.numel(), 16384, [&](int64_t a, int64_t b) { silu_mul_range(gp, up, yp, a, b); });
  return y;
}

// Rows of int8 weights with one fp32 scale per row (the 8-bit embedding read as the output head).
at::Tensor gemv_i8(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale_in) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kChar, "gemv_i8: weight must be contiguous int8");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 8 == 0 && x_in.size(-1) == K, "gemv_i8: shape mismatch");
  auto x = x_in.reshape({-1, K}).to(at::kFloat).contiguous();
  auto scale = scale_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  TORCH_CHECK(M <= 16, "gemv_i8: at most 16 rows");
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  auto y = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *sp = scale.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t a, int64_t b) {
    __m256 acc[16];
    for (int64_t n = a; n < b; ++n) {
      const int8_t* row = wp + n * K;
      for (int64_t off = 0; off < K; off += 64) _mm_prefetch(reinterpret_cast<const char*>(row + 8 * K + off), _MM_HINT_T0);  // 8 rows ahead
      if (M == 1) {  // decode: register accumulators
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
          int64_t r0, r1;
          std::memcpy(&r0, row + k, 8);
          std::memcpy(&r1, row + k + 8, 8);
          a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(r0))), _mm256_loadu_ps(xp + k), a0);
          a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(r1))), _mm256_loadu_ps(xp + k + 8), a1);
        }
        if (k < K) {
          int64_t r0;
          std::memcpy(&r0, row + k, 8);
          a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(r0))), _mm256_loadu_ps(xp + k), a0);
        }
        yp[n] = hsum(_mm256_add_ps(a0, a1)) * sp[n];
        continue;
      }
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; k += 8) {
        int64_t raw;
        std::memcpy(&raw, row + k, 8);
        const __m256 w8 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(raw)));
        for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(w8, _mm256_loadu_ps(xp + m * K + k), acc[m]);
      }
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = hsum(acc[m]) * sp[n];
    }
  });
  return y.view(sizes);
}

}  // namespace pippin
