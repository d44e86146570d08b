// The llmfast._C extension module. Ops register themselves with torch.library from their own
// files (csrc/<op>/<op>_ops.cpp for schemas, <op>_cpu.cpp and <op>_cuda.cu for kernels); this
// file only provides the Python module and build facts.
#include <Python.h>
#include <torch/extension.h>

namespace {
bool built_with_cuda() {
#ifdef LLMFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llmfast C++/CUDA kernels (ops are under torch.ops.llmfast)";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
}
