// hadamard_rows: the online input rotation x -> x R of a palettized layer (hadamard.h), for any number of rows.
#include "hadamard.h"

namespace pippin {

InputRotation input_rotation(const at::Tensor& signs, const at::Tensor& block, int64_t n) {
  TORCH_CHECK(signs.scalar_type() == at::kByte && block.scalar_type() == at::kFloat && signs.is_contiguous() && block.is_contiguous(),
              "hadamard: the sign bits must be contiguous uint8 and the block contiguous fp32");
  const int64_t m = block.dim() == 2 ? block.size(0) : 0;
  TORCH_CHECK(signs.numel() == (n + 7) / 8 && m > 0 && block.size(1) == m && n % m == 0, "hadamard: need ", (n + 7) / 8,
              " bytes of sign bits and a square block whose order divides ", n);
  const int64_t p = n / m;
  TORCH_CHECK((p & (p - 1)) == 0, "hadamard: the width over the block's order must be a power of 2, got ", p);
  return {signs.data_ptr<uint8_t>(), block.data_ptr<float>(), m, p};
}

at::Tensor hadamard_rows(const at::Tensor& x_in, const at::Tensor& signs, const at::Tensor& block) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() >= 1, "hadamard_rows: x must be fp32 (..., n)");
  const auto x = x_in.contiguous();
  const int64_t n = x.size(-1), M = n > 0 ? x.numel() / n : 0;
  const InputRotation r = input_rotation(signs, block, n);
  auto y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) hadamard_row(xp + i * n, r.signs, r.block, r.m, r.p, yp + i * n);
  });
  return y;
}

}  // namespace pippin
