// DecodePlan: every decoder block of a model for one decode step in one call (step.cpp).
#pragma once

#include "block.h"
#include "hadamard.h"
#include "lora.h"

namespace pippin {

// One projection resolved to raw pointers (the plan keeps its tensors alive).
struct StepProj {
  int kind = -1;  // 0 dense fp32, 1 dense fp16, 2 dense bf16, 3 LUT with fp32 table, 4 act8 (int8 LUT or expanded bytes)
  int64_t bits = 0, N = 0, K = 0, group = 1;
  const void* w = nullptr;
  const float* lut32 = nullptr;
  const int8_t* lut8 = nullptr;
  const float* lscale = nullptr;  // (N,) output scales: act8's (required), the fp32 LUT's row scales (optional)
};

// Every decoder block of a model for one decode step, in one call: the per-layer arguments of decode_block_impl
// (norms, 7 projections each, LUTs, bits, group, and the projections' LoRA slot banks) are handed over once and kept
// here, so a step costs one call from Python instead of one per layer with 30-odd arguments each. k and v are the
// cache's whole (L, B, H_kv, S, D) buffers. With one token per row every layer runs in one parallel region
// (fused_step); otherwise (speculative verification) block by block.
struct DecodePlan : torch::CustomClassHolder {
  std::vector<at::Tensor> norm1, norm2;
  std::vector<Proj7> weights;
  std::vector<Opt7> luts, scales, lora_a, lora_b, lora_s, rot_signs, rot_blocks;
  std::vector<std::array<int64_t, 7>> bits;
  std::vector<int64_t> groups;
  int64_t n_heads, n_kv_heads;
  double eps;
  std::vector<std::array<StepProj, 7>> step;
  std::vector<std::array<StepLora, 7>> lora;
  std::vector<std::array<InputRotation, 7>> rot;  // each projection's input rotation (signs == nullptr: none)
  std::vector<at::Tensor> keep;  // converted LUTs and scales the step's raw pointers point into
  bool fused = false, dense_fp32 = false, has_lora = false, lora_ok = true, has_rot = false;
  int64_t lora_slots = 0, lora_rank = 0;

  DecodePlan(std::vector<at::Tensor> attn_norms, std::vector<at::Tensor> mlp_norms, std::vector<at::Tensor> w,
             c10::List<c10::optional<at::Tensor>> lut, c10::List<c10::optional<at::Tensor>> lut_scale, std::vector<int64_t> b,
             std::vector<int64_t> group, int64_t heads, int64_t kv_heads, double norm_eps, c10::List<c10::optional<at::Tensor>> la,
             c10::List<c10::optional<at::Tensor>> lb, c10::List<c10::optional<at::Tensor>> ls, c10::List<c10::optional<at::Tensor>> rs,
             c10::List<c10::optional<at::Tensor>> rb);

  // One token per row through every layer in one parallel region (see "a whole decode step" in step.cpp). slot: each
  // row's LoRA slot (empty: no adapter).
  template <typename KT>
  at::Tensor fused_step(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, const at::Tensor& k, const at::Tensor& v,
                        const std::vector<int64_t>& starts, const Opt& k_scale, const Opt& v_scale, const std::vector<int64_t>& slot);

  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k, const at::Tensor& v, int64_t start,
                     const c10::optional<at::Tensor>& row_starts, const c10::optional<at::Tensor>& k_scale,
                     const c10::optional<at::Tensor>& v_scale, const c10::optional<at::Tensor>& lora_idx);
};

}  // namespace pippin
