// A CPU emulator of CUDA thread blocks and thread-block clusters, so that the logic of a CUDA
// kernel (indexing, warp fragments, shuffles, barriers, shared and distributed shared memory,
// masking) can be tested on a machine without a GPU.
//
// Used only when a kernel header is compiled as plain C++ with LLMFAST_SIMT_EMULATION defined
// (tests/emulation/): device_compat.cuh then maps the CUDA keywords and intrinsics the kernels
// use onto the functions below. Every thread is a fiber (ucontext) on one OS thread; a
// cooperative scheduler runs them in rounds: every thread that is not done runs until it waits or
// finishes, in an order shuffled anew each round by a fixed-seed generator, so that a read that
// is not ordered after the write it needs by a barrier (a race) meets the write's absence in some
// interleaving, while a run stays deterministic. (LLMFAST_EMULATED_SCHEDULE=forward runs the
// threads in index order instead.) The blocks of one
// cluster (a plain launch: clusters of one block) run concurrently; clusters run one after
// another. What is emulated:
//   threadIdx / blockIdx / blockDim / gridDim     globals the scheduler sets on every switch
//   __syncthreads, __syncwarp                     barriers (a barrier some threads never reach
//                                                 is reported as a deadlock, as it would hang)
//   cluster barrier (arrive / wait / sync)        over every thread of the cluster
//   __shfl_sync / __shfl_xor_sync                 warp exchange through a per-warp buffer
//   warp-level mma.m16n8k16 (f16 / bf16 -> f32)   computed from every lane's fragment registers
//                                                 with PTX's documented fragment layout
//   dynamic shared memory                         one buffer per block, filled with 0xFF bytes
//   static shared memory (LLMFAST_SHARED)         (NaN) first so unwritten reads show; static
//                                                 variables sit at the same offset in every
//                                                 block of a launch, as on the GPU
//   distributed shared memory (map_shared_rank)   the same offset in another block of the
//                                                 cluster; a block's shared memory is refilled
//                                                 with 0xFF when it exits, so a peer that reads
//                                                 it afterwards (a missing exit barrier) sees NaN
//   guarded memory (guarded_alloc)               a buffer next to an inaccessible page: a
//                                                 kernel access past its end (or before its
//                                                 start) faults, and the launch raises it
// Errors inside a kernel (a shuffle from a lane outside the warp, a deadlock, a map to a block
// outside the cluster, an access to a guard page) are raised as std::runtime_error from the
// launch.
//   cp.async (async_copy_16 / commit / wait)      a copy lands at the wait that covers it; its
//                                                 destination is NaN until then
//   alignment, launch limits                      misaligned vector accesses (check_aligned),
//                                                 bad grids or blocks, shared memory over the
//                                                 opt-in or the emulated GPU's limit: errors
// Not emulated: timing, memory ordering between blocks.
#pragma once
#ifndef LLMFAST_SIMT_EMULATION
#error "simt_emulator.h is for LLMFAST_SIMT_EMULATION builds only"
#endif

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

// The built-in variables of a kernel (globals here: one OS thread runs every fiber).
inline dim3 threadIdx;
inline dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace llmfast {
namespace simt {

constexpr int kWarpSize = 32;
constexpr int kExchangeSlots = 8;  // 32-bit words each lane can publish to its warp at once
constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kStaticSharedBytes = 48 * 1024;  // CUDA's limit for static shared memory

// One block of the cluster that is running: its barriers, warp exchange and shared memory.
struct Block {
  dim3 idx;
  int arrived = 0;
  uint64_t generation = 0;
  int alive = 0;
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_generation;
  std::vector<uint32_t> exchange;  // [warp][lane][slot]
  std::vector<unsigned char> shared;         // dynamic
  std::vector<unsigned char> static_shared;  // LLMFAST_SHARED variables
};

// A cp.async copy that has been issued and not yet waited for: its 16 bytes, read at issue.
struct AsyncCopy {
  unsigned char* dst;
  unsigned char data[16];
  int64_t group;  // its commit group (-1: not committed yet)
};

struct Runtime {
  int nthreads = 0;  // per block
  int nblocks = 0;   // per cluster: fiber f is thread f % nthreads of block f / nthreads
  int current = 0;   // running fiber
  std::vector<ucontext_t> ctx;
  unsigned char* stacks = nullptr;  // nthreads * nblocks stacks, mapped lazily
  size_t stacks_bytes = 0;
  std::vector<char> done;
  ucontext_t scheduler;
  uint64_t progress = 0;  // bumped by every barrier arrival and finished thread
  std::vector<Block> blocks;
  int cluster_arrived = 0;
  uint64_t cluster_generation = 0;
  std::vector<uint64_t> cluster_phase;  // per fiber: the generation it last arrived in
  // Offsets of the static shared variables in a block's static_shared, by declaration site;
  // the same in every block of the launch.
  std::map<const void*, size_t> static_offsets;
  size_t static_used = 0;
  std::string error;  // set by a fiber that failed; the scheduler raises it
  std::function<void()> body;
  // Per fiber: its cp.async copies in flight, and how many groups it has committed.
  std::vector<std::vector<AsyncCopy>> async_pending;
  std::vector<int64_t> async_groups;
};

inline Runtime*& runtime() {
  static Runtime* rt = nullptr;
  return rt;
}

inline void yield() {
  Runtime& rt = *runtime();
  swapcontext(&rt.ctx[rt.current], &rt.scheduler);
}

// Reports an error of the kernel: the launch raises it once the failing fiber yields (the fiber
// is never resumed). Outside a launch there is no kernel to blame: abort.
[[noreturn]] inline void fail(const std::string& what) {
  Runtime* rt = runtime();
  if (rt == nullptr) {
    std::fprintf(stderr, "llmfast simt emulator: %s\n", what.c_str());
    std::abort();
  }
  rt->error = "llmfast simt emulator: " + what;
  for (;;) yield();
}

// A GPU faults ("misaligned address") on a vector access, cp.async or ldmatrix whose address is
// not a multiple of its size; the CPU would not. The kernels state each such access's
// alignment (LLMFAST_CHECK_ALIGNED), and the emulator fails the kernel where it does not hold.
inline void check_aligned(const void* p, std::size_t bytes, const char* what) {
  if ((reinterpret_cast<std::uintptr_t>(p) % bytes) != 0) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "misaligned %s: address %p is not a multiple of %zu bytes", what, p, bytes);
    fail(buf);
  }
}

inline int thread_rank() {
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}
inline int lane() { return thread_rank() % kWarpSize; }
inline int warp() { return thread_rank() / kWarpSize; }
inline Block& block() {
  Runtime& rt = *runtime();
  return rt.blocks[rt.current / rt.nthreads];
}
// Rank of the running block in its cluster.
inline int cluster_rank() { return runtime()->current / runtime()->nthreads; }
inline int cluster_size() { return runtime()->nblocks; }

inline void block_barrier() {
  Runtime& rt = *runtime();
  Block& b = block();
  const uint64_t gen = b.generation;
  ++rt.progress;
  if (++b.arrived == rt.nthreads) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) yield();
}

// The two halves of the cluster barrier (barrier.cluster.arrive / .wait): a thread that has
// arrived may go on until it waits; the wait returns once every thread of the cluster arrived.
inline void cluster_arrive() {
  Runtime& rt = *runtime();
  rt.cluster_phase[rt.current] = rt.cluster_generation;
  ++rt.progress;
  if (++rt.cluster_arrived == rt.nthreads * rt.nblocks) {
    rt.cluster_arrived = 0;
    ++rt.cluster_generation;
  }
}

inline void cluster_wait() {
  Runtime& rt = *runtime();
  const uint64_t phase = rt.cluster_phase[rt.current];
  while (rt.cluster_generation == phase) yield();
}

inline void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}

inline int warp_threads(int w) {
  const int n = runtime()->nthreads - w * kWarpSize;
  return n < kWarpSize ? n : kWarpSize;
}

inline void warp_barrier() {
  Runtime& rt = *runtime();
  Block& b = block();
  const int w = warp();
  const uint64_t gen = b.warp_generation[w];
  ++rt.progress;
  if (++b.warp_arrived[w] == warp_threads(w)) {
    b.warp_arrived[w] = 0;
    ++b.warp_generation[w];
    return;
  }
  while (b.warp_generation[w] == gen) yield();
}

inline uint32_t* exchange_slot(int w, int l, int slot) {
  return &block().exchange[(static_cast<size_t>(w) * kWarpSize + l) * kExchangeSlots + slot];
}

// Every lane publishes `v` and receives the value of lane `src`.
template <typename V>
V shuffle(V v, int src) {
  static_assert(sizeof(V) <= 4 * kExchangeSlots, "shuffle of a value over 32 bytes");
  const int w = warp(), l = lane();
  if (src < 0 || src >= warp_threads(w)) fail("shuffle from a lane outside the warp");
  std::memcpy(exchange_slot(w, l, 0), &v, sizeof(V));
  warp_barrier();
  V out;
  std::memcpy(&out, exchange_slot(w, src, 0), sizeof(V));
  warp_barrier();
  return out;
}

template <typename T>
inline float half_to_float(uint16_t bits) {
  T h;
  std::memcpy(&h, &bits, sizeof(h));
  return static_cast<float>(h);
}

// D = A B + C for one warp, A 16x16 (row), B 16x8 (col), f16 or bf16 in, f32 accumulate, with
// the fragment layout of PTX's mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..]   a[2] = A[g][2t+8..]   a[3] = A[g+8][2t+8..]
//   b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   c[0..1] = C[g][2t..2t+1]   c[2..3] = C[g+8][2t..2t+1]
// (each 32-bit register holds the lower-indexed element in its low half).
template <typename T>
void mma_m16n8k16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  const int w = warp(), l = lane();
  if (warp_threads(w) != kWarpSize) fail("mma in a partial warp");
  for (int i = 0; i < 4; ++i) *exchange_slot(w, l, i) = a[i];
  for (int i = 0; i < 2; ++i) *exchange_slot(w, l, 4 + i) = b[i];
  warp_barrier();
  auto element = [&](int src, int slot, int high) {
    const uint32_t word = *exchange_slot(w, src, slot);
    return half_to_float<T>(static_cast<uint16_t>(high ? word >> 16 : word & 0xFFFFu));
  };
  auto A = [&](int row, int col) {
    return element((row % 8) * 4 + (col % 8) / 2, (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0),
                   col % 2);
  };
  auto B = [&](int k, int n) { return element(n * 4 + (k % 8) / 2, 4 + (k >= 8 ? 1 : 0), k % 2); };
  const int g = l / 4, t = l % 4;
  float d[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[i] = acc;
  }
  warp_barrier();
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}

inline unsigned char* dynamic_shared_memory() { return block().shared.data(); }

// The running block's instance of the static shared variable declared at `site` (one address
// per declaration, e.g. a function-local static of the declaring function).
inline void* static_shared(const void* site, size_t bytes) {
  Runtime& rt = *runtime();
  auto it = rt.static_offsets.find(site);
  if (it == rt.static_offsets.end()) {
    const size_t offset = (rt.static_used + 15) / 16 * 16;
    if (offset + bytes > kStaticSharedBytes) fail("static shared memory over 48 KB");
    rt.static_used = offset + bytes;
    it = rt.static_offsets.emplace(site, offset).first;
  }
  return block().static_shared.data() + it->second;
}

// The address in the shared memory of block `rank` of the cluster at the offset that `p` has
// in the running block's (cooperative_groups' cluster_group::map_shared_rank).
template <typename T>
T* map_shared_rank(T* p, int rank) {
  Runtime& rt = *runtime();
  if (rank < 0 || rank >= rt.nblocks) fail("map_shared_rank to a block outside the cluster");
  Block& me = block();
  Block& peer = rt.blocks[rank];
  if (peer.alive == 0) fail("map_shared_rank to a block of the cluster that has exited");
  auto* c = reinterpret_cast<unsigned char*>(const_cast<std::remove_cv_t<T>*>(p));
  auto within = [c](std::vector<unsigned char>& buf) {
    return !buf.empty() && c >= buf.data() && c < buf.data() + buf.size();
  };
  unsigned char* q = nullptr;
  if (within(me.static_shared)) {
    q = peer.static_shared.data() + (c - me.static_shared.data());
  } else if (within(me.shared)) {
    q = peer.shared.data() + (c - me.shared.data());
  } else {
    fail("map_shared_rank of an address outside the block's shared memory");
  }
  return reinterpret_cast<T*>(q);
}

// Every launch's configuration, in order, for tests that check which kernels and shapes a launcher
// chose (take_launch_log returns and clears it).
struct LaunchRecord {
  dim3 grid, block;
  size_t shared_bytes;
  unsigned cluster;
};
inline std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}
inline std::vector<LaunchRecord> take_launch_log() {
  std::vector<LaunchRecord> out;
  out.swap(launch_log());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Guarded memory: buffers whose end (or start) touches a PROT_NONE page, so that a kernel access
// outside them faults. What a GPU tolerates does not: its allocations (and PyTorch's blocks in
// them) start at least 256-byte aligned and are mapped in whole pages, so an aligned 16-byte
// load that holds one byte of a tensor stays in mapped memory (the kernels load whole 16-byte
// slots across a row's ends). guarded_alloc therefore puts the guard at the buffer's end rounded
// up to 16 bytes (or its start rounded down): an access faults exactly when it touches none of
// the buffer's 16-byte chunks, e.g. a slot loaded past a row's last one. The bytes between the
// buffer and its guard are 0xFF (NaN), so a kernel that uses them instead of masking them fails
// its results too.
//
// While a launch runs, a SIGSEGV handler catches a fault in a guard page: it records it and opens
// the page, so that the access completes; the scheduler then raises it as the kernel's error
// (and closes the page again). Any other fault goes to the handler that was installed before.
// ---------------------------------------------------------------------------------------------
struct Guard {
  unsigned char* map = nullptr;  // the whole mapping (data pages and the guard page)
  size_t map_bytes = 0;
  unsigned char* page = nullptr;  // the guard page
  const unsigned char* data = nullptr;  // the buffer
  size_t bytes = 0;
};
constexpr int kMaxGuards = 64;
// Fixed storage: the signal handler reads it.
inline Guard guards[kMaxGuards];
inline volatile sig_atomic_t guard_fault = 0;  // set by the handler
inline const void* volatile guard_fault_addr = nullptr;
inline volatile int guard_fault_index = -1;
inline struct sigaction guard_previous_action;

inline size_t page_bytes() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

// A buffer of `bytes` bytes that ends at a guard page (after_guard false; the buffer then starts
// 16-byte aligned) or starts `lead` bytes (< 16) after one (after_guard true). Freed by
// guarded_free.
inline void* guarded_alloc(size_t bytes, bool after_guard, size_t lead = 0) {
  if (lead >= 16 || (!after_guard && lead != 0)) {
    throw std::invalid_argument("llmfast simt emulator: guarded_alloc's lead is in [0, 16), after a guard only");
  }
  int slot = 0;
  while (slot < kMaxGuards && guards[slot].map != nullptr) ++slot;
  if (slot == kMaxGuards) throw std::runtime_error("llmfast simt emulator: too many guarded buffers");
  const size_t page = page_bytes();
  const size_t span = (lead + bytes + 15) / 16 * 16;  // the 16-byte chunks the buffer touches
  const size_t data_pages = (span + page - 1) / page * page;
  void* m = mmap(nullptr, data_pages + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) throw std::runtime_error("llmfast simt emulator: cannot map a guarded buffer");
  Guard& g = guards[slot];
  g.map = static_cast<unsigned char*>(m);
  g.map_bytes = data_pages + page;
  g.page = after_guard ? g.map : g.map + data_pages;
  const unsigned char* chunks = after_guard ? g.map + page : g.page - span;
  std::memset(const_cast<unsigned char*>(chunks), 0xFF, span);
  g.data = chunks + lead;
  g.bytes = bytes;
  mprotect(g.page, page, PROT_NONE);
  return const_cast<unsigned char*>(g.data);
}

inline void guarded_free(void* data) {
  for (Guard& g : guards) {
    if (g.map != nullptr && g.data == data) {
      munmap(g.map, g.map_bytes);
      g = Guard{};
      return;
    }
  }
}

inline bool any_guards() {
  for (const Guard& g : guards) {
    if (g.map != nullptr) return true;
  }
  return false;
}

inline void guard_handler(int, siginfo_t* info, void*) {
  const size_t page = page_bytes();
  auto* addr = static_cast<unsigned char*>(info->si_addr);
  for (int i = 0; i < kMaxGuards; ++i) {
    const Guard& g = guards[i];
    if (g.map != nullptr && addr >= g.page && addr < g.page + page) {
      if (!guard_fault) {
        guard_fault_addr = addr;
        guard_fault_index = i;
        guard_fault = 1;
      }
      mprotect(g.page, page, PROT_READ | PROT_WRITE);  // the access completes on return
      return;
    }
  }
  // Not ours: the previous handler gets the fault when the access runs again.
  sigaction(SIGSEGV, &guard_previous_action, nullptr);
}

// The recorded fault as a message; closes the guard page again.
inline std::string take_guard_fault() {
  const Guard& g = guards[guard_fault_index];
  const auto* addr = static_cast<const unsigned char*>(guard_fault_addr);
  const long long offset = static_cast<long long>(addr - g.data);
  mprotect(g.page, page_bytes(), PROT_NONE);
  guard_fault = 0;
  return "llmfast simt emulator: out-of-bounds access at byte " + std::to_string(offset) +
         " of a guarded buffer of " + std::to_string(g.bytes) + " bytes";
}

inline void fiber_entry() {
  Runtime& rt = *runtime();
  const int me = rt.current;
  rt.body();
  rt.done[me] = 1;
  ++rt.progress;
  // returning resumes uc_link, the scheduler
}

// ---------------------------------------------------------------------------------------------
// cp.async as a GPU may run it at its slowest: a copy lands only when the issuing thread waits
// for its group (cp.async.wait_group), and until then its destination holds NaN (0xFF bytes).
// A kernel that reads a tile before its wait, reads another thread's copy without a barrier
// after the wait, waits for too few groups, or overwrites a buffer that others still read,
// then sees NaN where the GPU would (sometimes) see stale or torn data.
// ---------------------------------------------------------------------------------------------
inline void async_copy_16(void* dst, const void* src) {
  Runtime& rt = *runtime();
  AsyncCopy c;
  c.dst = static_cast<unsigned char*>(dst);
  std::memcpy(c.data, src, 16);
  c.group = -1;
  std::memset(dst, 0xFF, 16);
  rt.async_pending[rt.current].push_back(c);
}

inline void async_commit() {
  Runtime& rt = *runtime();
  const int64_t group = rt.async_groups[rt.current]++;
  for (AsyncCopy& c : rt.async_pending[rt.current]) {
    if (c.group < 0) c.group = group;
  }
}

// Completes this thread's copies of every committed group but the newest `n`.
inline void async_wait(int n) {
  Runtime& rt = *runtime();
  const int64_t limit = rt.async_groups[rt.current] - n;
  auto& pending = rt.async_pending[rt.current];
  size_t kept = 0;
  for (size_t i = 0; i < pending.size(); ++i) {
    if (pending[i].group >= 0 && pending[i].group < limit) {
      std::memcpy(pending[i].dst, pending[i].data, 16);
    } else {
      pending[kept++] = pending[i];
    }
  }
  pending.resize(kept);
}

// ---------------------------------------------------------------------------------------------
// Launch limits a GPU enforces (it fails the launch with "invalid configuration argument" or
// "invalid argument"), which the emulator checks so that a launcher breaking one fails on the
// CPU too: grid dimensions in 1..2^31-1 (x) and 1..65535 (y, z); a block of 1..1024 threads
// (z <= 64); dynamic shared memory over 48 KB only for a kernel that opted in to that much
// (cudaFuncSetAttribute, device::allow_shared_bytes), and never over the emulated GPU's limit
// (LLMFAST_EMULATED_SM: 227 KB on sm_90, 163 KB on sm_80, 99 KB on sm_86/89).
// ---------------------------------------------------------------------------------------------
constexpr size_t kDefaultDynamicSharedBytes = 48 * 1024;

// An integer setting of the emulated device from the environment (read at every use, so tests
// can switch it): LLMFAST_EMULATED_SM, LLMFAST_EMULATED_SM_COUNT (device_compat.cuh).
inline int emulated_setting(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

// The emulated compute capability, major * 10 + minor (default 90: an H100).
inline int emulated_sm() { return emulated_setting("LLMFAST_EMULATED_SM", 90); }

inline size_t max_dynamic_shared_bytes() {
  const int sm = emulated_sm();
  if (sm >= 90) return 227 * 1024;
  if (sm == 80 || sm == 87) return 163 * 1024;
  return 99 * 1024;
}

// The kernel a launch runs, as an opaque address (a function's or a function pointer's value).
template <typename F>
const void* kernel_id(F* f) {
  return reinterpret_cast<const void*>(f);
}

inline std::map<const void*, size_t>& shared_opt_ins() {
  static std::map<const void*, size_t> opt_ins;
  return opt_ins;
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
inline void allow_shared_bytes(const void* kernel, size_t bytes) {
  if (bytes > max_dynamic_shared_bytes()) {
    throw std::runtime_error("llmfast simt emulator: cudaFuncSetAttribute: " + std::to_string(bytes) +
                             " bytes of dynamic shared memory exceed sm_" + std::to_string(emulated_sm()) +
                             "'s limit of " + std::to_string(max_dynamic_shared_bytes()));
  }
  shared_opt_ins()[kernel] = bytes;
}

inline void check_launch_configuration(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes) {
  auto bad = [](const std::string& what) {
    throw std::runtime_error("llmfast simt emulator: invalid launch configuration: " + what);
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) bad("a grid dimension is 0");
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    bad("grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
        ") is over (2^31 - 1, 65535, 65535)");
  }
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.z > 64 ||
      static_cast<uint64_t>(block.x) * block.y * block.z > 1024u) {
    bad("block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " + std::to_string(block.z) +
        ") is not 1..1024 threads");
  }
  if (shared_bytes > kDefaultDynamicSharedBytes) {
    const auto it = kernel == nullptr ? shared_opt_ins().end() : shared_opt_ins().find(kernel);
    const size_t allowed = it == shared_opt_ins().end() ? kDefaultDynamicSharedBytes : it->second;
    if (shared_bytes > allowed) {
      bad(std::to_string(shared_bytes) + " bytes of dynamic shared memory, over the " + std::to_string(allowed) +
          " the kernel was allowed (over 48 KB needs cudaFuncSetAttribute: device::allow_shared_bytes)");
    }
  }
}

// Runs `body` (the kernel call) once per thread of every block of the grid. The 1-D grid is cut
// into clusters of `cluster` consecutive blocks (grid.x a multiple of it; 1 for a plain launch).
// `kernel` names the kernel for the shared-memory opt-in check (nullptr: none made).
inline void launch(const void* kernel, dim3 grid, dim3 block_dim, size_t shared_bytes, unsigned cluster,
                   const std::function<void()>& body) {
  check_launch_configuration(kernel, grid, block_dim, shared_bytes);
  const int n = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  if (cluster < 1 || cluster > 16 || grid.x % cluster != 0 || (cluster > 1 && grid.y * grid.z != 1)) {
    throw std::runtime_error("llmfast simt emulator: a cluster launch needs a 1-D grid that is a "
                             "multiple of the cluster size (at most 16)");
  }
  launch_log().push_back({grid, block_dim, shared_bytes, cluster});
  Runtime rt;
  rt.nthreads = n;
  rt.nblocks = static_cast<int>(cluster);
  rt.body = body;
  const int fibers = n * rt.nblocks;
  const int warps = (n + kWarpSize - 1) / kWarpSize;
  rt.blocks.resize(rt.nblocks);
  for (Block& b : rt.blocks) {
    b.warp_arrived.assign(warps, 0);
    b.warp_generation.assign(warps, 0);
    b.exchange.assign(static_cast<size_t>(warps) * kWarpSize * kExchangeSlots, 0u);
  }
  rt.ctx.resize(fibers);
  rt.cluster_phase.assign(fibers, 0);
  // Reserved, not committed: a fiber touches a few pages of its stack.
  rt.stacks_bytes = kStackBytes * fibers;
  void* stacks = mmap(nullptr, rt.stacks_bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (stacks == MAP_FAILED) throw std::runtime_error("llmfast simt emulator: cannot map fiber stacks");
  rt.stacks = static_cast<unsigned char*>(stacks);
  Runtime* saved = runtime();
  runtime() = &rt;
  // Guard-page faults are caught while the kernel runs (see guarded_alloc).
  const bool guarded = any_guards();
  if (guarded) {
    struct sigaction action = {};
    action.sa_sigaction = guard_handler;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &guard_previous_action);
  }
  auto finish = [&] {
    if (guarded) sigaction(SIGSEGV, &guard_previous_action, nullptr);
    runtime() = saved;
    munmap(rt.stacks, rt.stacks_bytes);
  };
  gridDim = grid;
  blockDim = block_dim;
  const char* schedule = std::getenv("LLMFAST_EMULATED_SCHEDULE");
  const bool shuffled = schedule == nullptr || std::strcmp(schedule, "forward") != 0;
  std::mt19937 rng(0x5eed);
  std::vector<int> order(fibers);
  std::iota(order.begin(), order.end(), 0);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx0 = 0; bx0 < grid.x; bx0 += cluster) {
        for (int r = 0; r < rt.nblocks; ++r) {
          Block& b = rt.blocks[r];
          b.idx = dim3(bx0 + r, by, bz);
          b.shared.assign(shared_bytes, 0xFF);
          b.static_shared.assign(kStaticSharedBytes, 0xFF);
          b.arrived = 0;
          b.alive = n;
        }
        rt.done.assign(fibers, 0);
        rt.async_pending.assign(fibers, {});
        rt.async_groups.assign(fibers, 0);
        rt.cluster_arrived = 0;
        for (int i = 0; i < fibers; ++i) {
          getcontext(&rt.ctx[i]);
          rt.ctx[i].uc_stack.ss_sp = rt.stacks + kStackBytes * i;
          rt.ctx[i].uc_stack.ss_size = kStackBytes;
          rt.ctx[i].uc_link = &rt.scheduler;
          makecontext(&rt.ctx[i], fiber_entry, 0);
        }
        int alive = fibers, idle_rounds = 0;
        while (alive > 0) {
          const uint64_t before = rt.progress;
          if (shuffled) std::shuffle(order.begin(), order.end(), rng);
          for (const int i : order) {
            if (rt.done[i]) continue;
            Block& b = rt.blocks[i / n];
            const int t = i % n;
            rt.current = i;
            blockIdx = b.idx;
            threadIdx = dim3(t % block_dim.x, (t / block_dim.x) % block_dim.y,
                             t / (block_dim.x * block_dim.y));
            swapcontext(&rt.scheduler, &rt.ctx[i]);
            if (guard_fault) rt.error = take_guard_fault();
            if (!rt.error.empty()) {
              const std::string what = rt.error + " (block " + std::to_string(b.idx.x) + "," +
                                       std::to_string(b.idx.y) + "," + std::to_string(b.idx.z) +
                                       ", thread " + std::to_string(t) + ")";
              finish();
              throw std::runtime_error(what);
            }
            if (rt.done[i]) {
              --alive;
              // An exited block's shared memory is gone: poison it for peers that still read.
              if (--b.alive == 0) {
                std::memset(b.shared.data(), 0xFF, b.shared.size());
                std::memset(b.static_shared.data(), 0xFF, b.static_shared.size());
              }
            }
          }
          if (rt.progress == before && alive > 0 && ++idle_rounds > 1) {
            finish();
            throw std::runtime_error(
                "llmfast simt emulator: deadlock: " + std::to_string(alive) +
                " threads wait at a barrier that the others never reach (cluster of block " +
                std::to_string(bx0) + "," + std::to_string(by) + "," + std::to_string(bz) + ")");
          }
          if (rt.progress != before) idle_rounds = 0;
        }
      }
    }
  }
  finish();
}

inline void launch(const void* kernel, dim3 grid, dim3 block_dim, size_t shared_bytes,
                   const std::function<void()>& body) {
  launch(kernel, grid, block_dim, shared_bytes, 1, body);
}

}  // namespace simt
}  // namespace llmfast

// The CUDA names the kernels use.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
inline void __syncthreads() { llmfast::simt::block_barrier(); }
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { llmfast::simt::warp_barrier(); }
template <typename V>
V __shfl_sync(unsigned, V v, int src, int width = 32) {
  const int l = llmfast::simt::lane();
  return llmfast::simt::shuffle(v, (l & ~(width - 1)) + (src & (width - 1)));
}
template <typename V>
V __shfl_xor_sync(unsigned, V v, int mask, int width = 32) {
  (void)width;
  return llmfast::simt::shuffle(v, llmfast::simt::lane() ^ mask);
}
[[noreturn]] inline void __trap() { llmfast::simt::fail("__trap()"); }
// Read-only-cache load: a plain load here.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
// Device math and bit-cast intrinsics, at full precision (the fast versions' results lie within
// their documented error of these).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
// CUDA's device overloads of min / max for the integer types.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
