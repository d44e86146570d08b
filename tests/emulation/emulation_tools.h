// launches(): the configurations of the emulated launches since the last call, as a list of
// (grid (x, y, z), block threads, dynamic shared bytes, cluster) tuples, so that the emulation
// tests can check that a launcher took the path a shape is meant to exercise.
#pragma once
#include <torch/extension.h>

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

}  // namespace simt
}  // namespace llmfast
