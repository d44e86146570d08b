// The llmfast._C extension module. Ops register themselves with torch.library from their own
// files (csrc/<op>/<op>_ops.cpp for schemas, <op>_cpu.cpp and <op>_cuda.cu for kernels); this
// file only provides the Python module and build facts.
#include <Python.h>
#include <torch/extension.h>

#ifdef LLMFAST_WITH_CUDA
namespace llmfast {
namespace cuda {
bool kernels_run_on(int device);  // common/device_support.cu
}  // namespace cuda
}  // namespace llmfast
#endif

namespace {
bool cuda_kernels_run_on(int device) {
#ifdef LLMFAST_WITH_CUDA
  return llmfast::cuda::kernels_run_on(device);
#else
  (void)device;
  return false;
#endif
}

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
  m.def("cuda_kernels_run_on", &cuda_kernels_run_on, py::arg("device"),
        "True when the CUDA kernels have code (SASS or PTX) that CUDA device `device` can run");
}
