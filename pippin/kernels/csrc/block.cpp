// decode_block_impl: a whole decoder block for a few tokens per row (DecodePlan's path when the fused step does
// not apply: several tokens per row, speculative verification, batched fp32 rows).
#include "block.h"
#include "act8.h"
#include "attention.h"
#include "hadamard.h"
#include "lora.h"
#include "lut.h"
#include "matvec.h"

namespace pippin {

// One whole decoder block for a few tokens at a uniform cache offset (decode, speculative verify):
// pre-norm attention (q, k, v projections, RoPE, in-place KV-cache write, causal GQA attention over the
// cache, o-projection, residual), then the pre-norm SwiGLU MLP and residual. Each of the 7 projections
// [q, k, v, o, gate, up, down] is dense (bits 0: fp32/fp16/bf16 matvec) or palettized (bits > 0: packed
// indices + LUT, never dequantized; with an int8 LUT and its scale, the 4-bit x 8-bit-activation kernel), and may
// rotate its input first (rot_signs / rot_blocks: hadamard_rows; its LoRA reads the unrotated input). Replaces ~40
// eager ops per layer with one call; equals the module path (tested).
at::Tensor apply_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& lut,
                        const c10::optional<at::Tensor>& lut_scale, int64_t bits, int64_t group) {
  if (bits == 0) {
    // From 8 rows (batched decode) a blocked GEMM beats the row-streaming gemv for fp32 weights (measured:
    // 1.8 vs 3.6 ms for 16 x 576 -> 1536 on one core); the LUT paths stay ahead of dequantize + GEMM.
    if (w.scalar_type() == at::kFloat && x.numel() / x.size(-1) >= 8) return at::linear(x, w);
    return gemv(x, w);
  }
  TORCH_CHECK(lut.has_value(), "decode_block: a palettized projection needs its LUT");
  if (lut->scalar_type() == at::kChar) return lut_gemv_act8(x, w, *lut, *lut_scale, bits, group);  // int8 LUT: act8 path
  return lut_gemv(x, w, *lut, bits, group, lut_scale);  // fp32 LUT, with the row scales if any
}

at::Tensor decode_block_impl(const at::Tensor& x_in, const at::Tensor& attn_norm, const at::Tensor& mlp_norm, const Proj7& weights,
                             const Opt7& luts, const Opt7& lut_scales, const Opt7& rot_signs, const Opt7& rot_blocks,
                             const std::array<int64_t, 7>& bits, int64_t group,
                             const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache, int64_t start,
                             int64_t n_heads, int64_t n_kv_heads, double eps, const Opt7* lora_a, const Opt7* lora_b,
                             const Opt7* lora_scale, const Opt& lora_idx, const Opt& row_starts, const Opt& k_scale,
                             const Opt& v_scale) {
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
    const auto rin = rot_signs[i].has_value() ? hadamard_rows(in, *rot_signs[i], *rot_blocks[i]) : in;
    auto y = apply_linear(rin, weights[i], luts[i], lut_scales[i], bits[i], group);
    if (lora && (*lora_a)[i].has_value()) lora_add_(y, in, *(*lora_a)[i], *(*lora_b)[i], *(*lora_scale)[i], *lora_idx);
    return y;
  };
  // Projections that share an input run as one act8_multi call, straight into one buffer, when all are act8
  // and none has an adapter (lora_add_ wants each output on its own) or an input rotation (an input of its own).
  auto fusable = [&](std::initializer_list<int> idx) {
    for (int i : idx)
      if (!luts[i].has_value() || luts[i]->scalar_type() != at::kChar || !lut_scales[i].has_value() || (lora && (*lora_a)[i].has_value()) ||
          rot_signs[i].has_value())
        return false;
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

}  // namespace pippin
