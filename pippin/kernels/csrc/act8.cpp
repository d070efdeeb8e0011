// The act8 kernels: activation quantization, the int8 row kernels (act8_rows.inc, compiled for AVX2 and for
// AVX-512 VNNI) and their dispatch, lut_gemv_act8, act8_multi and gemv_i8_act8.
#include "act8.h"

namespace pippin {

inline int32_t hsum_i32(__m256i acc) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  s = _mm_hadd_epi32(s, s);
  s = _mm_hadd_epi32(s, s);
  return _mm_cvtsi128_si32(s);
}

// 64 activations (one block at r) -> 64 int8 in natural order at t (q = nearbyint(r / s) with s = absmax / 63: an IEEE
// division and round-half-even, exactly as the scalar std::nearbyint(r / s) and torch.round(x / scale) of the
// reference); returns sum(q) and sets s. Eight lanes at a time: the scalar loop (a division and a rounding call per
// activation) cost as much as a 576 -> 1536 layer's dot products at 42 rows.
inline int32_t quantize_block(const float* r, int8_t* t, float& s) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 v[8], mx8 = _mm256_setzero_ps();
  for (int k = 0; k < 8; ++k) v[k] = _mm256_loadu_ps(r + 8 * k), mx8 = _mm256_max_ps(mx8, _mm256_and_ps(v[k], abs_mask));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx8), _mm256_extractf128_ps(mx8, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  s = std::max(_mm_cvtss_f32(m4), 1e-12f) / 63.0f;
  const __m256 sv = _mm256_set1_ps(s);
  __m256i q[8], sum = _mm256_setzero_si256();
  for (int k = 0; k < 8; ++k) {
    q[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(v[k], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    sum = _mm256_add_epi32(sum, q[k]);
  }
  // packs interleave 128-bit lanes: [q0 q1 q2 q3 lanes 0-3 | lanes 4-7]; the dword permute restores the order.
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int h = 0; h < 2; ++h) {
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[4 * h], q[4 * h + 1]), _mm256_packs_epi32(q[4 * h + 2], q[4 * h + 3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + 32 * h), _mm256_permutevar8x32_epi32(b, perm));
  }
  return hsum_i32(sum);
}

// Quantize x (M, K) fp32 into q / scale / shift (caller's buffers) for the given bit width's index order.
void quantize_act8_into(const float* xp, int64_t M, int64_t K, int64_t bits, int8_t* qp, float* sp, float* shift_out) {
  const int64_t nb = K / ACT8_BLOCK, blk = act8_block(bits);
  int order[64];
  for (int q = 0; q < blk; ++q) order[q] = act8_order(bits, q);
  // 4-bit order (even activations of the block, then odd): bytes split into evens | odds per 128-bit lane, then the
  // 64-bit quarters gathered across the two registers.
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11,
                                         13, 15);
  alignas(32) int8_t t[ACT8_BLOCK];
  for (int64_t m = 0; m < M; ++m) {
    double shift = 0;
    for (int64_t b = 0; b < nb; ++b) {
      int8_t* qb = qp + m * K + b * ACT8_BLOCK;
      float s;
      const int32_t sum = quantize_block(xp + m * K + b * ACT8_BLOCK, bits == 8 ? qb : t, s);
      if (bits == 4) {
        const __m256i lo = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(t)), split), 0xD8);
        const __m256i hi = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(t + 32)), split), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + 32), _mm256_permute2x128_si256(lo, hi, 0x31));
      } else if (bits != 8) {
        for (int64_t k0 = 0; k0 < ACT8_BLOCK; k0 += blk)
          for (int q = 0; q < blk; ++q) qb[k0 + q] = t[k0 + order[q]];
      }
      sp[m * nb + b] = s;
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
  // Rows are independent: a prefill's 512 rows are quantized on all threads (a few rows stay on this one).
  at::parallel_for(0, M, 32, [&](int64_t m0, int64_t m1) {
    quantize_act8_into(x.data_ptr<float>() + m0 * K, m1 - m0, K, bits, a.q.data_ptr<int8_t>() + m0 * K,
                       a.scale.data_ptr<float>() + m0 * (K / ACT8_BLOCK), a.shift.data() + m0);
  });
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
void act8_rows(const Act8View& a, const uint8_t* packed, const int8_t* luts, const float* lsc, float* y, int64_t ldy, int64_t M,
               int64_t K, int64_t group, int64_t n0, int64_t n1) {
  // VNNI for batched rows (prefill, several decode rows): on an AMD EPYC (Zen 4) its 8 x 2 tiles run a 512-row
  // 576 -> 1536 layer in half the AVX2 tiles' time (1.9 against 3.7 ms). One row (batch-1 decode) stays on AVX2 there:
  // its vpdpbusd chain measured 10-15 % slower than maddubs + madd on that core.
  if (M > 1 && g_vnni.load(std::memory_order_relaxed)) {
    vnni::act8_rows<BITS>(a, packed, luts, lsc, y, ldy, M, K, group, n0, n1);
    _mm256_zeroupper();  // leave no dirty upper vector state behind for the AVX2 and SSE code that follows
  } else {
    avx2::act8_rows<BITS>(a, packed, luts, lsc, y, ldy, M, K, group, n0, n1);
  }
}

template void act8_rows<2>(const Act8View&, const uint8_t*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t);
template void act8_rows<3>(const Act8View&, const uint8_t*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t);
template void act8_rows<4>(const Act8View&, const uint8_t*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t);
template void act8_rows<8>(const Act8View&, const uint8_t*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                           int64_t, int64_t);

std::string kernel_variant() { return g_vnni.load() ? "avx512-vnni" : "avx2-fma"; }  // avx512-vnni: for batched rows

void set_kernel_variant(const std::string& name) {
  TORCH_CHECK(name == "avx2-fma" || name == "avx512-vnni", "kernel variant must be avx2-fma or avx512-vnni, got ", name);
  TORCH_CHECK(name == "avx2-fma" || cpu_has_vnni(), "this CPU has no AVX-512 VNNI");
  g_vnni.store(name == "avx512-vnni");
}

Act8Proj act8_proj(const at::Tensor& packed, const at::Tensor& lut_i8, const at::Tensor& lut_scale, int64_t bits, int64_t group, int64_t K) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "lut_gemv_act8: bits must be 2, 3, 4 or 8 (expanded)");
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte, "lut_gemv_act8: packed must be contiguous uint8");
  const int64_t N = packed.size(0);
  TORCH_CHECK(packed.size(1) * 8 / bits == K && K % ACT8_BLOCK == 0, "lut_gemv_act8: K must be a multiple of 64 and match x");
  TORCH_CHECK(bits == 8 || (lut_i8.scalar_type() == at::kChar && lut_i8.dim() == 2 && lut_i8.size(1) == 16 && lut_i8.size(0) * group == N),
              "lut_gemv_act8: LUT must be int8 (N / group, 16)");
  TORCH_CHECK(group > 0 && N % group == 0 && (lut_scale.numel() == N / group || lut_scale.numel() == N),
              "lut_gemv_act8: one output scale per group or per row");
  auto scale = lut_scale.to(at::kFloat).reshape({-1});
  scale = scale.numel() == N ? scale.contiguous() : scale.repeat_interleave(group).contiguous();
  return {packed, lut_i8.contiguous(), scale, bits, group, N};
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

}  // namespace pippin
