// What the emulation tests use besides the launchers (csrc/common/simt_emulator.h):
//   launches()                  the configurations of the emulated launches since the last call,
//                               as (grid (x, y, z), block threads, dynamic shared bytes, cluster)
//                               tuples, to check that a launcher took the path a shape is meant
//                               to exercise
//   guarded_copy(t, after_guard, lead)
//                               a contiguous copy of t in guarded memory (simt::guarded_alloc):
//                               it ends at a guard page (its data 16-byte aligned), or with
//                               after_guard it starts `lead` bytes (< 16) after one; a kernel
//                               access outside its 16-byte chunks raises from the launch
//   guard_probe(t, offset)      an emulated kernel that reads the byte `offset` bytes from t's
//                               data: tests that the guard catches what it should
#pragma once
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <tuple>
#include <vector>

#include "common/simt_emulator.h"

namespace llmfast {
namespace simt {

inline std::vector<std::tuple<std::tuple<unsigned, unsigned, unsigned>, unsigned, size_t, unsigned>>
launches() {
  std::vector<std::tuple<std::tuple<unsigned, unsigned, unsigned>, unsigned, size_t, unsigned>> out;
  for (const LaunchRecord& r : take_launch_log()) {
    out.emplace_back(std::make_tuple(r.grid.x, r.grid.y, r.grid.z), r.block.x * r.block.y * r.block.z,
                     r.shared_bytes, r.cluster);
  }
  return out;
}

inline at::Tensor guarded_copy(const at::Tensor& t, bool after_guard, int64_t lead) {
  TORCH_CHECK(t.device().is_cpu(), "guarded_copy: a CPU tensor");
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  void* data = guarded_alloc(bytes, after_guard, static_cast<size_t>(lead));
  at::Tensor out = at::from_blob(data, t.sizes(), [](void* p) { guarded_free(p); }, t.options());
  out.copy_(t);
  return out;
}

inline int64_t guard_probe(const at::Tensor& t, int64_t offset) {
  const auto* p = static_cast<const volatile unsigned char*>(t.const_data_ptr()) + offset;
  int64_t value = -1;
  launch(nullptr, dim3(1), dim3(32), 0, 1, [&] {
    if (threadIdx.x == 0) value = *p;
  });
  return value;
}

}  // namespace simt
}  // namespace llmfast
