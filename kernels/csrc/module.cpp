// The Python module of loraplane's compiled CPU ops; each op lives in its own file.

#include <torch/extension.h>

#include <vector>

void add_lora(at::Tensor y, at::Tensor x, at::Tensor a, std::vector<at::Tensor> bs, at::Tensor ids,
              at::Tensor slots, at::Tensor starts, at::Tensor counts, at::Tensor ranks,
              c10::optional<at::Tensor> scale);
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor tables,
                                  at::Tensor positions, int64_t window, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // No Python object is touched inside: the GIL goes, so the server's event loop keeps running
  // while the engine thread is in a kernel.
  m.def("add_lora", &add_lora, py::call_guard<py::gil_scoped_release>(),
        "Multi-LoRA shrink and expand, in place on y");
  m.def("paged_decode_attention", &paged_decode_attention, py::call_guard<py::gil_scoped_release>(),
        "Decode attention reading K/V from the paged cache; returns [D, heads * head_dim]");
}
