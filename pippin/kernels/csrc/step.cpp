#include "step.h"
#include "act8.h"
#include "attention.h"
#include "hadamard.h"
#include "lut.h"
#include "matvec.h"

namespace pippin {

// ---- a whole decode step in one parallel region -------------------------------------------------------
// With one token per row the matvecs are short (tens of microseconds), and a fork/join per projection plus
// the serial work between them (norms, RoPE, residuals, allocations) left the second core idle for about a
// third of a step. The fused step below opens one OpenMP region for all layers: every phase splits its rows
// (or attention heads) statically over the threads and ends in a barrier; the tiny per-row work (RMSNorm,
// activation quantization) is done by every thread into its own buffers, which saves a barrier; nothing is
// allocated inside. Each phase calls the same row kernels as the per-projection ops, so it equals them.

// One thread's quantized copies of a phase's input, one per act8 bit width (2, 3, 4, 8), made on first use.
struct ActBufs {
  int64_t M = 0, K = 0;
  std::vector<int8_t> q;
  std::vector<float> scale, shift;
  bool ready[4] = {false, false, false, false};
  ActBufs(int64_t m, int64_t kmax) : M(m), K(kmax), q(4 * m * kmax), scale(4 * m * (kmax / ACT8_BLOCK + 1)), shift(4 * m) {}
  static int slot(int64_t bits) { return bits == 2 ? 0 : bits == 3 ? 1 : bits == 4 ? 2 : 3; }
  void reset() { std::fill(ready, ready + 4, false); }
  // once: x is a projection's own rotated input, quantized for it alone (the slot then holds no phase input).
  Act8View get(const StepProj& p, const float* x, bool once = false) {
    if (p.kind != 4) return {nullptr, nullptr, nullptr};
    const int i = slot(p.bits);
    int8_t* qp = q.data() + i * M * K;
    float* sp = scale.data() + i * M * (K / ACT8_BLOCK + 1);
    float* hp = shift.data() + i * M;
    if (!ready[i] || once) quantize_act8_into(x, M, p.K, p.bits, qp, sp, hp), ready[i] = !once;
    return {qp, sp, hp};
  }
};

// Rows [n0, n1) of y (M rows, stride ldy) = x (M, K) @ W^T for one projection (a: x quantized for it, act8).
inline void proj_rows(const StepProj& p, const float* x, const Act8View& a, float* y, int64_t ldy, int64_t M, int64_t n0, int64_t n1) {
  if (n0 >= n1) return;
  const uint8_t* pk = static_cast<const uint8_t*>(p.w);
  switch (p.kind) {
    case 0: gemv_rows(x, static_cast<const float*>(p.w), y, M, ldy, p.K, n0, n1); return;
    case 1: gemv_rows(x, static_cast<const c10::Half*>(p.w), y, M, ldy, p.K, n0, n1); return;
    case 2: gemv_rows(x, static_cast<const c10::BFloat16*>(p.w), y, M, ldy, p.K, n0, n1); return;
    case 3:
      switch (p.bits) {
        case 2: lut_rows<2>(x, pk, p.lut32, y, ldy, M, p.N, p.K, p.group, n0, n1, p.lscale); return;
        case 3: lut_rows<3>(x, pk, p.lut32, y, ldy, M, p.N, p.K, p.group, n0, n1, p.lscale); return;
        case 4: lut_rows<4>(x, pk, p.lut32, y, ldy, M, p.N, p.K, p.group, n0, n1, p.lscale); return;
        case 6: lut_rows<6>(x, pk, p.lut32, y, ldy, M, p.N, p.K, p.group, n0, n1, p.lscale); return;
        default: lut_rows<8>(x, pk, p.lut32, y, ldy, M, p.N, p.K, p.group, n0, n1, p.lscale); return;
      }
    default:
      switch (p.bits) {
        case 2: act8_rows<2>(a, pk, p.lut8, p.lscale, y, ldy, M, p.K, p.group, n0, n1); return;
        case 3: act8_rows<3>(a, pk, p.lut8, p.lscale, y, ldy, M, p.K, p.group, n0, n1); return;
        case 4: act8_rows<4>(a, pk, p.lut8, p.lscale, y, ldy, M, p.K, p.group, n0, n1); return;
        default: act8_rows<8>(a, pk, p.lut8, p.lscale, y, ldy, M, p.K, p.group, n0, n1); return;
      }
  }
}

// Resolve a projection for the fused step; kind -1 if the step cannot run it (the per-block path then does).
StepProj step_proj(const at::Tensor& w, const Opt& lut, const Opt& lut_scale, int64_t bits, int64_t group, std::vector<at::Tensor>& keep) {
  StepProj p;
  p.bits = bits, p.group = std::max<int64_t>(group, 1);
  if (w.dim() != 2 || !w.is_contiguous()) return p;
  if (bits == 0) {
    p.N = w.size(0), p.K = w.size(1), p.w = w.data_ptr();
    p.kind = w.scalar_type() == at::kFloat ? 0 : w.scalar_type() == at::kHalf ? 1 : w.scalar_type() == at::kBFloat16 ? 2 : -1;
    return p;
  }
  if (w.scalar_type() != at::kByte || !lut.has_value()) return p;
  p.N = w.size(0), p.K = w.size(1) * 8 / bits, p.w = w.data_ptr();
  if (p.N % p.group != 0) return p;
  // Output scales, one per row (act8's per-group LUT scales are repeated): act8's own, or an fp32 LUT's row scales.
  if (lut_scale.has_value()) {
    if (lut_scale->numel() != p.N && lut_scale->numel() != p.N / p.group) return p;
    auto s = lut_scale->to(at::kFloat).reshape({-1});
    keep.push_back(s.numel() == p.N ? s.contiguous() : s.repeat_interleave(p.group).contiguous());
    p.lscale = keep.back().data_ptr<float>();
  }
  if (lut->scalar_type() == at::kChar) {  // act8: an int8 LUT
    if (!(bits == 2 || bits == 3 || bits == 4 || bits == 8) || p.K % ACT8_BLOCK != 0 || p.lscale == nullptr) return p;
    if (bits != 8 && !(lut->is_contiguous() && lut->dim() == 2 && lut->size(1) == 16 && lut->size(0) * p.group == p.N)) return p;
    p.lut8 = bits == 8 ? nullptr : lut->data_ptr<int8_t>();
    p.kind = 4;
    return p;
  }
  if (!(bits == 2 || bits == 3 || bits == 4 || bits == 6 || bits == 8) || p.K % 8 != 0 || lut->dim() != 2 || lut->size(0) * p.group != p.N ||
      lut->size(1) != (int64_t(1) << bits))
    return p;
  keep.push_back(lut->to(at::kFloat).contiguous());
  p.lut32 = keep.back().data_ptr<float>();
  p.kind = 3;
  return p;
}

// Contiguous but for dim 1 (rows): the first rows of a contiguous (L, B_max, ...) buffer.
bool row_prefix(const at::Tensor& t) {
  int64_t expect = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expect) return false;
    expect *= t.size(d);
  }
  return t.dim() < 1 || t.size(0) == 1 || t.stride(0) >= expect;
}

// A spinning barrier for the fused step's phases. libgomp's own barrier spins only 100 rounds before sleeping in the
// kernel once it manages more threads than the machine has cores, which any second thread that ever ran a parallel
// region brings about (the server's worker next to the main thread): every phase then paid a futex wake-up, and a
// decode step ran 25-35 % slower on the server's thread than on the main one. This one spins (pausing), and yields
// the core after a while so an oversubscribed machine still makes progress.
struct SpinBarrier {
  alignas(64) std::atomic<int> arrived{0};  // on its own cache line: the waiters spin on `phase` undisturbed
  alignas(64) std::atomic<int> phase{0};

  void wait(int n) {
    if (n <= 1) return;
    const int p = phase.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      arrived.store(0, std::memory_order_relaxed);
      phase.store(p + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; phase.load(std::memory_order_acquire) == p;) {
      _mm_pause();
      if (++spins == 1 << 14) spins = 0, std::this_thread::yield();
    }
  }
};

DecodePlan::DecodePlan(std::vector<at::Tensor> attn_norms, std::vector<at::Tensor> mlp_norms, std::vector<at::Tensor> w,
                       c10::List<c10::optional<at::Tensor>> lut, c10::List<c10::optional<at::Tensor>> lut_scale, std::vector<int64_t> b,
                       std::vector<int64_t> group, int64_t heads, int64_t kv_heads, double norm_eps, c10::List<c10::optional<at::Tensor>> la,
                       c10::List<c10::optional<at::Tensor>> lb, c10::List<c10::optional<at::Tensor>> ls, c10::List<c10::optional<at::Tensor>> rs,
                       c10::List<c10::optional<at::Tensor>> rb)
    : norm1(std::move(attn_norms)), norm2(std::move(mlp_norms)), groups(std::move(group)), n_heads(heads), n_kv_heads(kv_heads), eps(norm_eps) {
  const size_t L = norm1.size();
  TORCH_CHECK(norm2.size() == L && groups.size() == L && w.size() == 7 * L && lut.size() == 7 * L && lut_scale.size() == 7 * L && b.size() == 7 * L,
              "DecodePlan: need 7 projections, LUTs, scales and bits per layer");
  TORCH_CHECK(la.size() == 7 * L && lb.size() == 7 * L && ls.size() == 7 * L, "DecodePlan: need 7 LoRA entries (or None) per layer");
  TORCH_CHECK(rs.size() == 7 * L && rb.size() == 7 * L, "DecodePlan: need 7 input rotations (or None) per layer");
  for (size_t l = 0; l < L; ++l) {
    Proj7 wl;
    std::array<int64_t, 7> bl;
    for (int i = 0; i < 7; ++i) wl[i] = w[7 * l + i], bl[i] = b[7 * l + i];
    weights.push_back(wl);
    bits.push_back(bl);
    luts.push_back(opt7(lut, 7 * l));
    scales.push_back(opt7(lut_scale, 7 * l));
    lora_a.push_back(opt7(la, 7 * l));
    lora_b.push_back(opt7(lb, 7 * l));
    lora_s.push_back(opt7(ls, 7 * l));
    rot_signs.push_back(opt7(rs, 7 * l));
    rot_blocks.push_back(opt7(rb, 7 * l));
    std::array<InputRotation, 7> rl;
    for (int i = 0; i < 7; ++i) {
      const Opt &S = rot_signs[l][i], &R = rot_blocks[l][i];
      TORCH_CHECK(S.has_value() == R.has_value(), "DecodePlan: an input rotation needs its signs and its block");
      if (!S.has_value()) continue;
      const int64_t K = bl[i] ? weights[l][i].size(1) * 8 / bl[i] : weights[l][i].size(1);  // K * bits / 8 bytes a row
      rl[i] = input_rotation(*S, *R, K);
      has_rot = true;
    }
    rot.push_back(rl);
  }
  // The fused step needs every projection on a row kernel, one model width, and q|k|v / gate|up sharing inputs.
  fused = L > 0;
  for (size_t l = 0; l < L && fused; ++l) {
    std::array<StepProj, 7> sp;
    for (int i = 0; i < 7; ++i) sp[i] = step_proj(weights[l][i], luts[l][i], scales[l][i], bits[l][i], groups[l], keep);
    const int64_t D = norm1[l].numel(), F = sp[4].N;
    fused = std::all_of(sp.begin(), sp.end(), [](const StepProj& p) { return p.kind >= 0; }) && sp[0].K == D && sp[1].K == D &&
            sp[2].K == D && sp[3].N == D && sp[4].K == D && sp[5].K == D && sp[5].N == F && sp[6].K == F && sp[6].N == D &&
            norm2[l].numel() == D && norm1[l].scalar_type() == at::kFloat && norm2[l].scalar_type() == at::kFloat &&
            norm1[l].is_contiguous() && norm2[l].is_contiguous() && sp[1].N == sp[2].N && sp[3].K == sp[0].N &&
            (l == 0 || (D == norm1[0].numel() && F == step[0][4].N && sp[0].N == step[0][0].N && sp[1].N == step[0][1].N));
    step.push_back(sp);
    for (const auto& p : sp) dense_fp32 |= p.kind == 0;
    std::array<StepLora, 7> lo;
    for (int i = 0; i < 7 && fused; ++i) {
      const Opt &A = lora_a[l][i], &B = lora_b[l][i], &S = lora_s[l][i];
      if (!A.has_value()) continue;
      has_lora = true;
      const bool ok = B.has_value() && S.has_value() && A->scalar_type() == at::kHalf && B->scalar_type() == at::kHalf && A->dim() == 3 &&
                      B->dim() == 3 && A->stride(2) == 1 && A->stride(1) == A->size(2) && B->stride(2) == 1 && B->stride(1) == B->size(2) &&
                      A->size(2) == sp[i].K && B->size(1) == sp[i].N && B->size(2) == A->size(1) && B->size(0) == A->size(0) &&
                      S->scalar_type() == at::kFloat && S->is_contiguous() && S->numel() == A->size(0) &&
                      (lora_slots == 0 || (A->size(0) == lora_slots && A->size(1) == lora_rank));
      if (!ok) {
        lora_ok = false;
        continue;
      }
      lora_slots = A->size(0), lora_rank = A->size(1);
      lo[i] = {A->data_ptr<c10::Half>(), B->data_ptr<c10::Half>(), S->data_ptr<float>(), A->size(0), A->size(1), A->stride(0), B->stride(0)};
    }
    lora.push_back(lo);
  }
  lora_ok = lora_ok && fused;
}

// One token per row through every layer in one parallel region (see "a whole decode step" above). slot: each
// row's LoRA slot (empty: no adapter).
template <typename KT>
at::Tensor DecodePlan::fused_step(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, const at::Tensor& k, const at::Tensor& v,
                                  const std::vector<int64_t>& starts, const Opt& k_scale, const Opt& v_scale, const std::vector<int64_t>& slot) {
  auto x = x_in.to(at::kFloat).contiguous().clone();
  auto cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  const int64_t L = int64_t(step.size()), M = x.size(0), Dm = norm1[0].numel(), H = n_heads, Hkv = n_kv_heads;
  const int64_t hd = k.size(4), S_max = k.size(3), Wq = step[0][0].N, Wk = step[0][1].N, W = Wq + 2 * Wk, F = step[0][4].N;
  TORCH_CHECK(x.numel() == M * Dm && Wq == H * hd && Wk == Hkv * hd && cos.numel() == M * hd && sin.numel() == M * hd,
              "DecodePlan: x must be (B, 1, dim) and cos / sin (B, 1, head_dim) for this model");
  const int64_t Kmax = std::max({Dm, Wq, F});
  const bool use_lora = !slot.empty();
  std::vector<float> qkv(M * W), attn(M * Wq), tmp(M * Dm), gu(M * 2 * F), act(M * F), lh(use_lora ? 7 * M * lora_rank : 0);
  std::vector<float> rot_rows(has_rot ? M * std::max(Wq, F) : 0);  // o / down inputs rotated, split over the threads
  float* xp = x.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  KT *kc = k.data_ptr<KT>(), *vc = v.data_ptr<KT>();
  float* ksc = k_scale.has_value() ? k_scale->data_ptr<float>() : nullptr;
  float* vsc = v_scale.has_value() ? v_scale->data_ptr<float>() : nullptr;
  const int64_t layer_kv = k.stride(0) / hd;  // slots per layer: the buffer's rows may outnumber the step's
  const int threads = at::in_parallel_region() ? 1 : int(at::get_num_threads());
  SpinBarrier bar;
#pragma omp parallel num_threads(threads)
  {
    const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<float> h(M * Kmax), p(S_max), rx(has_rot ? M * Kmax : 0);
    ActBufs ab(M, Kmax);
    // Projection j's input: `in` (M rows of width K), or its rotation into this thread's own buffer (every thread
    // rotates all rows, as it normalizes and quantizes them; with several rows the o- and down-projections split the
    // work over the threads instead, at the price of a barrier: a row of 1536 takes 1.4 us, and a barrier in a
    // one-row step cost more than the half row it saved on a busy machine).
    auto rotated = [&](const InputRotation& r, const float* in, int64_t K) -> const float* {
      if (r.signs == nullptr) return in;
      for (int64_t m = 0; m < M; ++m) hadamard_row(in + m * K, r.signs, r.block, r.m, r.p, rx.data() + m * K);
      return rx.data();
    };
    // The adapters' A x of projections js (input x, width K), split over the threads; a barrier when any ran.
    auto lora_phase = [&](const std::array<StepLora, 7>& lo, std::initializer_list<int> js, const float* in, int64_t K) {
      if (!use_lora) return;
      bool any = false;
      for (int j : js) {
        if (lo[j].A == nullptr) continue;
        any = true;
        const auto [a, b] = share(M * lo[j].r, nt, tid, 1);
        lora_down(lo[j], slot.data(), in, K, lh.data() + j * M * lora_rank, a, b);
      }
      if (any) {
        bar.wait(int(nt));
      }
    };
    auto lora_rows = [&](const StepLora& lo, int j, float* y, int64_t ldy, int64_t n0, int64_t n1) {
      if (use_lora && lo.A != nullptr && n0 < n1) lora_up(lo, slot.data(), lh.data() + j * M * lora_rank, y, ldy, M, n0, n1);
    };
    // x += in @ W_j^T (+ its adapter, on the unrotated input), each thread on its own output rows: the o- and
    // down-projections.
    auto residual = [&](const std::array<StepProj, 7>& P, const std::array<StepLora, 7>& LO, const std::array<InputRotation, 7>& R, int j,
                        const float* in, int64_t K) {
      ab.reset();
      lora_phase(LO, {j}, in, K);
      const auto [a, b] = share(Dm, nt, tid, 2);
      const float* pin = in;
      if (R[j].signs != nullptr && nt > 1 && M > 1) {  // each thread its share of the M x m output rows (of p), for all
        const InputRotation& r = R[j];
        const auto [u0, u1] = share(M * r.m, nt, tid, 1);
        for (int64_t u = u0; u < u1;) {
          const int64_t row = u / r.m, ja0 = u % r.m, ja1 = std::min(r.m, ja0 + u1 - u);
          hadamard_row(in + row * K, r.signs, r.block, r.m, r.p, rot_rows.data() + row * K, ja0, ja1);
          u += ja1 - ja0;
        }
        bar.wait(int(nt));
        pin = rot_rows.data();
      } else {
        pin = rotated(R[j], in, K);
      }
      proj_rows(P[j], pin, ab.get(P[j], pin, pin != in), tmp.data(), Dm, M, a, b);
      lora_rows(LO[j], j, tmp.data(), Dm, a, b);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = a; n < b; ++n) xp[m * Dm + n] += tmp[m * Dm + n];
    };
    for (int64_t l = 0; l < L; ++l) {
      const auto& P = step[l];
      const auto& LO = lora[l];
      const auto& RO = rot[l];
      // q | k | v from the normed input
      for (int64_t m = 0; m < M; ++m) rms_norm_row(xp + m * Dm, norm1[l].data_ptr<float>(), h.data() + m * Dm, Dm, eps);
      ab.reset();
      lora_phase(LO, {0, 1, 2}, h.data(), Dm);
      {
        const auto [a, b] = share(W, nt, tid, 2);
        const int64_t off[4] = {0, Wq, Wq + Wk, W};
        for (int j = 0; j < 3; ++j) {
          const int64_t n0 = std::max(a, off[j]) - off[j], n1 = std::min(b, off[j + 1]) - off[j];
          if (n0 >= n1) continue;
          const float* in = rotated(RO[j], h.data(), Dm);
          proj_rows(P[j], in, ab.get(P[j], in, in != h.data()), qkv.data() + off[j], W, M, n0, n1);
          lora_rows(LO[j], j, qkv.data() + off[j], W, n0, n1);
        }
      }
      bar.wait(int(nt));
      // RoPE on q and k heads; each k / v head into its cache slot
      {
        const auto [a, b] = share(M * (H + Hkv), nt, tid, 1);
        for (int64_t u = a; u < b; ++u) {
          const int64_t m = u / (H + Hkv), hh = u % (H + Hkv), half = hd / 2;
          float* hv = qkv.data() + m * W + hh * hd;
          const float *c = cp + m * hd, *sn = snp + m * hd;
          for (int64_t i = 0; i < half; ++i) {
            const float a0 = hv[i], b0 = hv[i + half];
            hv[i] = a0 * c[i] - b0 * sn[i];
            hv[i + half] = b0 * c[i + half] + a0 * sn[i + half];
          }
          if (hh < H) continue;
          const int64_t g = hh - H, cs = l * layer_kv + (m * Hkv + g) * S_max + starts[m];
          const float* vv = hv + Hkv * hd;
          if constexpr (std::is_same_v<KT, int8_t>) {
            store_kv8(hv, hd, kc + cs * hd, ksc + cs);
            store_kv8(vv, hd, vc + cs * hd, vsc + cs);
          } else {
            std::copy(hv, hv + hd, kc + cs * hd);
            std::copy(vv, vv + hd, vc + cs * hd);
          }
        }
      }
      bar.wait(int(nt));
      {
        const auto [a, b] = share(M * H, nt, tid, 1);
        attend_units<KT>(qkv.data(), W, kc + l * layer_kv * hd, vc + l * layer_kv * hd, ksc ? ksc + l * layer_kv : nullptr,
                         vsc ? vsc + l * layer_kv : nullptr, attn.data(), starts.data(), 1, H, Hkv, hd, S_max, p.data(), a, b);
      }
      bar.wait(int(nt));
      residual(P, LO, RO, 3, attn.data(), Wq);
      bar.wait(int(nt));
      // SwiGLU: gate and up rows of the same features on the same thread, then silu(gate) * up there
      for (int64_t m = 0; m < M; ++m) rms_norm_row(xp + m * Dm, norm2[l].data_ptr<float>(), h.data() + m * Dm, Dm, eps);
      ab.reset();
      lora_phase(LO, {4, 5}, h.data(), Dm);
      {
        const auto [a, b] = share(F, nt, tid, 2);
        for (int j = 4; j < 6 && a < b; ++j) {
          const float* in = rotated(RO[j], h.data(), Dm);
          proj_rows(P[j], in, ab.get(P[j], in, in != h.data()), gu.data() + (j - 4) * F, 2 * F, M, a, b);
        }
        lora_rows(LO[4], 4, gu.data(), 2 * F, a, b);
        lora_rows(LO[5], 5, gu.data() + F, 2 * F, a, b);
        for (int64_t m = 0; m < M; ++m) silu_mul_range(gu.data() + m * 2 * F, gu.data() + m * 2 * F + F, act.data() + m * F, a, b);
      }
      bar.wait(int(nt));
      residual(P, LO, RO, 6, act.data(), F);
      bar.wait(int(nt));
    }
  }
  return x.view(x_in.sizes());
}

at::Tensor DecodePlan::forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k, const at::Tensor& v, int64_t start,
                               const c10::optional<at::Tensor>& row_starts, const c10::optional<at::Tensor>& k_scale,
                               const c10::optional<at::Tensor>& v_scale, const c10::optional<at::Tensor>& lora_idx) {
  const int64_t L = int64_t(norm1.size());
  TORCH_CHECK(k.dim() == 5 && k.size(0) == L && v.sizes() == k.sizes(), "DecodePlan: the cache must be (L, B, H_kv, S, D) for k and v");
  const bool kv8 = k_scale.has_value() && v_scale.has_value();
  const int64_t B = x.size(0);
  // Each row's adapter slot: idx (n,) with n dividing the rows (one slot for all rows when n = 1).
  std::vector<int64_t> slot;
  if (lora_idx.has_value()) {
    TORCH_CHECK(has_lora && lora_ok, "DecodePlan: built without usable LoRA slots, so it cannot route adapters");
    auto idx = lora_idx->contiguous();
    TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.numel() > 0 && B % idx.numel() == 0,
                "DecodePlan: lora_idx must be int64 (n,) with n dividing the rows");
    const int64_t per = B / idx.numel();
    for (int64_t m = 0; m < B; ++m) {
      const int64_t s = idx.data_ptr<int64_t>()[m / per];
      TORCH_CHECK(s >= 0 && s < lora_slots, "DecodePlan: adapter slot ", s, " out of range (", lora_slots, " slots)");
      slot.push_back(s);
    }
  }
  // One token per row: the fused step (from 8 rows a dense fp32 projection is faster as a GEMM: the per-block path).
  if (fused && x.dim() == 3 && x.size(1) == 1 && B <= 16 && !(dense_fp32 && B >= 8)) {
    // The first B rows of a bigger (L, B_max, H_kv, S, D) buffer are fine: a continuously batched cache runs its
    // rows in use; each row's slots stay contiguous and layers are k.stride(0) apart.
    TORCH_CHECK(k.size(1) == B && row_prefix(k) && row_prefix(v) && v.strides() == k.strides() &&
                    (k.scalar_type() == at::kFloat || k.scalar_type() == at::kChar) && v.scalar_type() == k.scalar_type(),
                "DecodePlan: the cache must be fp32 or int8 (L, B, H_kv, S, D), contiguous but for its row count");
    TORCH_CHECK(k.size(2) == n_kv_heads, "DecodePlan: the cache has ", k.size(2), " kv heads, the model ", n_kv_heads);
    const bool int8 = k.scalar_type() == at::kChar;
    TORCH_CHECK(!int8 || (kv8 && row_prefix(*k_scale) && v_scale->strides() == k_scale->strides() && k_scale->stride(0) * k.size(4) == k.stride(0) &&
                          k_scale->scalar_type() == at::kFloat && v_scale->scalar_type() == at::kFloat &&
                          k_scale->sizes() == k.sizes().slice(0, 4) && v_scale->sizes() == k_scale->sizes()),
                "DecodePlan: an int8 cache needs fp32 scales (L, B, H_kv, S) for k and v laid out as the cache");
    std::vector<int64_t> starts(B, start);
    if (row_starts.has_value()) {
      TORCH_CHECK(row_starts->scalar_type() == at::kLong && row_starts->numel() == B, "DecodePlan: row_starts must be int64 (B,)");
      auto rs = row_starts->contiguous();
      std::copy(rs.data_ptr<int64_t>(), rs.data_ptr<int64_t>() + B, starts.begin());
    }
    for (int64_t b = 0; b < B; ++b) TORCH_CHECK(starts[b] >= 0 && starts[b] + 1 <= k.size(3), "DecodePlan: cache overflow");
    return int8 ? fused_step<int8_t>(x, cos, sin, k, v, starts, k_scale, v_scale, slot)
                : fused_step<float>(x, cos, sin, k, v, starts, k_scale, v_scale, slot);
  }
  const bool lo = lora_idx.has_value();
  for (int64_t l = 0; l < L; ++l)
    x = decode_block_impl(x, norm1[l], norm2[l], weights[l], luts[l], scales[l], rot_signs[l], rot_blocks[l], bits[l], groups[l], cos, sin, k.select(0, l),
                          v.select(0, l), start, n_heads, n_kv_heads, eps, lo ? &lora_a[l] : nullptr, lo ? &lora_b[l] : nullptr,
                          lo ? &lora_s[l] : nullptr, lora_idx, row_starts, kv8 ? Opt(k_scale->select(0, l)) : c10::nullopt,
                          kv8 ? Opt(v_scale->select(0, l)) : c10::nullopt);
  return x;
}

}  // namespace pippin
