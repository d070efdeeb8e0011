// pippin CPU kernels: the decode-time fast paths (AVX2 + FMA + F16C, threads via at::parallel_for).
//
// gemv:      y (M, N) = x (M, K) @ w (N, K)^T for small M (decode, a few rows), w in fp32 / fp16 / bf16.
//            Memory-bound: each weight row is streamed once and reused for all M rows of x.
// rms_norm:  y = x * rsqrt(mean(x^2) + eps) * w, one pass per row.
// silu_mul:  y = silu(g) * u (the SwiGLU gate).
// lut_gemv:  y = x @ W^T for palettized W (packed indices + per-group LUTs), never materialising W;
//            lut_dequant builds W for the prefill path; lut_gemv_act8 is the 2/3/4-bit (and expanded 6/8-bit) x
//            int8-activation kernel.
// gemv_i8:   int8 rows with per-row scales (the 8-bit embedding read as the output head); gemv_i8_act8 with
//            int8 activations.
// rope_:     rotate-half RoPE in place over the q and k heads of a fused q|k|v row.
// lora_add_: y += scale[s] * (x A[s]^T) B[s]^T per row, with each row's adapter slot s (fp16 A/B stacks):
//            mixed-adapter batches in one call (S-LoRA / punica's gathered LoRA, for a few rows).
// decode_block: a whole decoder block for a few tokens (decode), built from the above, over an fp32 or int8 KV cache.
// DecodePlan: every block of a model for one decode step in one call, from per-layer arguments kept in C++; with one
//            token per row, all layers run in a single OpenMP region with barriers between phases (fused_step).
// Each has a slow reference in Python (F.linear, F.rms_norm, F.silu) and a test that they agree.
// Decode streams every weight from DRAM once per token, so the matvecs prefetch a few rows ahead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <string>
#include <thread>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// Load 8 weights as fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

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

// exp(x) for 8 floats: 2^n * p(r) with n = round(x / ln 2) and Cephes' degree-6 polynomial for exp(r), |r| <= ln2 / 2
// (about 2 ulp). The scalar std::exp cost more than the matvecs around it in the SwiGLU of a decode step.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline void rms_norm_row(const float* xr, const float* wp, float* yr, int64_t D, double eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(xr + i), acc);
  double ss = hsum(acc);
  for (; i < D; ++i) ss += double(xr[i]) * xr[i];
  const float inv = 1.0f / std::sqrt(float(ss / D) + float(eps));
  const __m256 inv8 = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= D; i += 8) _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), inv8), _mm256_loadu_ps(wp + i)));
  for (; i < D; ++i) yr[i] = xr[i] * inv * wp[i];
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

// y[i] = silu(g[i]) * u[i] for i in [a, b).
inline void silu_mul_range(const float* gp, const float* up, float* yp, int64_t a, int64_t b) {
  int64_t i = a;
  const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
  for (; i + 8 <= b; i += 8) {
    const __m256 gv = _mm256_loadu_ps(gp + i);
    const __m256 sig = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_xor_ps(gv, neg))));
    _mm256_storeu_ps(yp + i, _mm256_mul_ps(sig, _mm256_loadu_ps(up + i)));
  }
  for (; i < b; ++i) yp[i] = gp[i] / (1.0f + std::exp(-gp[i])) * up[i];
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


// ---- palettized weights -------------------------------------------------------------------------
// packed (N, K*BITS/8): a little-endian bitstream of LUT indices per row (see pippin/quant/pack.py);
// lut (N / group, 2^BITS) fp32. y (M, N) = x (M, K) @ W^T where W[n, k] = lut[n / group][idx(n, k)].
// The dense matrix is never materialised: 8 indices are decoded into a vector register, looked up with
// in-register permutes (<= 16 entries) or a gather (64 / 256 entries), and FMA'd for each of the M rows.
template <int BITS>
inline __m256 lut_lookup8(const uint8_t* p, const float* lut, __m256 l0, __m256 l1, bool full = false) {
  uint64_t v = 0;
  // 8 indices = exactly BITS bytes. A whole 8-byte load is one instruction (an odd-sized memcpy is not);
  // `full` says the bytes past this block still lie inside the buffer, and the mask below drops them.
  if (full) std::memcpy(&v, p, 8);
  else std::memcpy(&v, p, BITS);
  if constexpr (BITS < 8) v &= (uint64_t(1) << (8 * BITS)) - 1;
  const uint32_t lo = uint32_t(v), hi = uint32_t(v >> (4 * BITS));
  const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 0, BITS, 2 * BITS, 3 * BITS);
  __m256i idx = _mm256_srlv_epi32(_mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi), shifts);
  idx = _mm256_and_si256(idx, _mm256_set1_epi32((1 << BITS) - 1));
  if constexpr (BITS <= 3) {
    return _mm256_permutevar8x32_ps(l0, idx);
  } else if constexpr (BITS == 4) {
    const __m256 a = _mm256_permutevar8x32_ps(l0, idx), b = _mm256_permutevar8x32_ps(l1, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign
  } else {
    return _mm256_i32gather_ps(lut, idx, 4);
  }
}

template <int BITS>
void lut_rows(const float* x, const uint8_t* packed, const float* luts, float* y, int64_t ldy, int64_t M, int64_t N, int64_t K,
              int64_t group, int64_t n0, int64_t n1) {
  constexpr int64_t MAXM = 16;
  const int64_t row_bytes = K * BITS / 8, L = 1 << BITS;
  for (int64_t n = n0; n < n1; ++n) {
    const float* lut = luts + (n / group) * L;
    __m256 l0 = _mm256_setzero_ps(), l1 = _mm256_setzero_ps();
    if constexpr (BITS <= 4) {
      float tmp[16] = {0};
      std::copy(lut, lut + L, tmp);
      l0 = _mm256_loadu_ps(tmp);
      l1 = _mm256_loadu_ps(tmp + 8);
    }
    const uint8_t* row = packed + n * row_bytes;
    if (M == 1) {  // decode: two register accumulators (an array indexed by m would live on the stack)
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t k = 0;
      const bool last_row = n == N - 1;
      for (; k + 16 <= K; k += 16) {
        // An 8-byte load at byte k/8*BITS stays inside the buffer unless this is the last row's tail.
        const bool full_a = !last_row || k + 64 / BITS <= K, full_b = !last_row || k + 8 + 64 / BITS <= K;
        a0 = _mm256_fmadd_ps(lut_lookup8<BITS>(row + k / 8 * BITS, lut, l0, l1, full_a), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(lut_lookup8<BITS>(row + (k + 8) / 8 * BITS, lut, l0, l1, full_b), _mm256_loadu_ps(x + k + 8), a1);
      }
      if (k < K) a0 = _mm256_fmadd_ps(lut_lookup8<BITS>(row + k / 8 * BITS, lut, l0, l1), _mm256_loadu_ps(x + k), a0);
      y[n] = hsum(_mm256_add_ps(a0, a1));
      continue;
    }
    __m256 acc[MAXM];
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 w8 = lut_lookup8<BITS>(row + k / 8 * BITS, lut, l0, l1);
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(w8, _mm256_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int64_t m = 0; m < M; ++m) y[m * ldy + n] = hsum(acc[m]);
  }
}

at::Tensor lut_gemv(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& lut_in, int64_t bits, int64_t group) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte, "lut_gemv: packed must be contiguous uint8 (N, K*bits/8)");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 6 || bits == 8, "lut_gemv: bits must be 2, 3, 4, 6 or 8");
  const int64_t N = packed.size(0), K = packed.size(1) * 8 / bits;
  TORCH_CHECK(K % 8 == 0 && x_in.size(-1) == K, "lut_gemv: x has ", x_in.size(-1), " features, weight has ", K);
  auto x = x_in.reshape({-1, K}).to(at::kFloat).contiguous();
  auto lut = lut_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  TORCH_CHECK(M <= 16, "lut_gemv: at most 16 rows (use the reference path for prefill)");
  TORCH_CHECK(lut.size(0) * group == N && lut.size(1) == (1 << bits), "lut_gemv: LUT shape does not match");
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  auto y = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *lp = lut.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(16, 262144 / std::max<int64_t>(K * bits, 1));
  at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) {
    switch (bits) {
      case 2: lut_rows<2>(xp, pp, lp, yp, N, M, N, K, group, a, b); break;
      case 3: lut_rows<3>(xp, pp, lp, yp, N, M, N, K, group, a, b); break;
      case 4: lut_rows<4>(xp, pp, lp, yp, N, M, N, K, group, a, b); break;
      case 6: lut_rows<6>(xp, pp, lp, yp, N, M, N, K, group, a, b); break;
      case 8: lut_rows<8>(xp, pp, lp, yp, N, M, N, K, group, a, b); break;
      default: TORCH_CHECK(false, "lut_gemv: bits must be 2, 3, 4, 6 or 8");
    }
  });
  return y.view(sizes);
}


at::Tensor lut_dequant(const at::Tensor& packed, const at::Tensor& lut_in, int64_t bits, int64_t group) {
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kByte, "lut_dequant: packed must be contiguous uint8");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 6 || bits == 8, "lut_dequant: bits must be 2, 3, 4, 6 or 8");
  const int64_t N = packed.size(0), K = packed.size(1) * 8 / bits, L = 1 << bits;
  TORCH_CHECK(lut_in.dim() == 2 && lut_in.size(0) * group == N && lut_in.size(1) == L, "lut_dequant: LUT shape does not match");
  auto lut = lut_in.to(at::kFloat).contiguous();
  auto w = at::empty({N, K}, lut.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* lp = lut.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      const uint8_t* row = pp + n * (K * bits / 8);
      const float* l = lp + (n / group) * L;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t bit = k * bits;
        uint32_t v = row[bit / 8] | (bit / 8 + 1 < K * bits / 8 ? uint32_t(row[bit / 8 + 1]) << 8 : 0u);
        wp[n * K + k] = l[(v >> (bit % 8)) & (L - 1)];
      }
    }
  });
  return w;
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


// ---- palettized weights x 8-bit activations (act8) -------------------------------------------
// x is quantized per row in blocks of 64 to 7-bit integers in [-63, 63], one absmax scale per block (as
// llama.cpp's Q8 activations: a per-block scale keeps outliers from flattening a whole row), and each group's
// LUT (4, 8 or 16 entries) to int8 in [-127, 127] with one scale, padded to 16 bytes.
// The packed indices are read as stored (the bitstream of pippin/quant/pack.py): 4-bit rows 64 weights (32
// bytes) at a time, split into low and high nibbles; 2-bit rows 32 weights (8 bytes) by shifting 64-bit lanes;
// 3-bit rows 32 weights (12 bytes) by shuffling 16-bit windows into place and shifting them with a multiply.
// The 32 index bytes come out in an order fixed per bit width (act8_order), and x is quantized into that same
// order. One byte shuffle then looks up 32 weights in the LUT shifted by +128 (unsigned, as maddubs wants; with
// 7-bit x, 2 * 255 * 63 never saturates its int16 pairs), and maddubs + madd do the dot product of a block,
// which is scaled by its x scale into a float accumulator. The shift adds 128 * sum(x) to every output; that sum
// is taken once per row of x and subtracted.
// Wider palettes (6 and 8 bits: 64 or 256 entries, too many for one byte shuffle) come as "bits 8": the (N, K)
// uint8 matrix of their looked-up int8 LUT values + 128, built once per layer (PalettizedLinear.act8_weights).
// It costs a byte per weight in memory instead of 6 bits, and its block dot is two loads and maddubs.

// Weights per block: 4-bit rows are read 32 bytes (64 weights) at a time, 2- and 3-bit rows 32 weights.
constexpr int64_t act8_block(int64_t bits) { return bits == 4 ? 64 : 32; }  // 8: natural order, any block

// The position (within its block) of the weight whose index the kernel puts in byte q of its x block.
inline int act8_order(int64_t bits, int q) {
  if (bits == 8) return q;  // expanded weights: one byte each, in place
  if (bits == 4) return q < 32 ? 2 * q : 2 * (q - 32) + 1;  // low nibbles, then high nibbles
  if (bits == 2) return 4 * (q % 8) + q / 8;                // 64-bit lane L holds the pairs shifted by 2L
  return (q < 8 || q >= 24) ? q : (q < 16 ? q + 8 : q - 8);  // 3-bit: packus interleaves 128-bit lanes
}

constexpr int64_t ACT8_BLOCK = 64;  // activations per scale

// Quantized activations as the kernels read them: q (M, K) int8 in [-63, 63] in act8_order within each block,
// one fp32 scale per 64 activations (M, K / ACT8_BLOCK), and per row the 128 * sum over blocks of scale * sum(q)
// that the +128 LUT shift adds.
struct Act8View {
  const int8_t* q;
  const float* scale;
  const float* shift;
};

// Quantize x (M, K) fp32 into q / scale / shift (caller's buffers) for the given bit width's index order.
void quantize_act8_into(const float* xp, int64_t M, int64_t K, int64_t bits, int8_t* qp, float* sp, float* shift_out) {
  const int64_t nb = K / ACT8_BLOCK, blk = act8_block(bits);
  int order[64];
  for (int q = 0; q < blk; ++q) order[q] = act8_order(bits, q);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t m = 0; m < M; ++m) {
    double shift = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const float* r = xp + m * K + b * ACT8_BLOCK;
      __m256 mx8 = _mm256_setzero_ps();
      for (int64_t k = 0; k < ACT8_BLOCK; k += 8) mx8 = _mm256_max_ps(mx8, _mm256_and_ps(_mm256_loadu_ps(r + k), abs_mask));
      float lanes[8];
      _mm256_storeu_ps(lanes, mx8);
      const float mx = *std::max_element(lanes, lanes + 8);
      const float s = std::max(mx, 1e-12f) / 63.0f;
      sp[m * nb + b] = s;
      int32_t sum = 0;
      int8_t* qb = qp + m * K + b * ACT8_BLOCK;
      for (int64_t k0 = 0; k0 < ACT8_BLOCK; k0 += blk)
        for (int q = 0; q < blk; ++q) sum += qb[k0 + q] = int8_t(std::nearbyint(r[k0 + order[q]] / s));
      shift += 128.0 * s * sum;
    }
    shift_out[m] = float(shift);
  }
}

struct Act8 {
  at::Tensor q;      // (M, K) int8
  at::Tensor scale;  // (M, K / ACT8_BLOCK) fp32
  std::vector<float> shift;  // (M,)
  Act8View view() const { return {q.data_ptr<int8_t>(), scale.data_ptr<float>(), shift.data()}; }
};

Act8 quantize_act8(const at::Tensor& x, int64_t bits) {
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % ACT8_BLOCK == 0, "act8: the input width must be a multiple of 64");
  Act8 a{at::empty({M, K}, x.options().dtype(at::kChar)), at::empty({M, K / ACT8_BLOCK}, x.options()), std::vector<float>(M, 0.0f)};
  quantize_act8_into(x.data_ptr<float>(), M, K, bits, a.q.data_ptr<int8_t>(), a.scale.data_ptr<float>(), a.shift.data());
  return a;
}

// The 8-bit head (gemv_i8_act8) keeps one scale per row of x and the full int8 range: its weights are signed,
// so it multiplies with the sign trick and needs no shift.
struct Act8Row {
  at::Tensor q;      // (M, K) int8 in [-127, 127]
  at::Tensor scale;  // (M,) fp32
};

Act8Row quantize_act8_rows(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  Act8Row a{at::empty({M, K}, x.options().dtype(at::kChar)), at::empty({M}, x.options())};
  const float* xp = x.data_ptr<float>();
  int8_t* qp = a.q.data_ptr<int8_t>();
  float* sp = a.scale.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xp + m * K;
    float mx = 0;
    for (int64_t k = 0; k < K; ++k) mx = std::max(mx, std::fabs(r[k]));
    const float s = std::max(mx, 1e-12f) / 127.0f;
    sp[m] = s;
    for (int64_t k = 0; k < K; ++k) qp[m * K + k] = int8_t(std::nearbyint(r[k] / s));
  }
  return a;
}

// Shuffle controls and multipliers of the 3-bit decode: 16-bit lane i of half h holds index p = 8h + i (and
// p + 16 in the second register): the two bytes around bit 3p, shifted left by 13 - 3p % 8 so that a right
// shift by 13 leaves exactly the 3 index bits.
struct Decode3 {
  __m256i c0, c1, m0, m1;
  Decode3() {
    alignas(32) int8_t c[2][32];
    alignas(32) int16_t mul[2][16];
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 8; ++i) {
          const int p = 16 * r + 8 * h + i, o = 3 * p / 8;
          c[r][16 * h + 2 * i] = int8_t(o);
          c[r][16 * h + 2 * i + 1] = int8_t(o + 1 < 12 ? o + 1 : 0x80);  // past the block: zero (never needed)
          mul[r][8 * h + i] = int16_t(1 << (13 - 3 * p % 8));
        }
    c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(c[0]));
    c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(c[1]));
    m0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(mul[0]));
    m1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(mul[1]));
  }
};

// The 32 LUT indices of one 32-weight block (4*BITS bytes at p), one per byte, in act8_order.
template <int BITS>
inline __m256i decode32(const uint8_t* p, const Decode3& d3) {
  if constexpr (BITS == 4) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
  } else if constexpr (BITS == 2) {
    int64_t v;
    std::memcpy(&v, p, 8);
    return _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(v), _mm256_setr_epi64x(0, 2, 4, 6)), _mm256_set1_epi8(3));
  } else {
    int32_t hi;
    std::memcpy(&hi, p + 8, 4);  // 12 bytes exactly: never reads past the row
    const __m256i b = _mm256_broadcastsi128_si256(_mm_insert_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), hi, 2));
    const __m256i lo = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(b, d3.c0), d3.m0), 13);
    const __m256i up = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(b, d3.c1), d3.m1), 13);
    return _mm256_packus_epi16(lo, up);
  }
}

inline int32_t hsum_i32(__m256i acc) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  s = _mm_hadd_epi32(s, s);
  s = _mm_hadd_epi32(s, s);
  return _mm_cvtsi128_si32(s);
}

// A group's 16 LUT bytes shifted by +128 into [1, 255] (read as unsigned), in both 128-bit lanes.
inline __m256i load_lut16(const int8_t* p) {
  return _mm256_broadcastsi128_si256(_mm_add_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), _mm_set1_epi8(char(-128))));
}

constexpr int64_t PF_PAIRS = 4;

// The shifted LUT of group g for the byte shuffle; expanded (8-bit) weights carry their values and need none.
template <int BITS>
inline __m256i lut_for(const int8_t* luts, int64_t g) {
  if constexpr (BITS == 8) return _mm256_setzero_si256();
  else return load_lut16(luts + g * 16);
}

// The act8 row kernels, compiled twice: for AVX2 (maddubs + madd) and, where the CPU has it, AVX-512 VNNI (one
// vpdpbusd per 32 bytes). The integers are the same (|x| <= 63 keeps maddubs' pairs from saturating), so both
// variants give bit-identical results; `kernel_variant` says which runs and `set_kernel_variant` picks one (tests,
// benchmarks). Where the CPU has VNNI it runs batched rows; a single row stays on AVX2 (see act8_rows below).
namespace avx2 {
#include "act8_rows.inc"
}  // namespace avx2

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
namespace vnni {
#define PIPPIN_VNNI 1
#include "act8_rows.inc"
#undef PIPPIN_VNNI
}  // namespace vnni
#pragma GCC pop_options

bool cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
}

std::atomic<bool> g_vnni{cpu_has_vnni()};

template <int BITS>
inline void act8_rows(const Act8View& a, const uint8_t* packed, const int8_t* luts, const float* lsc, float* y, int64_t ldy, int64_t M,
                      int64_t K, int64_t group, int64_t n0, int64_t n1) {
  // VNNI for batched rows (prefill, several decode rows): 12-15 % faster prefill on an AMD EPYC (Zen 4). One row (batch-1
  // decode) stays on AVX2 there: its vpdpbusd chain measured 10-15 % slower than maddubs + madd on that core.
  if (M > 1 && g_vnni.load(std::memory_order_relaxed)) {
    vnni::act8_rows<BITS>(a, packed, luts, lsc, y, ldy, M, K, group, n0, n1);
    _mm256_zeroupper();  // leave no dirty upper vector state behind for the AVX2 and SSE code that follows
  } else {
    avx2::act8_rows<BITS>(a, packed, luts, lsc, y, ldy, M, K, group, n0, n1);
  }
}

// One act8 projection: packed indices, its int8 LUT (G, 16) in [-127, 127] (entries past 2^bits unused) and the
// LUT scales (G,); or, for bits 8, the expanded (N, K) uint8 weights (the LUT is not read). K % 64 == 0.
struct Act8Proj {
  at::Tensor packed, lut, scale;
  int64_t bits, group, N;
};

Act8Proj act8_proj(const at::Tensor& packed, const at::Tensor& lut_i8, const at::Tensor& lut_scale, int64_t bits, int64_t group, int64_t K) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "lut_gemv_act8: bits must be 2, 3, 4 or 8 (expanded)");
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte, "lut_gemv_act8: packed must be contiguous uint8");
  const int64_t N = packed.size(0);
  TORCH_CHECK(packed.size(1) * 8 / bits == K && K % ACT8_BLOCK == 0, "lut_gemv_act8: K must be a multiple of 64 and match x");
  TORCH_CHECK(bits == 8 || (lut_i8.scalar_type() == at::kChar && lut_i8.dim() == 2 && lut_i8.size(1) == 16 && lut_i8.size(0) * group == N),
              "lut_gemv_act8: LUT must be int8 (N / group, 16)");
  TORCH_CHECK(group > 0 && N % group == 0 && lut_scale.numel() == N / group, "lut_gemv_act8: one LUT scale per group");
  return {packed, lut_i8.contiguous(), lut_scale.to(at::kFloat).contiguous(), bits, group, N};
}

// y[:, offset_j : offset_j + N_j] = x @ W_j^T for projections j that share their input x (M, K) fp32 (q, k and v;
// gate and up), written side by side into y (row stride ldy): x is quantized once per bit width, and one
// parallel region covers all their rows (one fork/join instead of one per projection).
void act8_multi(const at::Tensor& x, const std::vector<Act8Proj>& projs, float* y, int64_t ldy) {
  const int64_t M = x.size(0), K = x.size(1);
  Act8 qx[9];  // by bits (2, 3, 4, 8)
  std::vector<int64_t> offset(projs.size() + 1, 0);
  for (size_t j = 0; j < projs.size(); ++j) {
    if (!qx[projs[j].bits].q.defined()) qx[projs[j].bits] = quantize_act8(x, projs[j].bits);
    offset[j + 1] = offset[j] + projs[j].N;
  }
  at::parallel_for(0, offset.back(), 64, [&](int64_t r0, int64_t r1) {
    for (size_t j = 0; j < projs.size(); ++j) {
      const int64_t n0 = std::max(r0, offset[j]) - offset[j], n1 = std::min(r1, offset[j + 1]) - offset[j];
      if (n0 >= n1) continue;
      const Act8Proj& p = projs[j];
      const int8_t* lp = p.lut.data_ptr<int8_t>();
      const float* ls = p.scale.data_ptr<float>();
      const uint8_t* pp = p.packed.data_ptr<uint8_t>();
      float* yj = y + offset[j];
      switch (p.bits) {
        case 2: act8_rows<2>(qx[2].view(), pp, lp, ls, yj, ldy, M, K, p.group, n0, n1); break;
        case 3: act8_rows<3>(qx[3].view(), pp, lp, ls, yj, ldy, M, K, p.group, n0, n1); break;
        case 8: act8_rows<8>(qx[8].view(), pp, lp, ls, yj, ldy, M, K, p.group, n0, n1); break;
        default: act8_rows<4>(qx[4].view(), pp, lp, ls, yj, ldy, M, K, p.group, n0, n1); break;
      }
    }
  });
}

at::Tensor lut_gemv_act8(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& lut_i8,
                         const at::Tensor& lut_scale, int64_t bits, int64_t group) {
  const int64_t K = x_in.size(-1);
  auto x = x_in.reshape({-1, K}).to(at::kFloat).contiguous();
  const Act8Proj p = act8_proj(packed, lut_i8, lut_scale, bits, group, K);
  auto sizes = x_in.sizes().vec();
  sizes.back() = p.N;
  auto y = at::empty({x.size(0), p.N}, x.options());
  act8_multi(x, {p}, y.data_ptr<float>(), p.N);
  return y.view(sizes);
}

// Rows of int8 weights (one fp32 scale per row) times int8 activations: the 8-bit tied embedding read as the
// output head under act8. x is quantized per row (natural order); maddubs multiplies |w| by x carrying w's sign
// (pairs stay within int16: 2 * 127 * 127), so 32 weights cost a load, sign, abs, maddubs, madd and add.
at::Tensor gemv_i8_act8(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale_in) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kChar, "gemv_i8_act8: weight must be contiguous int8");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 32 == 0 && x_in.size(-1) == K, "gemv_i8_act8: K must be a multiple of 32 and match x");
  auto x = x_in.reshape({-1, K}).to(at::kFloat).contiguous();
  auto scale = scale_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  TORCH_CHECK(M <= 16, "gemv_i8_act8: at most 16 rows");
  Act8Row a = quantize_act8_rows(x);
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  auto y = at::empty({M, N}, x.options());
  const float *sp = scale.data_ptr<float>(), *xs = a.scale.data_ptr<float>();
  const int8_t *wp = w.data_ptr<int8_t>(), *xq = a.q.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  auto dot = [](__m256i acc, __m256i wv, __m256i xv) {
    const __m256i d16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(d16, _mm256_set1_epi16(1)));
  };
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    if (M == 1)  // decode: two rows at a time share each x load
      for (; n + 1 < n1; n += 2) {
        const int8_t *ra = wp + n * K, *rb = ra + K;
        for (int64_t off = 0; off < 2 * K; off += 64) _mm_prefetch(reinterpret_cast<const char*>(ra + 8 * K + off), _MM_HINT_T0);
        __m256i acc_a = _mm256_setzero_si256(), acc_b = _mm256_setzero_si256();
        for (int64_t k = 0; k < K; k += 32) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
          acc_a = dot(acc_a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ra + k)), xv);
          acc_b = dot(acc_b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + k)), xv);
        }
        yp[n] = float(hsum_i32(acc_a)) * sp[n] * xs[0];
        yp[n + 1] = float(hsum_i32(acc_b)) * sp[n + 1] * xs[0];
      }
    for (; n < n1; ++n) {
      const int8_t* row = wp + n * K;
      for (int64_t off = 0; off < K; off += 64) _mm_prefetch(reinterpret_cast<const char*>(row + 8 * K + off), _MM_HINT_T0);
      for (int64_t m = 0; m < M; ++m) {
        __m256i acc = _mm256_setzero_si256();
        for (int64_t k = 0; k < K; k += 32)
          acc = dot(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k)));
        yp[m * N + n] = float(hsum_i32(acc)) * sp[n] * xs[m];
      }
    }
  });
  return y.view(sizes);
}

// In-place rotate-half RoPE on the first n_heads heads of each (b, t) row of x (B, T, n_total*D), with
// per-row angles cos/sin (B, T, D). Used on the fused q|k|v projection output: rotates q and k together.
void rope_(at::Tensor x, const at::Tensor& cos_in, const at::Tensor& sin_in, int64_t n_heads, int64_t head_dim) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat, "rope_: x must be contiguous fp32");
  auto cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const int64_t rows = x.numel() / x.size(-1), width = x.size(-1), half = head_dim / 2;
  TORCH_CHECK(cos.numel() == rows * head_dim && sin.numel() == rows * head_dim, "rope_: cos and sin must be (B, T, D)");
  TORCH_CHECK(n_heads * head_dim <= width, "rope_: more heads than the row holds");
  float* xp = x.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float *c = cp + r * head_dim, *s = sp + r * head_dim;
    for (int64_t h = 0; h < n_heads; ++h) {
      float* v = xp + r * width + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

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

// y (M, N) += scale[s] * B[s] (A[s] x_m) with s = idx[m / (M / len(idx))]: every row its own LoRA slot.
// A (S, r, K) and B (S, N, r) are fp16 stacks (slot 0 is all-zero "no adapter" and is skipped via scale 0).
void lora_add_(at::Tensor y, const at::Tensor& x_in, const at::Tensor& A, const at::Tensor& Bw, const at::Tensor& scale,
               const at::Tensor& idx) {
  // Slots may be strided (views into one bank holding every module's slots); each slot's matrix is contiguous.
  TORCH_CHECK(A.scalar_type() == at::kHalf && Bw.scalar_type() == at::kHalf && A.dim() == 3 && Bw.dim() == 3 &&
                  A.stride(2) == 1 && A.stride(1) == A.size(2) && Bw.stride(2) == 1 && Bw.stride(1) == Bw.size(2),
              "lora_add_: A (S, r, K) and B (S, N, r) must be fp16 with contiguous rows per slot");
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && x_in.scalar_type() == at::kFloat,
              "lora_add_: x and y must be fp32 and y contiguous");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && idx.scalar_type() == at::kLong && idx.dim() == 1 &&
                  idx.numel() > 0,
              "lora_add_: scale must be contiguous fp32 (S,) and idx int64 (B,)");
  auto x = x_in.contiguous();
  const int64_t S = A.size(0), r = A.size(1), K = A.size(2), N = Bw.size(1), sA = A.stride(0), sB = Bw.stride(0);
  const int64_t M = x.numel() / K;
  TORCH_CHECK(x.size(-1) == K && Bw.size(0) == S && Bw.size(2) == r && scale.numel() == S && y.numel() == M * N,
              "lora_add_: shape mismatch");
  TORCH_CHECK(M % idx.numel() == 0, "lora_add_: rows must split evenly over idx");
  const int64_t per = M / idx.numel();
  auto idx_c = idx.contiguous();
  const int64_t* ip = idx_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < S, "lora_add_: slot index out of range");
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const c10::Half* Ap = A.data_ptr<c10::Half>();
  const c10::Half* Bp = Bw.data_ptr<c10::Half>();
  float* yp = y.data_ptr<float>();
  std::vector<int64_t> slot(M);
  for (int64_t m = 0; m < M; ++m) slot[m] = ip[m / per];
  const StepLora lo{Ap, Bp, sp, S, r, sA, sB};
  std::vector<float> h(M * r, 0.0f);
  at::parallel_for(0, M * r, 1, [&](int64_t i0, int64_t i1) { lora_down(lo, slot.data(), xp, K, h.data(), i0, i1); });  // h = A[s] x
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { lora_up(lo, slot.data(), h.data(), yp, N, M, n0, n1); });  // y += scale B[s] h
}

// One whole decoder block for a few tokens at a uniform cache offset (decode, speculative verify):
// pre-norm attention (q, k, v projections, RoPE, in-place KV-cache write, causal GQA attention over the
// cache, o-projection, residual), then the pre-norm SwiGLU MLP and residual. Each of the 7 projections
// [q, k, v, o, gate, up, down] is dense (bits 0: fp32/fp16/bf16 matvec) or palettized (bits > 0: packed
// indices + LUT, never dequantized; with an int8 LUT and its scale, the 4-bit x 8-bit-activation kernel). Replaces ~40 eager ops per layer with one call; equals the module
// path (tested).
at::Tensor apply_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& lut,
                        const c10::optional<at::Tensor>& lut_scale, int64_t bits, int64_t group) {
  if (bits == 0) {
    // From 8 rows (batched decode) a blocked GEMM beats the row-streaming gemv for fp32 weights (measured:
    // 1.8 vs 3.6 ms for 16 x 576 -> 1536 on one core); the LUT paths stay ahead of dequantize + GEMM.
    if (w.scalar_type() == at::kFloat && x.numel() / x.size(-1) >= 8) return at::linear(x, w);
    return gemv(x, w);
  }
  TORCH_CHECK(lut.has_value(), "decode_block: a palettized projection needs its LUT");
  if (lut_scale.has_value()) return lut_gemv_act8(x, w, *lut, *lut_scale, bits, group);  // int8 LUT: act8 path
  return lut_gemv(x, w, *lut, bits, group);
}

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

using Opt = c10::optional<at::Tensor>;
using Proj7 = std::array<at::Tensor, 7>;
using Opt7 = std::array<Opt, 7>;

at::Tensor decode_block_impl(const at::Tensor& x_in, const at::Tensor& attn_norm, const at::Tensor& mlp_norm, const Proj7& weights,
                             const Opt7& luts, const Opt7& lut_scales, const std::array<int64_t, 7>& bits, int64_t group,
                             const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache, int64_t start,
                             int64_t n_heads, int64_t n_kv_heads, double eps, const Opt7* lora_a, const Opt7* lora_b,
                             const Opt7* lora_scale, const Opt& lora_idx, const Opt& row_starts, const Opt& k_scale = c10::nullopt,
                             const Opt& v_scale = c10::nullopt) {
  const bool kv8 = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && (k_cache.scalar_type() == at::kFloat || kv8) &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "decode_block: the cache must be contiguous fp32 or int8 (B, H_kv, S, D)");
  TORCH_CHECK(!kv8 || (k_scale.has_value() && v_scale.has_value() && k_scale->is_contiguous() && v_scale->is_contiguous() &&
                       k_scale->scalar_type() == at::kFloat && k_scale->sizes() == k_cache.sizes().slice(0, 3) &&
                       v_scale->sizes() == k_scale->sizes()),
              "decode_block: an int8 cache needs contiguous fp32 scales (B, H_kv, S) for k and v");
  auto x = x_in.contiguous();
  const int64_t B = x.size(0), T = x.size(1), D = k_cache.size(3), S_max = k_cache.size(2);
  const int64_t H = n_heads, Hkv = n_kv_heads;
  // Each row writes its T new tokens at its own slot (row_starts, int64 (B,)) or all at `start`, and attends
  // over its slots [0, its start + t]: continuously batched rows sit at different offsets.
  std::vector<int64_t> starts(B, start);
  if (row_starts.has_value()) {
    TORCH_CHECK(row_starts->scalar_type() == at::kLong && row_starts->numel() == B, "decode_block: row_starts must be int64 (B,)");
    auto rs = row_starts->contiguous();
    std::copy(rs.data_ptr<int64_t>(), rs.data_ptr<int64_t>() + B, starts.begin());
  }
  int64_t max_start = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(starts[b] >= 0 && starts[b] + T <= S_max, "decode_block: cache overflow");
    max_start = std::max(max_start, starts[b]);
  }
  TORCH_CHECK(H % Hkv == 0 && k_cache.size(0) == B && k_cache.size(1) == Hkv && v_cache.sizes() == k_cache.sizes(),
              "decode_block: cache must be (B, H_kv, S, D) for both k and v");
  const bool lora = lora_idx.has_value() && lora_a != nullptr;
  auto lin = [&](const at::Tensor& in, int i) {
    auto y = apply_linear(in, weights[i], luts[i], lut_scales[i], bits[i], group);
    if (lora && (*lora_a)[i].has_value()) lora_add_(y, in, *(*lora_a)[i], *(*lora_b)[i], *(*lora_scale)[i], *lora_idx);
    return y;
  };
  // Projections that share an input run as one act8_multi call, straight into one buffer, when all are act8
  // and none has an adapter (lora_add_ wants each output on its own).
  auto fusable = [&](std::initializer_list<int> idx) {
    for (int i : idx)
      if (!lut_scales[i].has_value() || (lora && (*lora_a)[i].has_value())) return false;
    return true;
  };
  auto multi = [&](const at::Tensor& in, std::initializer_list<int> idx) {
    const int64_t K = in.size(-1);
    std::vector<Act8Proj> projs;
    int64_t width = 0;
    for (int i : idx) {
      projs.push_back(act8_proj(weights[i], *luts[i], *lut_scales[i], bits[i], group, K));
      width += projs.back().N;
    }
    auto out = at::empty({B, T, width}, in.options());
    act8_multi(in.reshape({-1, K}), projs, out.data_ptr<float>(), width);
    return out;
  };
  auto h = rms_norm(x, attn_norm, eps);
  auto qkv = fusable({0, 1, 2}) ? multi(h, {0, 1, 2}) : at::cat({lin(h, 0), lin(h, 1), lin(h, 2)}, -1).contiguous();  // (B, T, (H + 2 Hkv) D)
  rope_(qkv, cos, sin, H + Hkv, D);
  const int64_t width = (H + 2 * Hkv) * D;
  float* qp = qkv.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < Hkv; ++g) {
        const float* src = qp + (b * T + t) * width + (H + g) * D;
        const int64_t slot = (b * Hkv + g) * S_max + starts[b] + t;
        if (kv8) {
          store_kv8(src, D, k_cache.data_ptr<int8_t>() + slot * D, k_scale->data_ptr<float>() + slot);
          store_kv8(src + Hkv * D, D, v_cache.data_ptr<int8_t>() + slot * D, v_scale->data_ptr<float>() + slot);
        } else {
          std::copy(src, src + D, k_cache.data_ptr<float>() + slot * D);
          std::copy(src + Hkv * D, src + Hkv * D + D, v_cache.data_ptr<float>() + slot * D);
        }
      }
  auto attn = at::empty({B, T, H * D}, x.options());
  float* ap = attn.data_ptr<float>();
  if (kv8)
    attend<int8_t>(qp, width, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), k_scale->data_ptr<float>(), v_scale->data_ptr<float>(),
                   ap, starts, max_start, B, T, H, Hkv, D, S_max);
  else
    attend<float>(qp, width, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), nullptr, nullptr, ap, starts, max_start, B, T, H, Hkv,
                  D, S_max);
  x = x + lin(attn, 3);
  auto h2 = rms_norm(x, mlp_norm, eps);
  if (!fusable({4, 5})) return x + lin(silu_mul(lin(h2, 4), lin(h2, 5)), 6);
  auto gu = multi(h2, {4, 5});  // (B, T, 2F): gate | up
  const int64_t F = gu.size(-1) / 2;
  auto act = at::empty({B, T, F}, x.options());
  const float* gp = gu.data_ptr<float>();
  float* yp = act.data_ptr<float>();
  for (int64_t r = 0; r < B * T; ++r) silu_mul_range(gp + r * 2 * F, gp + r * 2 * F + F, yp + r * F, 0, F);
  return x + lin(act, 6);
}


template <typename T>
Opt7 opt7(const c10::List<c10::optional<T>>& l, int64_t offset = 0) {
  Opt7 out;
  for (int i = 0; i < 7; ++i) out[i] = l.get(offset + i);
  return out;
}

at::Tensor decode_block(const at::Tensor& x_in, const at::Tensor& attn_norm, const at::Tensor& mlp_norm,
                        at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& luts,
                        const c10::List<c10::optional<at::Tensor>>& lut_scales, at::IntArrayRef bits,
                        int64_t group, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                        at::Tensor v_cache, int64_t start, int64_t n_heads, int64_t n_kv_heads, double eps,
                        const c10::List<c10::optional<at::Tensor>>& lora_a, const c10::List<c10::optional<at::Tensor>>& lora_b,
                        const c10::List<c10::optional<at::Tensor>>& lora_scale, const c10::optional<at::Tensor>& lora_idx,
                        const c10::optional<at::Tensor>& row_starts, const c10::optional<at::Tensor>& k_scale,
                        const c10::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(weights.size() == 7 && luts.size() == 7 && lut_scales.size() == 7 && bits.size() == 7, "decode_block: need 7 projections");
  Proj7 w;
  std::array<int64_t, 7> b;
  for (int i = 0; i < 7; ++i) w[i] = weights[i], b[i] = bits[i];
  const bool lora = lora_idx.has_value() && lora_a.size() == 7 && lora_b.size() == 7 && lora_scale.size() == 7;
  Opt7 la, lb, ls;
  if (lora) la = opt7(lora_a), lb = opt7(lora_b), ls = opt7(lora_scale);
  return decode_block_impl(x_in, attn_norm, mlp_norm, w, opt7(luts), opt7(lut_scales), b, group, cos, sin, k_cache, v_cache, start,
                           n_heads, n_kv_heads, eps, lora ? &la : nullptr, lora ? &lb : nullptr, lora ? &ls : nullptr, lora_idx,
                           row_starts, k_scale, v_scale);
}

// ---- a whole decode step in one parallel region -------------------------------------------------------
// With one token per row the matvecs are short (tens of microseconds), and a fork/join per projection plus
// the serial work between them (norms, RoPE, residuals, allocations) left the second core idle for about a
// third of a step. The fused step below opens one OpenMP region for all layers: every phase splits its rows
// (or attention heads) statically over the threads and ends in a barrier; the tiny per-row work (RMSNorm,
// activation quantization) is done by every thread into its own buffers, which saves a barrier; nothing is
// allocated inside. Each phase calls the same row kernels as the per-projection ops, so it equals them.

// One projection resolved to raw pointers (the plan keeps its tensors alive).
struct StepProj {
  int kind = -1;  // 0 dense fp32, 1 dense fp16, 2 dense bf16, 3 LUT with fp32 table, 4 act8 (int8 LUT or expanded bytes)
  int64_t bits = 0, N = 0, K = 0, group = 1;
  const void* w = nullptr;
  const float* lut32 = nullptr;
  const int8_t* lut8 = nullptr;
  const float* lscale = nullptr;
};

// One thread's quantized copies of a phase's input, one per act8 bit width (2, 3, 4, 8), made on first use.
struct ActBufs {
  int64_t M = 0, K = 0;
  std::vector<int8_t> q;
  std::vector<float> scale, shift;
  bool ready[4] = {false, false, false, false};
  ActBufs(int64_t m, int64_t kmax) : M(m), K(kmax), q(4 * m * kmax), scale(4 * m * (kmax / ACT8_BLOCK + 1)), shift(4 * m) {}
  static int slot(int64_t bits) { return bits == 2 ? 0 : bits == 3 ? 1 : bits == 4 ? 2 : 3; }
  void reset() { std::fill(ready, ready + 4, false); }
  Act8View get(const StepProj& p, const float* x) {
    if (p.kind != 4) return {nullptr, nullptr, nullptr};
    const int i = slot(p.bits);
    int8_t* qp = q.data() + i * M * K;
    float* sp = scale.data() + i * M * (K / ACT8_BLOCK + 1);
    float* hp = shift.data() + i * M;
    if (!ready[i]) quantize_act8_into(x, M, p.K, p.bits, qp, sp, hp), ready[i] = true;
    return {qp, sp, hp};
  }
};

// Rows [n0, n1) of y (M rows, stride ldy) = x (M, K) @ W^T for one projection (a: x quantized for it, act8).
inline void proj_rows(const StepProj& p, const float* x, const Act8View& a, float* y, int64_t ldy, int64_t M, int64_t n0, int64_t n1) {
  if (n0 >= n1) return;
  const uint8_t* pk = static_cast<const uint8_t*>(p.w);
  switch (p.kind) {
    case 0: gemv_rows(x, static_cast<const float*>(p.w), y, M, ldy, p.K, n0, n1); return;
    case 1: gemv_rows(x, static_cast<const c10::Half*>(p.w), y, M, ldy, p.K, n0, n1); return;
    case 2: gemv_rows(x, static_cast<const c10::BFloat16*>(p.w), y, M, ldy, p.K, n0, n1); return;
    case 3:
      switch (p.bits) {
        case 2: lut_rows<2>(x, pk, p.lut32, y, ldy, M, p.N, p.K, p.group, n0, n1); return;
        case 3: lut_rows<3>(x, pk, p.lut32, y, ldy, M, p.N, p.K, p.group, n0, n1); return;
        case 4: lut_rows<4>(x, pk, p.lut32, y, ldy, M, p.N, p.K, p.group, n0, n1); return;
        case 6: lut_rows<6>(x, pk, p.lut32, y, ldy, M, p.N, p.K, p.group, n0, n1); return;
        default: lut_rows<8>(x, pk, p.lut32, y, ldy, M, p.N, p.K, p.group, n0, n1); return;
      }
    default:
      switch (p.bits) {
        case 2: act8_rows<2>(a, pk, p.lut8, p.lscale, y, ldy, M, p.K, p.group, n0, n1); return;
        case 3: act8_rows<3>(a, pk, p.lut8, p.lscale, y, ldy, M, p.K, p.group, n0, n1); return;
        case 4: act8_rows<4>(a, pk, p.lut8, p.lscale, y, ldy, M, p.K, p.group, n0, n1); return;
        default: act8_rows<8>(a, pk, p.lut8, p.lscale, y, ldy, M, p.K, p.group, n0, n1); return;
      }
  }
}

// Thread tid's share of n units, in whole multiples of `align` (the 2-row matvec pairs).
inline std::pair<int64_t, int64_t> share(int64_t n, int64_t n_threads, int64_t tid, int64_t align) {
  const int64_t units = (n + align - 1) / align;
  return {std::min(n, units * tid / n_threads * align), std::min(n, units * (tid + 1) / n_threads * align)};
}

// Resolve a projection for the fused step; kind -1 if the step cannot run it (the per-block path then does).
StepProj step_proj(const at::Tensor& w, const Opt& lut, const Opt& lut_scale, int64_t bits, int64_t group, std::vector<at::Tensor>& keep) {
  StepProj p;
  p.bits = bits, p.group = std::max<int64_t>(group, 1);
  if (w.dim() != 2 || !w.is_contiguous()) return p;
  if (bits == 0) {
    p.N = w.size(0), p.K = w.size(1), p.w = w.data_ptr();
    p.kind = w.scalar_type() == at::kFloat ? 0 : w.scalar_type() == at::kHalf ? 1 : w.scalar_type() == at::kBFloat16 ? 2 : -1;
    return p;
  }
  if (w.scalar_type() != at::kByte || !lut.has_value()) return p;
  p.N = w.size(0), p.K = w.size(1) * 8 / bits, p.w = w.data_ptr();
  if (p.N % p.group != 0) return p;
  if (lut_scale.has_value()) {  // act8
    if (!(bits == 2 || bits == 3 || bits == 4 || bits == 8) || p.K % ACT8_BLOCK != 0 || lut_scale->numel() != p.N / p.group) return p;
    if (bits != 8 && !(lut->scalar_type() == at::kChar && lut->is_contiguous() && lut->dim() == 2 && lut->size(1) == 16 && lut->size(0) * p.group == p.N))
      return p;
    keep.push_back(lut_scale->to(at::kFloat).contiguous());
    p.lscale = keep.back().data_ptr<float>();
    p.lut8 = bits == 8 ? nullptr : lut->data_ptr<int8_t>();
    p.kind = 4;
    return p;
  }
  if (!(bits == 2 || bits == 3 || bits == 4 || bits == 6 || bits == 8) || p.K % 8 != 0 || lut->dim() != 2 || lut->size(0) * p.group != p.N ||
      lut->size(1) != (int64_t(1) << bits))
    return p;
  keep.push_back(lut->to(at::kFloat).contiguous());
  p.lut32 = keep.back().data_ptr<float>();
  p.kind = 3;
  return p;
}

// Every decoder block of a model for one decode step, in one call: the per-layer arguments of decode_block
// (norms, 7 projections each, LUTs, bits, group, and the projections' LoRA slot banks) are handed over once and kept
// here, so a step costs one call from Python instead of one per layer with 30-odd arguments each. k and v are the
// cache's whole (L, B, H_kv, S, D) buffers. With one token per row every layer runs in one parallel region
// (fused_step); otherwise (speculative verification) block by block.

// Contiguous but for dim 1 (rows): the first rows of a contiguous (L, B_max, ...) buffer.
bool row_prefix(const at::Tensor& t) {
  int64_t expect = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expect) return false;
    expect *= t.size(d);
  }
  return t.dim() < 1 || t.size(0) == 1 || t.stride(0) >= expect;
}

// A spinning barrier for the fused step's phases. libgomp's own barrier spins only 100 rounds before sleeping in the
// kernel once it manages more threads than the machine has cores, which any second thread that ever ran a parallel
// region brings about (the server's worker next to the main thread): every phase then paid a futex wake-up, and a
// decode step ran 25-35 % slower on the server's thread than on the main one. This one spins (pausing), and yields
// the core after a while so an oversubscribed machine still makes progress.
struct SpinBarrier {
  alignas(64) std::atomic<int> arrived{0};  // on its own cache line: the waiters spin on `phase` undisturbed
  alignas(64) std::atomic<int> phase{0};

  void wait(int n) {
    if (n <= 1) return;
    const int p = phase.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      arrived.store(0, std::memory_order_relaxed);
      phase.store(p + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; phase.load(std::memory_order_acquire) == p;) {
      _mm_pause();
      if (++spins == 1 << 14) spins = 0, std::this_thread::yield();
    }
  }
};

struct DecodePlan : torch::CustomClassHolder {
  std::vector<at::Tensor> norm1, norm2;
  std::vector<Proj7> weights;
  std::vector<Opt7> luts, scales, lora_a, lora_b, lora_s;
  std::vector<std::array<int64_t, 7>> bits;
  std::vector<int64_t> groups;
  int64_t n_heads, n_kv_heads;
  double eps;
  std::vector<std::array<StepProj, 7>> step;
  std::vector<std::array<StepLora, 7>> lora;
  std::vector<at::Tensor> keep;  // converted LUTs and scales the step's raw pointers point into
  bool fused = false, dense_fp32 = false, has_lora = false, lora_ok = true;
  int64_t lora_slots = 0, lora_rank = 0;

  DecodePlan(std::vector<at::Tensor> attn_norms, std::vector<at::Tensor> mlp_norms, std::vector<at::Tensor> w,
             c10::List<c10::optional<at::Tensor>> lut, c10::List<c10::optional<at::Tensor>> lut_scale, std::vector<int64_t> b,
             std::vector<int64_t> group, int64_t heads, int64_t kv_heads, double norm_eps, c10::List<c10::optional<at::Tensor>> la,
             c10::List<c10::optional<at::Tensor>> lb, c10::List<c10::optional<at::Tensor>> ls)
      : norm1(std::move(attn_norms)), norm2(std::move(mlp_norms)), groups(std::move(group)), n_heads(heads), n_kv_heads(kv_heads), eps(norm_eps) {
    const size_t L = norm1.size();
    TORCH_CHECK(norm2.size() == L && groups.size() == L && w.size() == 7 * L && lut.size() == 7 * L && lut_scale.size() == 7 * L && b.size() == 7 * L,
                "DecodePlan: need 7 projections, LUTs, scales and bits per layer");
    TORCH_CHECK(la.size() == 7 * L && lb.size() == 7 * L && ls.size() == 7 * L, "DecodePlan: need 7 LoRA entries (or None) per layer");
    for (size_t l = 0; l < L; ++l) {
      Proj7 wl;
      std::array<int64_t, 7> bl;
      for (int i = 0; i < 7; ++i) wl[i] = w[7 * l + i], bl[i] = b[7 * l + i];
      weights.push_back(wl);
      bits.push_back(bl);
      luts.push_back(opt7(lut, 7 * l));
      scales.push_back(opt7(lut_scale, 7 * l));
      lora_a.push_back(opt7(la, 7 * l));
      lora_b.push_back(opt7(lb, 7 * l));
      lora_s.push_back(opt7(ls, 7 * l));
    }
    // The fused step needs every projection on a row kernel, one model width, and q|k|v / gate|up sharing inputs.
    fused = L > 0;
    for (size_t l = 0; l < L && fused; ++l) {
      std::array<StepProj, 7> sp;
      for (int i = 0; i < 7; ++i) sp[i] = step_proj(weights[l][i], luts[l][i], scales[l][i], bits[l][i], groups[l], keep);
      const int64_t D = norm1[l].numel(), F = sp[4].N;
      fused = std::all_of(sp.begin(), sp.end(), [](const StepProj& p) { return p.kind >= 0; }) && sp[0].K == D && sp[1].K == D &&
              sp[2].K == D && sp[3].N == D && sp[4].K == D && sp[5].K == D && sp[5].N == F && sp[6].K == F && sp[6].N == D &&
              norm2[l].numel() == D && norm1[l].scalar_type() == at::kFloat && norm2[l].scalar_type() == at::kFloat &&
              norm1[l].is_contiguous() && norm2[l].is_contiguous() && sp[1].N == sp[2].N && sp[3].K == sp[0].N &&
              (l == 0 || (D == norm1[0].numel() && F == step[0][4].N && sp[0].N == step[0][0].N && sp[1].N == step[0][1].N));
      step.push_back(sp);
      for (const auto& p : sp) dense_fp32 |= p.kind == 0;
      std::array<StepLora, 7> lo;
      for (int i = 0; i < 7 && fused; ++i) {
        const Opt &A = lora_a[l][i], &B = lora_b[l][i], &S = lora_s[l][i];
        if (!A.has_value()) continue;
        has_lora = true;
        const bool ok = B.has_value() && S.has_value() && A->scalar_type() == at::kHalf && B->scalar_type() == at::kHalf && A->dim() == 3 &&
                        B->dim() == 3 && A->stride(2) == 1 && A->stride(1) == A->size(2) && B->stride(2) == 1 && B->stride(1) == B->size(2) &&
                        A->size(2) == sp[i].K && B->size(1) == sp[i].N && B->size(2) == A->size(1) && B->size(0) == A->size(0) &&
                        S->scalar_type() == at::kFloat && S->is_contiguous() && S->numel() == A->size(0) &&
                        (lora_slots == 0 || (A->size(0) == lora_slots && A->size(1) == lora_rank));
        if (!ok) {
          lora_ok = false;
          continue;
        }
        lora_slots = A->size(0), lora_rank = A->size(1);
        lo[i] = {A->data_ptr<c10::Half>(), B->data_ptr<c10::Half>(), S->data_ptr<float>(), A->size(0), A->size(1), A->stride(0), B->stride(0)};
      }
      lora.push_back(lo);
    }
    lora_ok = lora_ok && fused;
  }

  // One token per row through every layer in one parallel region (see "a whole decode step" above). slot: each
  // row's LoRA slot (empty: no adapter).
  template <typename KT>
  at::Tensor fused_step(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, const at::Tensor& k, const at::Tensor& v,
                        const std::vector<int64_t>& starts, const Opt& k_scale, const Opt& v_scale, const std::vector<int64_t>& slot) {
    auto x = x_in.to(at::kFloat).contiguous().clone();
    auto cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
    const int64_t L = int64_t(step.size()), M = x.size(0), Dm = norm1[0].numel(), H = n_heads, Hkv = n_kv_heads;
    const int64_t hd = k.size(4), S_max = k.size(3), Wq = step[0][0].N, Wk = step[0][1].N, W = Wq + 2 * Wk, F = step[0][4].N;
    TORCH_CHECK(x.numel() == M * Dm && Wq == H * hd && Wk == Hkv * hd && cos.numel() == M * hd && sin.numel() == M * hd,
                "DecodePlan: x must be (B, 1, dim) and cos / sin (B, 1, head_dim) for this model");
    const int64_t Kmax = std::max({Dm, Wq, F});
    const bool use_lora = !slot.empty();
    std::vector<float> qkv(M * W), attn(M * Wq), tmp(M * Dm), gu(M * 2 * F), act(M * F), lh(use_lora ? 7 * M * lora_rank : 0);
    float* xp = x.data_ptr<float>();
    const float *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
    KT *kc = k.data_ptr<KT>(), *vc = v.data_ptr<KT>();
    float* ksc = k_scale.has_value() ? k_scale->data_ptr<float>() : nullptr;
    float* vsc = v_scale.has_value() ? v_scale->data_ptr<float>() : nullptr;
    const int64_t layer_kv = k.stride(0) / hd;  // slots per layer: the buffer's rows may outnumber the step's
    const int threads = at::in_parallel_region() ? 1 : int(at::get_num_threads());
    SpinBarrier bar;
#pragma omp parallel num_threads(threads)
    {
      const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
      std::vector<float> h(M * Kmax), p(S_max);
      ActBufs ab(M, Kmax);
      // The adapters' A x of projections js (input x, width K), split over the threads; a barrier when any ran.
      auto lora_phase = [&](const std::array<StepLora, 7>& lo, std::initializer_list<int> js, const float* in, int64_t K) {
        if (!use_lora) return;
        bool any = false;
        for (int j : js) {
          if (lo[j].A == nullptr) continue;
          any = true;
          const auto [a, b] = share(M * lo[j].r, nt, tid, 1);
          lora_down(lo[j], slot.data(), in, K, lh.data() + j * M * lora_rank, a, b);
        }
        if (any) {
          bar.wait(int(nt));
        }
      };
      auto lora_rows = [&](const StepLora& lo, int j, float* y, int64_t ldy, int64_t n0, int64_t n1) {
        if (use_lora && lo.A != nullptr && n0 < n1) lora_up(lo, slot.data(), lh.data() + j * M * lora_rank, y, ldy, M, n0, n1);
      };
      // x += in @ W_j^T (+ its adapter), each thread on its own output rows: the o- and down-projections.
      auto residual = [&](const std::array<StepProj, 7>& P, const std::array<StepLora, 7>& LO, int j, const float* in, int64_t K) {
        ab.reset();
        lora_phase(LO, {j}, in, K);
        const auto [a, b] = share(Dm, nt, tid, 2);
        proj_rows(P[j], in, ab.get(P[j], in), tmp.data(), Dm, M, a, b);
        lora_rows(LO[j], j, tmp.data(), Dm, a, b);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = a; n < b; ++n) xp[m * Dm + n] += tmp[m * Dm + n];
      };
      for (int64_t l = 0; l < L; ++l) {
        const auto& P = step[l];
        const auto& LO = lora[l];
        // q | k | v from the normed input
        for (int64_t m = 0; m < M; ++m) rms_norm_row(xp + m * Dm, norm1[l].data_ptr<float>(), h.data() + m * Dm, Dm, eps);
        ab.reset();
        lora_phase(LO, {0, 1, 2}, h.data(), Dm);
        {
          const auto [a, b] = share(W, nt, tid, 2);
          const int64_t off[4] = {0, Wq, Wq + Wk, W};
          for (int j = 0; j < 3; ++j) {
            const int64_t n0 = std::max(a, off[j]) - off[j], n1 = std::min(b, off[j + 1]) - off[j];
            proj_rows(P[j], h.data(), ab.get(P[j], h.data()), qkv.data() + off[j], W, M, n0, n1);
            lora_rows(LO[j], j, qkv.data() + off[j], W, n0, n1);
          }
        }
        bar.wait(int(nt));
        // RoPE on q and k heads; each k / v head into its cache slot
        {
          const auto [a, b] = share(M * (H + Hkv), nt, tid, 1);
          for (int64_t u = a; u < b; ++u) {
            const int64_t m = u / (H + Hkv), hh = u % (H + Hkv), half = hd / 2;
            float* hv = qkv.data() + m * W + hh * hd;
            const float *c = cp + m * hd, *sn = snp + m * hd;
            for (int64_t i = 0; i < half; ++i) {
              const float a0 = hv[i], b0 = hv[i + half];
              hv[i] = a0 * c[i] - b0 * sn[i];
              hv[i + half] = b0 * c[i + half] + a0 * sn[i + half];
            }
            if (hh < H) continue;
            const int64_t g = hh - H, cs = l * layer_kv + (m * Hkv + g) * S_max + starts[m];
            const float* vv = hv + Hkv * hd;
            if constexpr (std::is_same_v<KT, int8_t>) {
              store_kv8(hv, hd, kc + cs * hd, ksc + cs);
              store_kv8(vv, hd, vc + cs * hd, vsc + cs);
            } else {
              std::copy(hv, hv + hd, kc + cs * hd);
              std::copy(vv, vv + hd, vc + cs * hd);
            }
          }
        }
        bar.wait(int(nt));
        {
          const auto [a, b] = share(M * H, nt, tid, 1);
          attend_units<KT>(qkv.data(), W, kc + l * layer_kv * hd, vc + l * layer_kv * hd, ksc ? ksc + l * layer_kv : nullptr,
                           vsc ? vsc + l * layer_kv : nullptr, attn.data(), starts.data(), 1, H, Hkv, hd, S_max, p.data(), a, b);
        }
        bar.wait(int(nt));
        residual(P, LO, 3, attn.data(), Wq);
        bar.wait(int(nt));
        // SwiGLU: gate and up rows of the same features on the same thread, then silu(gate) * up there
        for (int64_t m = 0; m < M; ++m) rms_norm_row(xp + m * Dm, norm2[l].data_ptr<float>(), h.data() + m * Dm, Dm, eps);
        ab.reset();
        lora_phase(LO, {4, 5}, h.data(), Dm);
        {
          const auto [a, b] = share(F, nt, tid, 2);
          proj_rows(P[4], h.data(), ab.get(P[4], h.data()), gu.data(), 2 * F, M, a, b);
          proj_rows(P[5], h.data(), ab.get(P[5], h.data()), gu.data() + F, 2 * F, M, a, b);
          lora_rows(LO[4], 4, gu.data(), 2 * F, a, b);
          lora_rows(LO[5], 5, gu.data() + F, 2 * F, a, b);
          for (int64_t m = 0; m < M; ++m) silu_mul_range(gu.data() + m * 2 * F, gu.data() + m * 2 * F + F, act.data() + m * F, a, b);
        }
        bar.wait(int(nt));
        residual(P, LO, 6, act.data(), F);
        bar.wait(int(nt));
      }
    }
    return x.view(x_in.sizes());
  }

  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k, const at::Tensor& v, int64_t start,
                     const c10::optional<at::Tensor>& row_starts, const c10::optional<at::Tensor>& k_scale,
                     const c10::optional<at::Tensor>& v_scale, const c10::optional<at::Tensor>& lora_idx) {
    const int64_t L = int64_t(norm1.size());
    TORCH_CHECK(k.dim() == 5 && k.size(0) == L && v.sizes() == k.sizes(), "DecodePlan: the cache must be (L, B, H_kv, S, D) for k and v");
    const bool kv8 = k_scale.has_value() && v_scale.has_value();
    const int64_t B = x.size(0);
    // Each row's adapter slot: idx (n,) with n dividing the rows (one slot for all rows when n = 1).
    std::vector<int64_t> slot;
    if (lora_idx.has_value()) {
      TORCH_CHECK(has_lora && lora_ok, "DecodePlan: built without usable LoRA slots, so it cannot route adapters");
      auto idx = lora_idx->contiguous();
      TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.numel() > 0 && B % idx.numel() == 0,
                  "DecodePlan: lora_idx must be int64 (n,) with n dividing the rows");
      const int64_t per = B / idx.numel();
      for (int64_t m = 0; m < B; ++m) {
        const int64_t s = idx.data_ptr<int64_t>()[m / per];
        TORCH_CHECK(s >= 0 && s < lora_slots, "DecodePlan: adapter slot ", s, " out of range (", lora_slots, " slots)");
        slot.push_back(s);
      }
    }
    // One token per row: the fused step (from 8 rows a dense fp32 projection is faster as a GEMM: the per-block path).
    if (fused && x.dim() == 3 && x.size(1) == 1 && B <= 16 && !(dense_fp32 && B >= 8)) {
      // The first B rows of a bigger (L, B_max, H_kv, S, D) buffer are fine: a continuously batched cache runs its
      // rows in use; each row's slots stay contiguous and layers are k.stride(0) apart.
      TORCH_CHECK(k.size(1) == B && row_prefix(k) && row_prefix(v) && v.strides() == k.strides() &&
                      (k.scalar_type() == at::kFloat || k.scalar_type() == at::kChar) && v.scalar_type() == k.scalar_type(),
                  "DecodePlan: the cache must be fp32 or int8 (L, B, H_kv, S, D), contiguous but for its row count");
      TORCH_CHECK(k.size(2) == n_kv_heads, "DecodePlan: the cache has ", k.size(2), " kv heads, the model ", n_kv_heads);
      const bool int8 = k.scalar_type() == at::kChar;
      TORCH_CHECK(!int8 || (kv8 && row_prefix(*k_scale) && v_scale->strides() == k_scale->strides() && k_scale->stride(0) * k.size(4) == k.stride(0) &&
                            k_scale->scalar_type() == at::kFloat && v_scale->scalar_type() == at::kFloat &&
                            k_scale->sizes() == k.sizes().slice(0, 4) && v_scale->sizes() == k_scale->sizes()),
                  "DecodePlan: an int8 cache needs fp32 scales (L, B, H_kv, S) for k and v laid out as the cache");
      std::vector<int64_t> starts(B, start);
      if (row_starts.has_value()) {
        TORCH_CHECK(row_starts->scalar_type() == at::kLong && row_starts->numel() == B, "DecodePlan: row_starts must be int64 (B,)");
        auto rs = row_starts->contiguous();
        std::copy(rs.data_ptr<int64_t>(), rs.data_ptr<int64_t>() + B, starts.begin());
      }
      for (int64_t b = 0; b < B; ++b) TORCH_CHECK(starts[b] >= 0 && starts[b] + 1 <= k.size(3), "DecodePlan: cache overflow");
      return int8 ? fused_step<int8_t>(x, cos, sin, k, v, starts, k_scale, v_scale, slot)
                  : fused_step<float>(x, cos, sin, k, v, starts, k_scale, v_scale, slot);
    }
    const bool lo = lora_idx.has_value();
    for (int64_t l = 0; l < L; ++l)
      x = decode_block_impl(x, norm1[l], norm2[l], weights[l], luts[l], scales[l], bits[l], groups[l], cos, sin, k.select(0, l),
                            v.select(0, l), start, n_heads, n_kv_heads, eps, lo ? &lora_a[l] : nullptr, lo ? &lora_b[l] : nullptr,
                            lo ? &lora_s[l] : nullptr, lora_idx, row_starts, kv8 ? Opt(k_scale->select(0, l)) : c10::nullopt,
                            kv8 ? Opt(v_scale->select(0, l)) : c10::nullopt);
    return x;
  }
};

}  // namespace

std::string kernel_variant() { return g_vnni.load() ? "avx512-vnni" : "avx2-fma"; }  // avx512-vnni: for batched rows

void set_kernel_variant(const std::string& name) {
  TORCH_CHECK(name == "avx2-fma" || name == "avx512-vnni", "kernel variant must be avx2-fma or avx512-vnni, got ", name);
  TORCH_CHECK(name == "avx2-fma" || cpu_has_vnni(), "this CPU has no AVX-512 VNNI");
  g_vnni.store(name == "avx512-vnni");
}

TORCH_LIBRARY(pippin, m) {
  m.def("gemv(Tensor x, Tensor w) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor g, Tensor u) -> Tensor");
  m.def("lut_gemv(Tensor x, Tensor packed, Tensor lut, int bits, int group) -> Tensor");
  m.def("lut_dequant(Tensor packed, Tensor lut, int bits, int group) -> Tensor");
  m.def("gemv_i8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("gemv_i8_act8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("lut_gemv_act8(Tensor x, Tensor packed, Tensor lut_i8, Tensor lut_scale, int bits, int group) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin, int n_heads, int head_dim) -> ()");
  m.def(
      "decode_block(Tensor x, Tensor attn_norm, Tensor mlp_norm, Tensor[] weights, Tensor?[] luts, "
      "Tensor?[] lut_scales, int[] bits, "
      "int group, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int start, int n_heads, "
      "int n_kv_heads, float eps, Tensor?[] lora_a, Tensor?[] lora_b, Tensor?[] lora_scale, Tensor? lora_idx, "
      "Tensor? row_starts=None, Tensor(c!)? k_scale=None, Tensor(d!)? v_scale=None) -> Tensor");
  m.def("lora_add_(Tensor(a!) y, Tensor x, Tensor A, Tensor B, Tensor scale, Tensor idx) -> ()");
  m.def("kernel_variant", &kernel_variant);
  m.def("set_kernel_variant", &set_kernel_variant);
  m.def("cpu_has_vnni", &cpu_has_vnni);
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, c10::List<c10::optional<at::Tensor>>,
                       c10::List<c10::optional<at::Tensor>>, std::vector<int64_t>, std::vector<int64_t>, int64_t, int64_t, double,
                       c10::List<c10::optional<at::Tensor>>, c10::List<c10::optional<at::Tensor>>, c10::List<c10::optional<at::Tensor>>>())
      .def("forward", &DecodePlan::forward)
      .def("fused", [](const c10::intrusive_ptr<DecodePlan>& self) { return self->fused; })
      .def("routes_adapters", [](const c10::intrusive_ptr<DecodePlan>& self) { return self->has_lora && self->lora_ok; });
}

TORCH_LIBRARY_IMPL(pippin, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("lut_gemv", &lut_gemv);
  m.impl("lut_dequant", &lut_dequant);
  m.impl("gemv_i8", &gemv_i8);
  m.impl("gemv_i8_act8", &gemv_i8_act8);
  m.impl("lut_gemv_act8", &lut_gemv_act8);
  m.impl("rope_", &rope_);
  m.impl("decode_block", &decode_block);
  m.impl("lora_add_", &lora_add_);
}
