// kernels/dispatch.cpp -- the Python binding of dispatch.cu (compiled just in time by kernels/__init__.py).
#include <torch/extension.h>

std::vector<torch::Tensor> build_index(torch::Tensor expert_index, torch::Tensor keep, int64_t num_experts);
torch::Tensor permute(torch::Tensor x, torch::Tensor src, int64_t k);
torch::Tensor combine(torch::Tensor rows, c10::optional<torch::Tensor> weights, torch::Tensor dest);
std::vector<torch::Tensor> combine_backward(torch::Tensor dy, torch::Tensor rows, torch::Tensor weights,
                                            torch::Tensor dest, torch::Tensor src);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_index", &build_index, "(expert_index (N,k), keep (N,k), E) -> dest (N,k), src (N*k), counts (E)");
  m.def("permute", &permute, "(x (N,H), src (N*k), k) -> rows (N*k, H): x[src // k], zeros where src < 0");
  m.def("combine", &combine, "(rows (M,H), weights (N,k) fp32 or None, dest (N,k)) -> sum_s w * rows[dest]");
  m.def("combine_backward", &combine_backward, "(dy, rows, weights, dest, src) -> d_rows, d_weights");
}
