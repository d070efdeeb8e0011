// lora_add_: mixed-adapter batches in one call, every row its own LoRA slot.
#include "lora.h"

namespace pippin {

// y (M, N) += scale[s] * B[s] (A[s] x_m) with s = idx[m / (M / len(idx))]: every row its own LoRA slot.
// A (S, r, K) and B (S, N, r) are fp16 stacks (slot 0 is all-zero "no adapter" and is skipped via scale 0).
void lora_add_(at::Tensor y, const at::Tensor& x_in, const at::Tensor& A, const at::Tensor& Bw, const at::Tensor& scale,
               const at::Tensor& idx) {
  // Slots may be strided (views into one bank holding every module's slots); each slot's matrix is contiguous.
  TORCH_CHECK(A.scalar_type() == at::kHalf && Bw.scalar_type() == at::kHalf && A.dim() == 3 && Bw.dim() == 3 &&
                  A.stride(2) == 1 && A.stride(1) == A.size(2) && Bw.stride(2) == 1 && Bw.stride(1) == Bw.size(2),
              "lora_add_: A (S, r, K) and B (S, N, r) must be fp16 with contiguous rows per slot");
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && x_in.scalar_type() == at::kFloat,
              "lora_add_: x and y must be fp32 and y contiguous");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && idx.scalar_type() == at::kLong && idx.dim() == 1 &&
                  idx.numel() > 0,
              "lora_add_: scale must be contiguous fp32 (S,) and idx int64 (B,)");
  auto x = x_in.contiguous();
  const int64_t S = A.size(0), r = A.size(1), K = A.size(2), N = Bw.size(1), sA = A.stride(0), sB = Bw.stride(0);
  const int64_t M = x.numel() / K;
  TORCH_CHECK(x.size(-1) == K && Bw.size(0) == S && Bw.size(2) == r && scale.numel() == S && y.numel() == M * N,
              "lora_add_: shape mismatch");
  TORCH_CHECK(M % idx.numel() == 0, "lora_add_: rows must split evenly over idx");
  const int64_t per = M / idx.numel();
  auto idx_c = idx.contiguous();
  const int64_t* ip = idx_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < S, "lora_add_: slot index out of range");
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const c10::Half* Ap = A.data_ptr<c10::Half>();
  const c10::Half* Bp = Bw.data_ptr<c10::Half>();
  float* yp = y.data_ptr<float>();
  std::vector<int64_t> slot(M);
  for (int64_t m = 0; m < M; ++m) slot[m] = ip[m / per];
  const StepLora lo{Ap, Bp, sp, S, r, sA, sB};
  std::vector<float> h(M * r, 0.0f);
  at::parallel_for(0, M * r, 1, [&](int64_t i0, int64_t i1) { lora_down(lo, slot.data(), xp, K, h.data(), i0, i1); });  // h = A[s] x
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { lora_up(lo, slot.data(), h.data(), yp, N, M, n0, n1); });  // y += scale B[s] h
}

}  // namespace pippin
