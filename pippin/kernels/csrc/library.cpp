// The torch.ops.pippin registrations: the ops' schemas, their CPU implementations, and the DecodePlan class.
#include "act8.h"
#include "attention.h"
#include "hadamard.h"
#include "lora.h"
#include "lut.h"
#include "matvec.h"
#include "step.h"

using namespace pippin;

TORCH_LIBRARY(pippin, m) {
  m.def("gemv(Tensor x, Tensor w) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor g, Tensor u) -> Tensor");
  m.def("lut_gemv(Tensor x, Tensor packed, Tensor lut, int bits, int group, Tensor? row_scale=None) -> Tensor");
  m.def("lut_dequant(Tensor packed, Tensor lut, int bits, int group) -> Tensor");
  m.def("gemv_i8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("gemv_i8_act8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("lut_gemv_act8(Tensor x, Tensor packed, Tensor lut_i8, Tensor lut_scale, int bits, int group) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin, int n_heads, int head_dim) -> ()");
  m.def("hadamard_rows(Tensor x, Tensor sign_bits, Tensor block) -> Tensor");
  m.def("lora_add_(Tensor(a!) y, Tensor x, Tensor A, Tensor B, Tensor scale, Tensor idx) -> ()");
  m.def("kernel_variant", &kernel_variant);
  m.def("set_kernel_variant", &set_kernel_variant);
  m.def("cpu_has_vnni", &cpu_has_vnni);
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, c10::List<c10::optional<at::Tensor>>,
                       c10::List<c10::optional<at::Tensor>>, std::vector<int64_t>, std::vector<int64_t>, int64_t, int64_t, double,
                       c10::List<c10::optional<at::Tensor>>, c10::List<c10::optional<at::Tensor>>, c10::List<c10::optional<at::Tensor>>,
                       c10::List<c10::optional<at::Tensor>>, c10::List<c10::optional<at::Tensor>>>())
      .def("forward", &DecodePlan::forward)
      .def("fused", [](const c10::intrusive_ptr<DecodePlan>& self) { return self->fused; })
      .def("routes_adapters", [](const c10::intrusive_ptr<DecodePlan>& self) { return self->has_lora && self->lora_ok; });
}

TORCH_LIBRARY_IMPL(pippin, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("lut_gemv", &lut_gemv);
  m.impl("lut_dequant", &lut_dequant);
  m.impl("gemv_i8", &gemv_i8);
  m.impl("gemv_i8_act8", &gemv_i8_act8);
  m.impl("lut_gemv_act8", &lut_gemv_act8);
  m.impl("rope_", &rope_);
  m.impl("hadamard_rows", &hadamard_rows);
  m.impl("lora_add_", &lora_add_);
}
