// The online Hadamard rotation of a projection's input (hadamard.cpp): QuaRot's R4, stored with the layer.
#pragma once

#include "common.h"

namespace pippin {

// ---- x -> x R, R = diag(signs) H / sqrt(n) ----------------------------------------------------------------
// H = kron(A, S_p) (pippin/quant/rotate.py, hadamard_factors): A the m x m Paley part (m = 1, 12, 144, ...) and S_p the
// Sylvester matrix of order p = n / m, a power of 2. With x viewed as X (m, p), x H = A^T X S_p: the m x m mix of rows
// (A arrives scaled by 1/sqrt(n), so the scale costs nothing), then a fast Walsh-Hadamard transform of each row.
// n = 1536 (12 x 128): 12 * 1536 FMAs and 7 * 1536 adds per row, about 1 us with its data in cache and 1.4 us inside a
// decode step on this AMD EPYC (the mix's FMAs and their broadcasts are most of it). The signs come as a bitmask (bit
// i % 8 of byte i / 8 set: x[i] changes sign), 192 bytes at n = 1536 rather than 6 KB of fp32 read cold every step.

// v (p) -> v S_p in place, p a power of 2: butterflies (a, b) -> (a + b, a - b) at distances 1, 2, 4, ... The first
// three distances stay inside one 8-float register (a lane permute and a multiply-add by ±1, which rounds as the add).
inline void fwht(float* v, int64_t p) {
  int64_t h = 1;
  if (p % 8 == 0) {
    const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1), s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1),
                 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
    for (int64_t i = 0; i < p; i += 8) {
      __m256 a = _mm256_loadu_ps(v + i);
      a = _mm256_fmadd_ps(a, s1, _mm256_permute_ps(a, 0xB1));          // lanes (1, 0, 3, 2, ...)
      a = _mm256_fmadd_ps(a, s2, _mm256_permute_ps(a, 0x4E));          // lanes (2, 3, 0, 1, ...)
      a = _mm256_fmadd_ps(a, s4, _mm256_permute2f128_ps(a, a, 0x01));  // the two halves swapped
      _mm256_storeu_ps(v + i, a);
    }
    for (h = 8; h < p; h *= 2)
      for (int64_t i = 0; i < p; i += 2 * h)
        for (int64_t j = i; j < i + h; j += 8) {
          const __m256 a = _mm256_loadu_ps(v + j), b = _mm256_loadu_ps(v + j + h);
          _mm256_storeu_ps(v + j, _mm256_add_ps(a, b));
          _mm256_storeu_ps(v + j + h, _mm256_sub_ps(a, b));
        }
    return;
  }
  for (; h < p; h *= 2)
    for (int64_t i = 0; i < p; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b, v[j + h] = a - b;
      }
}

// 8 floats with the signs of bits 0..7 of `bits` flipped (as a multiply by ±1: exact).
inline __m256 flip8(__m256 v, uint8_t bits) {
  const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), lane), lane);
  return _mm256_xor_ps(v, _mm256_castsi256_ps(_mm256_slli_epi32(set, 31)));
}

inline bool sign_bit(const uint8_t* bits, int64_t i) { return (bits[i >> 3] >> (i & 7)) & 1; }

// y[ja, j:j+8] = sum_ia A[ia, ja] * (x * signs)[ia, j:j+8] for ja in [ja0, ja1) of the m = MM rows of X: the 12 (or
// 1) input vectors of a column block stay in registers, and each output is written once.
template <int MM>
inline void mix_block(const float* x, const uint8_t* signs, const float* A, int64_t p, int64_t j, int64_t ja0, int64_t ja1, float* y) {
  __m256 t[MM];
  for (int ia = 0; ia < MM; ++ia) t[ia] = flip8(_mm256_loadu_ps(x + ia * p + j), signs[(ia * p + j) / 8]);
  for (int64_t ja = ja0; ja < ja1; ++ja) {
    __m256 acc = _mm256_mul_ps(_mm256_broadcast_ss(A + ja), t[0]);
    for (int ia = 1; ia < MM; ++ia) acc = _mm256_fmadd_ps(_mm256_broadcast_ss(A + ia * MM + ja), t[ia], acc);
    _mm256_storeu_ps(y + ja * p + j, acc);
  }
}

// One row: y (n = m p) = ((x * signs) kron(A, S_p)), A (m, m) row-major with 1/sqrt(n) folded in; only the output
// rows [ja0, ja1) of Y (m, p) (a share of one row's work for a thread). y must not alias x.
inline void hadamard_row(const float* x, const uint8_t* signs, const float* A, int64_t m, int64_t p, float* y, int64_t ja0 = 0,
                         int64_t ja1 = -1) {
  ja1 = ja1 < 0 ? m : ja1;
  if ((m == 12 || m == 1) && p % 8 == 0) {
    for (int64_t j = 0; j < p; j += 8)
      m == 12 ? mix_block<12>(x, signs, A, p, j, ja0, ja1, y) : mix_block<1>(x, signs, A, p, j, ja0, ja1, y);
  } else {  // other orders (m = 144, or p < 8: widths no model here rotates), plainly
    std::fill(y + ja0 * p, y + ja1 * p, 0.0f);
    for (int64_t ia = 0; ia < m; ++ia)  // y[ja, :] += A[ia, ja] * (x * signs)[ia, :]
      for (int64_t j = 0; j < p; ++j)
        for (int64_t ja = ja0; ja < ja1; ++ja) y[ja * p + j] += A[ia * m + ja] * (sign_bit(signs, ia * p + j) ? -x[ia * p + j] : x[ia * p + j]);
  }
  for (int64_t ja = ja0; ja < ja1; ++ja) fwht(y + ja * p, p);
}

// A projection's input rotation resolved to raw pointers (the caller keeps the tensors alive); signs == nullptr: none.
struct InputRotation {
  const uint8_t* signs = nullptr;
  const float* block = nullptr;
  int64_t m = 0, p = 0;
};

// Check and resolve (sign bits (ceil(n / 8),) uint8, block (m, m) fp32), contiguous, for inputs of width n.
InputRotation input_rotation(const at::Tensor& signs, const at::Tensor& block, int64_t n);

// y (..., n) = rows of x (..., n) through R, x fp32.
at::Tensor hadamard_rows(const at::Tensor& x, const at::Tensor& signs, const at::Tensor& block);

}  // namespace pippin
