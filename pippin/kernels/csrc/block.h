// One decoder block for a few tokens per row (block.cpp): DecodePlan's per-block path.
#pragma once

#include "common.h"

namespace pippin {

using Opt = c10::optional<at::Tensor>;
using Proj7 = std::array<at::Tensor, 7>;
using Opt7 = std::array<Opt, 7>;

// One whole decoder block (see block.cpp): the per-block path of DecodePlan::forward.
at::Tensor decode_block_impl(const at::Tensor& x_in, const at::Tensor& attn_norm, const at::Tensor& mlp_norm, const Proj7& weights,
                             const Opt7& luts, const Opt7& lut_scales, const Opt7& rot_signs, const Opt7& rot_blocks,
                             const std::array<int64_t, 7>& bits, int64_t group,
                             const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache, int64_t start,
                             int64_t n_heads, int64_t n_kv_heads, double eps, const Opt7* lora_a, const Opt7* lora_b,
                             const Opt7* lora_scale, const Opt& lora_idx, const Opt& row_starts, const Opt& k_scale = c10::nullopt,
                             const Opt& v_scale = c10::nullopt);

template <typename T>
Opt7 opt7(const c10::List<c10::optional<T>>& l, int64_t offset = 0) {
  Opt7 out;
  for (int i = 0; i < 7; ++i) out[i] = l.get(offset + i);
  return out;
}

}  // namespace pippin
