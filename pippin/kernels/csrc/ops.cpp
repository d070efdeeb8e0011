// pippin CPU kernels: the decode-time fast paths (AVX2 + FMA + F16C, threads via at::parallel_for).
//
// gemv:      y (M, N) = x (M, K) @ w (N, K)^T for small M (decode, a few rows), w in fp32 / fp16 / bf16.
//            Memory-bound: each weight row is streamed once and reused for all M rows of x.
// rms_norm:  y = x * rsqrt(mean(x^2) + eps) * w, one pass per row.
// silu_mul:  y = silu(g) * u (the SwiGLU gate).
// lut_gemv:  y = x @ W^T for palettized W (packed indices + per-group LUTs), never materialising W;
//            lut_dequant builds W for the prefill path; lut4_gemv_act8 is the 4-bit x int8-activation kernel.
// gemv_i8:   int8 rows with per-row scales (the 8-bit embedding read as the output head).
// rope_:     rotate-half RoPE in place over the q and k heads of a fused q|k|v row.
// lora_add_: y += scale[s] * (x A[s]^T) B[s]^T per row, with each row's adapter slot s (fp16 A/B stacks):
//            mixed-adapter batches in one call (S-LoRA / punica's gathered LoRA, for a few rows).
// decode_block: a whole decoder block for a few tokens (decode), built from the above.
// Each has a slow reference in Python (F.linear, F.rms_norm, F.silu) and a test that they agree.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cmath>
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
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * D;
      float* yr = yp + r * D;
      double ss = 0;
      for (int64_t i = 0; i < D; ++i) ss += double(xr[i]) * xr[i];
      const float inv = 1.0f / std::sqrt(float(ss / D) + float(eps));
      for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * inv * wp[i];
    }
  });
  return y;
}

at::Tensor silu_mul(const at::Tensor& g_in, const at::Tensor& u_in) {
  TORCH_CHECK(g_in.sizes() == u_in.sizes(), "silu_mul: shape mismatch");
  auto g = g_in.contiguous().to(at::kFloat), u = u_in.contiguous().to(at::kFloat);
  auto y = at::empty_like(g);
  const float *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, g.numel(), 16384, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) yp[i] = gp[i] / (1.0f + std::exp(-gp[i])) * up[i];
  });
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
void lut_rows(const float* x, const uint8_t* packed, const float* luts, float* y, int64_t M, int64_t N, int64_t K,
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
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = hsum(acc[m]);
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
      case 2: lut_rows<2>(xp, pp, lp, yp, M, N, K, group, a, b); break;
      case 3: lut_rows<3>(xp, pp, lp, yp, M, N, K, group, a, b); break;
      case 4: lut_rows<4>(xp, pp, lp, yp, M, N, K, group, a, b); break;
      case 6: lut_rows<6>(xp, pp, lp, yp, M, N, K, group, a, b); break;
      case 8: lut_rows<8>(xp, pp, lp, yp, M, N, K, group, a, b); break;
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


// ---- 4-bit palettized weights x 8-bit activations (act8) -------------------------------------------
// x is quantized once per row to int8 with one absmax scale (dynamic per-token activation quantization);
// each group's 16-entry LUT to int8 with one scale. A 32-weight block is then 16 packed bytes: the low and
// high nibbles index the int8 LUT with one byte shuffle each, and maddubs/madd do the int8 dot product
// (llama.cpp's trick for signed x signed). x is stored with even positions first within each 32-block,
// the order the nibble split yields. About 10 instructions per 32 weights instead of ~10 per 8.
struct Act8 {
  at::Tensor q;      // (M, K) int8, even/odd-deinterleaved per 32-block
  at::Tensor scale;  // (M,) fp32
};

Act8 quantize_act8(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  Act8 a{at::empty({M, K}, x.options().dtype(at::kChar)), at::empty({M}, x.options())};
  const float* xp = x.data_ptr<float>();
  int8_t* qp = a.q.data_ptr<int8_t>();
  float* sp = a.scale.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xp + m * K;
    float mx = 0;
    for (int64_t k = 0; k < K; ++k) mx = std::max(mx, std::fabs(r[k]));
    const float s = mx > 0 ? mx / 127.0f : 1.0f, inv = 1.0f / s;
    sp[m] = s;
    for (int64_t k0 = 0; k0 < K; k0 += 32)
      for (int64_t j = 0; j < 16; ++j) {
        qp[m * K + k0 + j] = int8_t(std::nearbyint(r[k0 + 2 * j] * inv));
        qp[m * K + k0 + 16 + j] = int8_t(std::nearbyint(r[k0 + 2 * j + 1] * inv));
      }
  }
  return a;
}

// lut_i8 (G, 16) int8 and lut_scale (G,) fp32: the int8 LUTs. K must be a multiple of 32.
at::Tensor lut4_gemv_act8(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& lut_i8,
                          const at::Tensor& lut_scale, int64_t group) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(K % 32 == 0 && x_in.size(-1) == K, "lut4_gemv_act8: K must be a multiple of 32 and match x");
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte, "lut4_gemv_act8: packed must be contiguous uint8");
  TORCH_CHECK(lut_i8.scalar_type() == at::kChar && lut_i8.dim() == 2 && lut_i8.size(1) == 16 && lut_i8.size(0) * group == N,
              "lut4_gemv_act8: LUT must be int8 (N / group, 16)");
  TORCH_CHECK(lut_scale.numel() == lut_i8.size(0), "lut4_gemv_act8: one LUT scale per group");
  auto x = x_in.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  TORCH_CHECK(M <= 16, "lut4_gemv_act8: at most 16 rows");
  Act8 a = quantize_act8(x);
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  auto y = at::empty({M, N}, x.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const auto lut_c = lut_i8.contiguous();  // kept alive while the kernel reads it
  const auto lsc = lut_scale.to(at::kFloat).contiguous();
  const int8_t *lp = lut_c.data_ptr<int8_t>(), *qp = a.q.data_ptr<int8_t>();
  const float *lsp = lsc.data_ptr<float>(), *xsp = a.scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const __m256i ones = _mm256_set1_epi16(1), nib = _mm256_set1_epi8(0x0F);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const __m128i l = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lp + (n / group) * 16));
      const __m256i lut = _mm256_set_m128i(l, l);
      const uint8_t* row = pp + n * (K / 2);
      for (int64_t m = 0; m < M; ++m) {
        __m256i acc = _mm256_setzero_si256();
        const int8_t* xq = qp + m * K;
        for (int64_t k = 0; k < K; k += 32) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
          const __m256i idx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), nib);  // even | odd
          const __m256i w = _mm256_shuffle_epi8(lut, idx);
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
          const __m256i d16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
          acc = _mm256_add_epi32(acc, _mm256_madd_epi16(d16, ones));
        }
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        s = _mm_hadd_epi32(s, s);
        s = _mm_hadd_epi32(s, s);
        yp[m * N + n] = float(_mm_cvtsi128_si32(s)) * lsp[n / group] * xsp[m];
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
  std::vector<float> h(M * r, 0.0f);
  // h = A[s] x: M * r dot products of length K.
  at::parallel_for(0, M * r, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / r, j = i % r, s = ip[m / per];
      if (sp[s] == 0.0f) continue;
      const c10::Half* a = Ap + s * sA + j * K;
      const float* xm = xp + m * K;
      __m256 acc = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(load8(a + k), _mm256_loadu_ps(xm + k), acc);
      float t = hsum(acc);
      for (; k < K; ++k) t += float(a[k]) * xm[k];
      h[i] = t;
    }
  });
  // y += scale * B[s] h: N outputs of length r per row.
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      const int64_t s = ip[m / per];
      const float sc = sp[s];
      if (sc == 0.0f) continue;
      const float* hm = h.data() + m * r;
      for (int64_t n = n0; n < n1; ++n) {
        const c10::Half* b = Bp + s * sB + n * r;
        float t = 0.0f;
        int64_t j = 0;
        if (r % 8 == 0) {
          __m256 acc = _mm256_setzero_ps();
          for (; j < r; j += 8) acc = _mm256_fmadd_ps(load8(b + j), _mm256_loadu_ps(hm + j), acc);
          t = hsum(acc);
        }
        for (; j < r; ++j) t += float(b[j]) * hm[j];
        yp[m * N + n] += sc * t;
      }
    }
  });
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
  if (lut_scale.has_value()) return lut4_gemv_act8(x, w, *lut, *lut_scale, group);  // int8 LUT: act8 path
  return lut_gemv(x, w, *lut, bits, group);
}

at::Tensor decode_block(const at::Tensor& x_in, const at::Tensor& attn_norm, const at::Tensor& mlp_norm,
                        at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& luts,
                        const c10::List<c10::optional<at::Tensor>>& lut_scales, at::IntArrayRef bits,
                        int64_t group, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                        at::Tensor v_cache, int64_t start, int64_t n_heads, int64_t n_kv_heads, double eps,
                        const c10::List<c10::optional<at::Tensor>>& lora_a, const c10::List<c10::optional<at::Tensor>>& lora_b,
                        const c10::List<c10::optional<at::Tensor>>& lora_scale, const c10::optional<at::Tensor>& lora_idx,
                        const c10::optional<at::Tensor>& row_starts) {
  TORCH_CHECK(weights.size() == 7 && luts.size() == 7 && bits.size() == 7, "decode_block: need 7 projections");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == at::kFloat,
              "decode_block: the cache must be contiguous fp32 (B, H_kv, S, D)");
  auto x = x_in.contiguous();
  const int64_t B = x.size(0), T = x.size(1), D = k_cache.size(3), S_max = k_cache.size(2);
  const int64_t H = n_heads, Hkv = n_kv_heads, rep = H / Hkv;
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
  const bool lora = lora_idx.has_value() && lora_a.size() == 7 && lora_b.size() == 7 && lora_scale.size() == 7;
  auto lin = [&](const at::Tensor& in, int i) {
    auto y = apply_linear(in, weights[i], luts.get(i), lut_scales.get(i), bits[i], group);
    const auto a = lora ? lora_a.get(i) : c10::optional<at::Tensor>();
    if (a.has_value()) lora_add_(y, in, *a, *lora_b.get(i), *lora_scale.get(i), *lora_idx);
    return y;
  };
  auto h = rms_norm(x, attn_norm, eps);
  auto qkv = at::cat({lin(h, 0), lin(h, 1), lin(h, 2)}, -1).contiguous();  // (B, T, (H + 2 Hkv) D)
  rope_(qkv, cos, sin, H + Hkv, D);
  const int64_t width = (H + 2 * Hkv) * D;
  float* qp = qkv.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < Hkv; ++g) {
        const float* src = qp + (b * T + t) * width + (H + g) * D;
        const int64_t dst = ((b * Hkv + g) * S_max + starts[b] + t) * D;
        std::copy(src, src + D, kc + dst);
        std::copy(src + Hkv * D, src + Hkv * D + D, vc + dst);
      }
  auto attn = at::empty({B, T, H * D}, x.options());
  float* ap = attn.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(float(D));
  at::parallel_for(0, B * H * T, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(max_start + T);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * T), hh = (i / T) % H, t = i % T, g = hh / rep, S = starts[b] + t + 1;
      const float* q = qp + (b * T + t) * width + hh * D;
      const float* kb = kc + (b * Hkv + g) * S_max * D;
      const float* vb = vc + (b * Hkv + g) * S_max * D;
      float mx = -INFINITY;
      for (int64_t j = 0; j < S; ++j) {
        __m256 acc = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kb + j * D + d), acc);
        float s = hsum(acc);
        for (; d < D; ++d) s += q[d] * kb[j * D + d];
        p[j] = s * scale;
        mx = std::max(mx, p[j]);
      }
      float sum = 0;
      for (int64_t j = 0; j < S; ++j) sum += (p[j] = std::exp(p[j] - mx));
      float* out = ap + (b * T + t) * H * D + hh * D;
      std::fill(out, out + D, 0.0f);
      for (int64_t j = 0; j < S; ++j) {
        const float w = p[j] / sum;
        for (int64_t d = 0; d < D; ++d) out[d] += w * vb[j * D + d];
      }
    }
  });
  x = x + lin(attn, 3);
  auto h2 = rms_norm(x, mlp_norm, eps);
  return x + lin(silu_mul(lin(h2, 4), lin(h2, 5)), 6);
}

}  // namespace

TORCH_LIBRARY(pippin, m) {
  m.def("gemv(Tensor x, Tensor w) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor g, Tensor u) -> Tensor");
  m.def("lut_gemv(Tensor x, Tensor packed, Tensor lut, int bits, int group) -> Tensor");
  m.def("lut_dequant(Tensor packed, Tensor lut, int bits, int group) -> Tensor");
  m.def("gemv_i8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("lut4_gemv_act8(Tensor x, Tensor packed, Tensor lut_i8, Tensor lut_scale, int group) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin, int n_heads, int head_dim) -> ()");
  m.def(
      "decode_block(Tensor x, Tensor attn_norm, Tensor mlp_norm, Tensor[] weights, Tensor?[] luts, "
      "Tensor?[] lut_scales, int[] bits, "
      "int group, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int start, int n_heads, "
      "int n_kv_heads, float eps, Tensor?[] lora_a, Tensor?[] lora_b, Tensor?[] lora_scale, Tensor? lora_idx, "
      "Tensor? row_starts=None) -> Tensor");
  m.def("lora_add_(Tensor(a!) y, Tensor x, Tensor A, Tensor B, Tensor scale, Tensor idx) -> ()");
}

TORCH_LIBRARY_IMPL(pippin, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("lut_gemv", &lut_gemv);
  m.impl("lut_dequant", &lut_dequant);
  m.impl("gemv_i8", &gemv_i8);
  m.impl("lut4_gemv_act8", &lut4_gemv_act8);
  m.impl("rope_", &rope_);
  m.impl("decode_block", &decode_block);
  m.impl("lora_add_", &lora_add_);
}
