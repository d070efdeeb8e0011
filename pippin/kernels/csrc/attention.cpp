// rope_: rotate-half RoPE in place over the q and k heads of a fused q|k|v row.
#include "attention.h"

namespace pippin {

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

}  // namespace pippin
