// Palettized weights x 8-bit activations (act8): the quantized activations, the row kernels' dispatch (act8.cpp,
// with act8_rows.inc) and the act8 ops.
#pragma once

#include "common.h"

namespace pippin {

// ---- palettized weights x 8-bit activations (act8) -------------------------------------------
// x is quantized per row in blocks of 64 to 7-bit integers in [-63, 63], one absmax scale per block (as
// llama.cpp's Q8 activations: a per-block scale keeps outliers from flattening a whole row), and each group's
// LUT (4, 8 or 16 entries) to int8 in [-127, 127] with one scale, padded to 16 bytes.
// The packed indices are read as stored (the bitstream of pippin/quant/pack.py): 4-bit rows 64 weights (32
// bytes) at a time, split into low and high nibbles; 2-bit rows 32 weights (8 bytes) by shifting 64-bit lanes;
// 3-bit rows 32 weights (12 bytes) by shuffling 16-bit windows into place and shifting them with a multiply.
// The 32 index bytes come out in an order fixed per bit width (act8_order), and x is quantized into that same
// order. One byte shuffle then looks up 32 weights in the LUT shifted by +128 (unsigned, as maddubs wants; with
// 7-bit x, 2 * 255 * 63 never saturates its int16 pairs), and maddubs + madd do the dot product of a block,
// which is scaled by its x scale into a float accumulator. The shift adds 128 * sum(x) to every output; that sum
// is taken once per row of x and subtracted.
// Wider palettes (6 and 8 bits: 64 or 256 entries, too many for one byte shuffle) come as "bits 8": the (N, K)
// uint8 matrix of their looked-up int8 LUT values + 128, built once per layer (PalettizedLinear.act8_weights).
// It costs a byte per weight in memory instead of 6 bits, and its block dot is two loads and maddubs.

// Weights per block: 4-bit rows are read 32 bytes (64 weights) at a time, 2- and 3-bit rows 32 weights.
constexpr int64_t act8_block(int64_t bits) { return bits == 4 ? 64 : 32; }  // 8: natural order, any block

// The position (within its block) of the weight whose index the kernel puts in byte q of its x block.
inline int act8_order(int64_t bits, int q) {
  if (bits == 8) return q;  // expanded weights: one byte each, in place
  if (bits == 4) return q < 32 ? 2 * q : 2 * (q - 32) + 1;  // low nibbles, then high nibbles
  if (bits == 2) return 4 * (q % 8) + q / 8;                // 64-bit lane L holds the pairs shifted by 2L
  return (q < 8 || q >= 24) ? q : (q < 16 ? q + 8 : q - 8);  // 3-bit: packus interleaves 128-bit lanes
}

constexpr int64_t ACT8_BLOCK = 64;  // activations per scale

// Quantized activations as the kernels read them: q (M, K) int8 in [-63, 63] in act8_order within each block,
// one fp32 scale per 64 activations (M, K / ACT8_BLOCK), and per row the 128 * sum over blocks of scale * sum(q)
// that the +128 LUT shift adds.
struct Act8View {
  const int8_t* q;
  const float* scale;
  const float* shift;
};

void quantize_act8_into(const float* xp, int64_t M, int64_t K, int64_t bits, int8_t* qp, float* sp, float* shift_out);

// Rows [n0, n1) of y (row stride ldy) = x @ W^T for 2-, 3-, 4-bit or expanded (8) act8 weights, on the kernel
// variant the CPU and set_kernel_variant pick (defined in act8.cpp for BITS 2, 3, 4 and 8). lsc holds one output
// scale per weight row (N,): its group's int8-LUT scale, times the row's own scale where the layer has row scales.
template <int BITS>
void act8_rows(const Act8View& a, const uint8_t* packed, const int8_t* luts, const float* lsc, float* y, int64_t ldy, int64_t M,
               int64_t K, int64_t group, int64_t n0, int64_t n1);

// One act8 projection: packed indices, its int8 LUT (G, 16) in [-127, 127] (entries past 2^bits unused) and the
// output scales, one per row (N,) (act8_proj also takes one per group, (G,), and repeats them); or, for bits 8, the
// expanded (N, K) uint8 weights (the LUT is not read). K % 64 == 0.
struct Act8Proj {
  at::Tensor packed, lut, scale;
  int64_t bits, group, N;
};

Act8Proj act8_proj(const at::Tensor& packed, const at::Tensor& lut_i8, const at::Tensor& lut_scale, int64_t bits, int64_t group, int64_t K);
void act8_multi(const at::Tensor& x, const std::vector<Act8Proj>& projs, float* y, int64_t ldy);
at::Tensor lut_gemv_act8(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& lut_i8,
                         const at::Tensor& lut_scale, int64_t bits, int64_t group);
at::Tensor gemv_i8_act8(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale_in);

bool cpu_has_vnni();
std::string kernel_variant();
void set_kernel_variant(const std::string& name);

}  // namespace pippin
