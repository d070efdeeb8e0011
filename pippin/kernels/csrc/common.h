// pippin CPU kernels: the decode-time fast paths (AVX2 + FMA + F16C, threads via at::parallel_for).
// This header is what every kernel file shares (includes, SIMD and per-row helpers); the kernels, by file:
//
// matvec.cpp
// gemv:      y (M, N) = x (M, K) @ w (N, K)^T for small M (decode, a few rows), w in fp32 / fp16 / bf16.
//            Memory-bound: each weight row is streamed once and reused for all M rows of x.
// rms_norm:  y = x * rsqrt(mean(x^2) + eps) * w, one pass per row.
// silu_mul:  y = silu(g) * u (the SwiGLU gate).
// gemv_i8:   int8 rows with per-row scales (the 8-bit embedding read as the output head).
// lut.cpp
// lut_gemv:  y = x @ W^T for palettized W (packed indices + per-group LUTs), never materialising W;
//            lut_dequant builds W for the prefill path.
// act8.cpp (and its row kernels, act8_rows.inc)
// lut_gemv_act8: the 2/3/4-bit (and expanded 6/8-bit) x int8-activation kernel; gemv_i8_act8: gemv_i8 with int8
//            activations.
// attention.cpp (the attention over the KV cache and the int8 KV store: attention.h)
// rope_:     rotate-half RoPE in place over the q and k heads of a fused q|k|v row.
// hadamard.cpp
// hadamard_rows: x -> ((x * signs) H) / sqrt(n) per row (signs as a bitmask), a layer's online input rotation (R4).
// lora.cpp
// lora_add_: y += scale[s] * (x A[s]^T) B[s]^T per row, with each row's adapter slot s (fp16 A/B stacks):
//            mixed-adapter batches in one call (S-LoRA / punica's gathered LoRA, for a few rows).
// block.cpp
// decode_block_impl: a whole decoder block for a few tokens (decode), built from the above, over an fp32 or int8 KV
//            cache (DecodePlan's path for several tokens per row).
// step.h / step.cpp
// DecodePlan: every block of a model for one decode step in one call, from per-layer arguments kept in C++; with one
//            token per row, all layers run in a single OpenMP region with barriers between phases (fused_step).
// library.cpp registers the ops as torch.ops.pippin and DecodePlan as torch.classes.pippin.DecodePlan.
// Each has a slow reference in Python (F.linear, F.rms_norm, F.silu) and a test that they agree.
// Decode streams every weight from DRAM once per token, so the matvecs prefetch a few rows ahead.
#pragma once

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

namespace pippin {

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

// Thread tid's share of n units, in whole multiples of `align` (the 2-row matvec pairs).
inline std::pair<int64_t, int64_t> share(int64_t n, int64_t n_threads, int64_t tid, int64_t align) {
  const int64_t units = (n + align - 1) / align;
  return {std::min(n, units * tid / n_threads * align), std::min(n, units * (tid + 1) / n_threads * align)};
}

}  // namespace pippin
