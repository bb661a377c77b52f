// The CPU emulation of the CUDA primitives: what csrc/primitives.cuh includes under RNNFAST_EMULATE, so that the
// kernels compile with the host compiler (g++ -std=c++17 -x c++ -DRNNFAST_EMULATE) and run on the CPU.
//
// Execution model: rf::launch runs the kernel body once per thread of a 1-D grid, each thread a fiber with its own
// 64 KiB stack, all fibers on the calling OS thread under one cooperative scheduler (emulate.cpp). A fiber runs
// until it reaches a barrier (sync_block, cluster_sync, sync_grid), a warp collective (shfl_xor, ldmatrix, mma), a
// spin on a flag (grid_wait, flag_wait), or finishes; a barrier releases when every thread of its scope (block,
// cluster, grid, warp) has arrived. Every thread of the grid is alive at once, as a cooperative launch requires:
// 132 x 256 = 33,792 fibers is the usual grid.
// threadIdx, blockIdx, blockDim and gridDim are plain globals that the scheduler sets whenever it resumes a fiber.
//
// What the emulation checks, each a failed launch with the block and thread named (never a hang or an abort):
// deadlock (a thread that skips a barrier or exits while its block, warp or grid waits, or spins on a flag no
// thread that can run will set, or skips a cluster_sync its cluster waits at), lanes of one warp in different
// collectives, ldmatrix rows not 16-byte aligned or outside shared memory, cp_async16 addresses not 16-byte aligned,
// map_shared of an address outside the block's shared memory or of a rank past the cluster, writes outside a block's
// dynamic shared memory (which starts as 0xFF bytes, a NaN in fp32/fp16/bf16, at every launch), a stack overflow, a
// segmentation fault or an integer division by zero in a kernel, and exceptions thrown by it.
//
// What it does not model: memory races and the memory model (a fiber runs alone until it blocks, so a missing
// barrier shows only where the schedule exposes it), preemption (a loop that waits for another thread without a
// barrier, collective or rf::grid_wait inside never ends), reads outside shared memory, __shared__ variables (use
// rf::dynamic_smem), 2-D and 3-D grids, and tensor-core rounding (the mma emulations sum in fp32, k in order).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>

// ------------------------------------------------------------------------------------- CUDA source on the host ---
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define RF_DEVICE inline
#define RF_HOST_DEVICE inline

// Hidden, as is everything this header declares: every shared library that links emulate.cpp has its own
// scheduler and its own threadIdx, and a second emulation library in the process cannot interpose on them.
#define RF_EMU_API __attribute__((visibility("hidden")))
#pragma GCC visibility push(hidden)

struct rf_dim3 {
  unsigned x = 1, y = 1, z = 1;
};
// Set by the scheduler for the fiber it resumes (only .x: the grid and blocks are 1-D); not thread_local, since every
// fiber runs on the launching thread.
extern RF_EMU_API rf_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace rf {

// ------------------------------------------------------------------------------------------ 16-bit types ---
namespace detail {

// Round v to the nearest value of the binary format with kExp exponent and kMan mantissa bits, ties to even:
// IEEE binary16 (5, 10) or bfloat16 (8, 7). One rounding from double, so a float (exact in double) and a double
// both round once, as CUDA's __float2half_rn / __double2half do. Overflow gives inf; NaN gives 0x7FFF, CUDA's
// canonical NaN.
template <int kExp, int kMan>
inline uint16_t round_to_bits(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint16_t sign = static_cast<uint16_t>((u >> 48) & 0x8000u);
  const uint64_t a = u & 0x7FFFFFFFFFFFFFFFull;
  const uint64_t inf = ((uint64_t{1} << kExp) - 1) << kMan;
  if (a > 0x7FF0000000000000ull) return 0x7FFF;
  if (a == 0x7FF0000000000000ull) return static_cast<uint16_t>(sign | inf);
  const int e_raw = static_cast<int>(a >> 52);
  if (e_raw == 0) return sign;  // a double subnormal is far below half of the smallest subnormal of either format
  const int bias = (1 << (kExp - 1)) - 1;
  const int e = e_raw - 1023;
  const uint64_t mant = (a & ((uint64_t{1} << 52) - 1)) | (uint64_t{1} << 52);  // 53 bits: v = mant * 2^(e-52)
  const int e_q = e > 1 - bias ? e : 1 - bias;  // the exponent whose quantum applies (subnormals: the smallest)
  const int shift = 52 - kMan + (e_q - e);      // bits of mant below the quantum
  if (shift > 53) return sign;                  // below half the smallest subnormal
  uint64_t q = mant >> shift;
  const uint64_t rem = mant & ((uint64_t{1} << shift) - 1), half = uint64_t{1} << (shift - 1);
  if (rem > half || (rem == half && (q & 1))) ++q;
  // q in [2^kMan, 2^(kMan+1)] for normals (a carry moves to the next exponent), q <= 2^kMan for subnormals.
  const uint64_t bits = (static_cast<uint64_t>(e_q + bias - 1) << kMan) + q;
  return static_cast<uint16_t>(sign | (bits >= inf ? inf : bits));
}

// An integer as a double rounded to odd past 53 bits, so that the one rounding to 16 bits afterwards is exact RNE.
template <typename I>
inline double int_to_double_odd(I v) {
  if constexpr (sizeof(I) <= 4) {
    return static_cast<double>(v);
  } else {
    const bool neg = std::is_signed_v<I> && v < 0;
    uint64_t m = neg ? uint64_t{0} - static_cast<uint64_t>(v) : static_cast<uint64_t>(v);
    if (m >> 53) {
      const int drop = 11 - __builtin_clzll(m);  // bits beyond 53 significant ones
      const uint64_t sticky = (m & ((uint64_t{1} << drop) - 1)) != 0;
      m = ((m >> drop) | sticky) << drop;  // exact in double now
    }
    const double d = static_cast<double>(m);
    return neg ? -d : d;
  }
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  uint32_t u;
  if (e == 0x1F) {
    u = m != 0 ? 0x7FFFFFFFu : sign | 0x7F800000u;  // NaN: CUDA's canonical NaN, the sign dropped
  } else if (e == 0) {
    const float f = static_cast<float>(m) * 0x1p-24f;  // zero or subnormal, exact
    return sign ? -f : f;
  } else {
    u = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace detail

// IEEE binary16, as CUDA's __half with conversions enabled: built from float, double or any integer (round to
// nearest even), read as float; arithmetic goes through float.
struct half_t {
  uint16_t bits;
  half_t() = default;
  half_t(float v) : bits(detail::round_to_bits<5, 10>(v)) {}
  half_t(double v) : bits(detail::round_to_bits<5, 10>(v)) {}
  template <typename I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  half_t(I v) : bits(detail::round_to_bits<5, 10>(detail::int_to_double_odd(v))) {}
  operator float() const { return detail::half_bits_to_float(bits); }
};

// bfloat16 (the top half of a float), as CUDA's __nv_bfloat16 with conversions enabled.
struct bf16_t {
  uint16_t bits;
  bf16_t() = default;
  bf16_t(float v) : bits(detail::round_to_bits<8, 7>(v)) {}
  bf16_t(double v) : bits(detail::round_to_bits<8, 7>(v)) {}
  template <typename I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  bf16_t(I v) : bits(detail::round_to_bits<8, 7>(detail::int_to_double_odd(v))) {}
  operator float() const { return detail::bf16_bits_to_float(bits); }
};

// Trivial, so that arrays of them in shared memory cost nothing to declare, as on the GPU.
static_assert(sizeof(half_t) == 2 && std::is_trivially_copyable_v<half_t> &&
              std::is_trivially_default_constructible_v<half_t>);
static_assert(sizeof(bf16_t) == 2 && std::is_trivially_copyable_v<bf16_t> &&
              std::is_trivially_default_constructible_v<bf16_t>);

inline float exp_(float v) { return std::exp(v); }
inline double exp_(double v) { return std::exp(v); }
inline float tanh_(float v) { return std::tanh(v); }
inline double tanh_(double v) { return std::tanh(v); }

// --------------------------------------------------------------------------------- the scheduler (emulate.cpp) ---
namespace detail {

// The warp collectives: every lane of a warp must be in the same one at once.
enum class Collective : int { shfl_xor, ldmatrix, mma_m16n8k16, mma_m16n8k8 };

// Block barrier and grid barrier; both switch fibers until the whole block (grid) has arrived.
RF_EMU_API void arrive_block();
RF_EMU_API void arrive_grid();
// Every lane of the warp deposits `value`, waits for all 32 lanes, and gets lane (lane ^ lane_mask)'s value (its own
// where that lane is out of range, as PTX shfl.bfly does).
RF_EMU_API uint64_t warp_collective(Collective what, uint64_t value, int lane_mask);
// Every lane deposits `value` and waits for all 32; all[l] is then lane l's.
RF_EMU_API void warp_gather(Collective what, uint64_t value, uint64_t* all);
// Whether [p, p + bytes) lies in the current block's dynamic shared memory.
RF_EMU_API bool in_smem(const void* p, size_t bytes);
// The calling thread waits for a flag (grid_wait): every other ready thread runs before it checks again. A launch in
// which only spinning threads are left to run fails as a deadlock. progressed(): its flag was set.
RF_EMU_API void spin();
RF_EMU_API void progressed();
// Fails the launch with `message`, naming the current block and thread; never returns to the kernel.
[[noreturn]] RF_EMU_API void fail(const std::string& message);
// The current block's dynamic shared memory; null outside a launch.
extern RF_EMU_API unsigned char* current_smem;

// Thread-block clusters (1-D, `cluster` consecutive blocks): their barrier, their size, and the address in block
// `rank` of the cluster of what p is in this block's dynamic shared memory (distributed shared memory).
RF_EMU_API void arrive_cluster();
RF_EMU_API unsigned cluster_size();
RF_EMU_API unsigned char* map_shared(const void* p, unsigned rank);

RF_EMU_API bool launch(unsigned blocks, unsigned threads, size_t smem_bytes, unsigned cluster, void (*body)(void*),
                       void* context,
                       std::string* error);

}  // namespace detail

inline void sync_block() { detail::arrive_block(); }
inline void sync_grid() { detail::arrive_grid(); }
inline void cluster_sync() { detail::arrive_cluster(); }
inline unsigned cluster_rank() { return blockIdx.x % detail::cluster_size(); }
template <typename T>
inline T* map_shared(T* p, unsigned rank) {
  return reinterpret_cast<T*>(detail::map_shared(p, rank));
}

// 16 bytes, the unit of the wide copies (uint4 on the GPU).
struct alignas(16) vec16 {
  uint32_t x, y, z, w;
};
inline vec16 ldcg16(const void* p) {
  vec16 v;
  std::memcpy(&v, p, 16);
  return v;
}

// The split-phase grid barrier (primitives.cuh): stores are visible at once here, so the release and acquire are
// plain; thread 0 of each block spins, yielding, until the counter reaches the target.
inline void grid_arrive(unsigned* counter) {
  sync_block();
  if (threadIdx.x == 0) ++*counter;
}
inline void flag_arrive(unsigned* flags, int block, unsigned n) {
  sync_block();
  if (threadIdx.x == 0) flags[block] = n;
}
inline void flag_wait(const unsigned* flags, int blocks, unsigned n) {
  for (int b = static_cast<int>(threadIdx.x); b < blocks; b += static_cast<int>(blockDim.x)) {
    while (flags[b] < n) detail::spin();
    detail::progressed();
  }
  sync_block();
}
inline void grid_wait(const unsigned* counter, unsigned target) {
  if (threadIdx.x == 0) {
    while (*counter < target) detail::spin();
    detail::progressed();
  }
  sync_block();
}

// __shfl_xor_sync(0xffffffff, v, lane_mask) for any trivially copyable type of up to 8 bytes.
template <typename T>
inline T shfl_xor(T v, int lane_mask) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shfl_xor moves up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = detail::warp_collective(detail::Collective::shfl_xor, bits, lane_mask);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <typename T>
inline T ldcg(const T* p) { return *p; }

inline unsigned char* dynamic_smem() { return detail::current_smem; }

// cp.async completes at once here: the copy is made when issued, so waiting has nothing left to do. (Only a block
// barrier makes it visible to other threads on the GPU; the kernels put one there, which the tests exercise.)
inline void cp_async4(void* smem, const void* gmem) { std::memcpy(smem, gmem, 4); }
// Both addresses must be 16-byte aligned, as the GPU requires (a misaligned one faults there).
inline void cp_async16(void* smem, const void* gmem) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || reinterpret_cast<uintptr_t>(gmem) % 16 != 0)
    detail::fail("cp_async16 needs 16-byte aligned addresses, got shared " +
                 std::to_string(reinterpret_cast<uintptr_t>(smem) % 16) + " and global " +
                 std::to_string(reinterpret_cast<uintptr_t>(gmem) % 16) + " bytes past a boundary");
  std::memcpy(smem, gmem, 16);
}
namespace detail {

// The mma emulations' end: this lane's four elements of the m16n8 D (d[0..1] at row g, columns 2(lane%4) and +1;
// d[2..3] at row g+8, g = lane/4), each plus the sum over k, in order, of A[m][k] B[k][n].
template <int K>
inline void mma_accumulate(float (&d)[4], const float (&A)[16][K], const float (&B)[K][8]) {
  const unsigned lane = threadIdx.x % 32, gr = lane / 4, c = 2 * (lane % 4);
  for (int i = 0; i < 4; ++i) {
    const unsigned m = gr + (i >= 2 ? 8 : 0), n = c + (i % 2);
    float s = d[i];
    for (int k = 0; k < K; ++k) s += A[m][k] * B[k][n];
    d[i] = s;
  }
}

}  // namespace detail

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 give the addresses of the 8 rows (16 bytes each) of
// matrix i; lane l gets, in r[i], row l/4 of matrix i, elements 2(l%4) and 2(l%4)+1 (the first in the low half).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  uint64_t rows[32];
  detail::warp_gather(detail::Collective::ldmatrix, reinterpret_cast<uintptr_t>(row), rows);
  const unsigned lane = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) {
    const auto* p = reinterpret_cast<const unsigned char*>(rows[i * 8 + lane / 4]);
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0 || !detail::in_smem(p, 16))
      detail::fail("ldmatrix: lane " + std::to_string(i * 8 + lane / 4) + "'s row address is " +
                   (reinterpret_cast<uintptr_t>(p) % 16 != 0 ? "not 16-byte aligned" : "outside shared memory"));
    std::memcpy(&r[i], p + 4 * (lane % 4), 4);
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d += a b for the warp's 16 x 16 A (row-major) and 16 x 8 B
// (column-major) in the PTX fragment layouts, g = lane/4, c = 2(lane%4): a[0] holds A(g, c..c+1), a[1] A(g+8, c..),
// a[2] A(g, c+8..), a[3] A(g+8, c+8..); b[0] B(c..c+1, g), b[1] B(c+8.., g); d[0..1] D(g, c..c+1), d[2..3]
// D(g+8, c..). Products exact in float, summed in float in k order after d.
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, half_t> || std::is_same_v<T, bf16_t>, "mma_m16n8k16 multiplies half_t or bf16_t");
  uint64_t a01[32], a23[32], bb[32];
  detail::warp_gather(detail::Collective::mma_m16n8k16, a[0] | (uint64_t{a[1]} << 32), a01);
  detail::warp_gather(detail::Collective::mma_m16n8k16, a[2] | (uint64_t{a[3]} << 32), a23);
  detail::warp_gather(detail::Collective::mma_m16n8k16, b[0] | (uint64_t{b[1]} << 32), bb);
  auto half_of = [](uint64_t word, int which) {  // 16-bit element `which` (0..3) of a gathered pair of registers
    T v;
    const uint16_t bits = static_cast<uint16_t>(word >> (16 * which));
    std::memcpy(&v, &bits, 2);
    return static_cast<float>(v);
  };
  float A[16][16], B[16][8];
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned gr = l / 4, c = 2 * (l % 4);
    for (int e = 0; e < 2; ++e) {
      A[gr][c + e] = half_of(a01[l], e);
      A[gr + 8][c + e] = half_of(a01[l], 2 + e);
      A[gr][c + 8 + e] = half_of(a23[l], e);
      A[gr + 8][c + 8 + e] = half_of(a23[l], 2 + e);
      B[c + e][gr] = half_of(bb[l], e);
      B[c + 8 + e][gr] = half_of(bb[l], 2 + e);
    }
  }
  detail::mma_accumulate(d, A, B);
}

// cvt.rna.tf32.f32: the bits of v rounded to TF32's 10 mantissa bits, to nearest, ties away from zero (the low 13
// bits zero). Inf and NaN pass through.
inline uint32_t to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  if ((u & 0x7F800000u) != 0x7F800000u) u = (u + 0x1000u) & 0xFFFFE000u;  // magnitude bits: the carry is ties-away
  return u;
}
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: d += a b for the warp's 16 x 8 A and 8 x 8 B, g = lane/4,
// t = lane%4: a[0] A(g, t), a[1] A(g+8, t), a[2] A(g, t+4), a[3] A(g+8, t+4); b[0] B(t, g), b[1] B(t+4, g); d as
// mma_m16n8k16's. Only the TF32 bits of each operand are read (the low 13 are ignored, as the tensor core ignores
// them); products exact in float, summed in float in k order after d.
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint64_t a01[32], a23[32], bb[32];
  detail::warp_gather(detail::Collective::mma_m16n8k8, a[0] | (uint64_t{a[1]} << 32), a01);
  detail::warp_gather(detail::Collective::mma_m16n8k8, a[2] | (uint64_t{a[3]} << 32), a23);
  detail::warp_gather(detail::Collective::mma_m16n8k8, b[0] | (uint64_t{b[1]} << 32), bb);
  auto word = [](uint64_t pair, int which) {
    return bits_to_float(static_cast<uint32_t>(pair >> (32 * which)) & 0xFFFFE000u);
  };
  float A[16][8], B[8][8];
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned gr = l / 4, t = l % 4;
    A[gr][t] = word(a01[l], 0);
    A[gr + 8][t] = word(a01[l], 1);
    A[gr][t + 4] = word(a23[l], 0);
    A[gr + 8][t + 4] = word(a23[l], 1);
    B[t][gr] = word(bb[l], 0);
    B[t + 4][gr] = word(bb[l], 1);
  }
  detail::mma_accumulate(d, A, B);
}

inline void cp_async_commit() {}
inline void cp_async_wait_all() {}

// Runs body() once per thread of a blocks x threads grid with smem_bytes of dynamic shared memory per block.
// Returns false with the reason in *error (when error is not null) if the launch is refused or a check fails.
// One launch at a time per process; a launch from inside a kernel is refused.
template <typename F>
inline bool launch(unsigned blocks, unsigned threads, size_t smem_bytes, unsigned cluster, F&& body,
                   std::string* error) {
  auto call = [&body] { body(); };
  using Call = decltype(call);
  return detail::launch(blocks, threads, smem_bytes, cluster, [](void* c) { (*static_cast<Call*>(c))(); }, &call,
                        error);
}
template <typename F>
inline bool launch(unsigned blocks, unsigned threads, size_t smem_bytes, F&& body, std::string* error) {
  return launch(blocks, threads, smem_bytes, 1, static_cast<F&&>(body), error);
}


}  // namespace rf

#pragma GCC visibility pop
