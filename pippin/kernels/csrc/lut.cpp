// lut_gemv (palettized weights x fp32 activations, a few rows) and lut_dequant (W for the prefill path); the row
// kernels are in lut.h.
#include "lut.h"

namespace pippin {

at::Tensor lut_gemv(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& lut_in, int64_t bits, int64_t group,
                    const c10::optional<at::Tensor>& row_scale) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte, "lut_gemv: packed must be contiguous uint8 (N, K*bits/8)");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 6 || bits == 8, "lut_gemv: bits must be 2, 3, 4, 6 or 8");
  const int64_t N = packed.size(0), K = packed.size(1) * 8 / bits;
  TORCH_CHECK(K % 8 == 0 && x_in.size(-1) == K, "lut_gemv: x has ", x_in.size(-1), " features, weight has ", K);
  auto x = x_in.reshape({-1, K}).to(at::kFloat).contiguous();
  auto lut = lut_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  TORCH_CHECK(M <= 16, "lut_gemv: at most 16 rows (use the reference path for prefill)");
  TORCH_CHECK(lut.size(0) * group == N && lut.size(1) == (1 << bits), "lut_gemv: LUT shape does not match");
  TORCH_CHECK(!row_scale.has_value() || row_scale->numel() == N, "lut_gemv: one row scale per output row");
  const auto rs = row_scale.has_value() ? row_scale->to(at::kFloat).contiguous() : at::Tensor();
  const float* rp = rs.defined() ? rs.data_ptr<float>() : nullptr;
  auto sizes = x_in.sizes().vec();
  sizes.back() = N;
  auto y = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *lp = lut.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(16, 262144 / std::max<int64_t>(K * bits, 1));
  at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) {
    switch (bits) {
      case 2: lut_rows<2>(xp, pp, lp, yp, N, M, N, K, group, a, b, rp); break;
      case 3: lut_rows<3>(xp, pp, lp, yp, N, M, N, K, group, a, b, rp); break;
      case 4: lut_rows<4>(xp, pp, lp, yp, N, M, N, K, group, a, b, rp); break;
      case 6: lut_rows<6>(xp, pp, lp, yp, N, M, N, K, group, a, b, rp); break;
      case 8: lut_rows<8>(xp, pp, lp, yp, N, M, N, K, group, a, b, rp); break;
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

}  // namespace pippin
