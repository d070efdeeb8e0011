// Palettized weights: the LUT row kernels (shared by lut_gemv and the fused step) and the ops of lut.cpp.
#pragma once

#include "common.h"

namespace pippin {

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

// Rows [n0, n1) of y = x @ W^T, W's rows looked up in their group's fp32 LUT, times rs[n] where rs (N,) is given.
template <int BITS>
void lut_rows(const float* x, const uint8_t* packed, const float* luts, float* y, int64_t ldy, int64_t M, int64_t N, int64_t K,
              int64_t group, int64_t n0, int64_t n1, const float* rs = nullptr) {
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
      y[n] = rs ? hsum(_mm256_add_ps(a0, a1)) * rs[n] : hsum(_mm256_add_ps(a0, a1));
      continue;
    }
    __m256 acc[MAXM];
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 w8 = lut_lookup8<BITS>(row + k / 8 * BITS, lut, l0, l1);
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(w8, _mm256_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int64_t m = 0; m < M; ++m) y[m * ldy + n] = rs ? hsum(acc[m]) * rs[n] : hsum(acc[m]);
  }
}

at::Tensor lut_gemv(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& lut_in, int64_t bits, int64_t group,
                    const c10::optional<at::Tensor>& row_scale);
at::Tensor lut_dequant(const at::Tensor& packed, const at::Tensor& lut_in, int64_t bits, int64_t group);

}  // namespace pippin
