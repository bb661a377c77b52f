// Every GPU primitive the kernels use, with its GPU implementation and its CPU emulation side by side, so that the
// same kernel source compiles with nvcc for the GPU and with the host compiler (RNNFAST_EMULATE) for the CPU
// execution mode. A new primitive is added here, in both halves, and tested on its own (tests/test_cuda_emulation.py).
//
//   rf::half_t, rf::bf16_t        16-bit storage types, convertible to and from float (round to nearest even)
//   rf::acc_t<T>                  the accumulation type: double for double, float otherwise
//   rf::exp_, rf::tanh_           float and double
//   rf::sync_block()              __syncthreads()
//   rf::sync_grid()               the cooperative grid barrier (every thread of every block)
//   rf::grid_arrive(counter),     a split-phase grid barrier on a counter in global memory, zero at launch: a block
//   rf::grid_wait(counter, n)     arrives (block barrier, then thread 0's release add) once its stores are done and
//                                 may work on before it waits (thread 0 polls with acquire loads until the counter
//                                 reaches n, then a block barrier); every block of the cooperative grid must arrive
//   rf::flag_arrive(flags, b, n), the same with one flag a block instead, zero at launch: block b's thread 0 stores n
//   rf::flag_wait(flags, m, n)    (release); the wait polls flags 0..m-1 (acquire), a thread each, until all reach n
//   rf::shfl_xor(v, mask)         __shfl_xor_sync(0xffffffff, v, mask): all 32 lanes of the warp take part
//   rf::ldcg(p)                   __ldcg(p): a load through L2, never a stale L1 line
//   rf::dynamic_smem()            the block's dynamic shared memory (extern __shared__), 128-byte aligned
//   rf::cp_async4(smem, gmem)     cp.async of 4 bytes from global to shared memory (sm_80+); cp_async16 of 16
//                                 bytes through L2 only (both addresses 16-byte aligned); cp_async_commit()
//                                 closes a group, cp_async_wait_all() waits for every copy this thread issued (the
//                                 other threads see them after a block barrier)
//   rf::ldmatrix_x4(r, row)       ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8x8 16-bit matrices, one row
//                                 address a lane (lanes 8i..8i+7: matrix i), into the mma fragment layout
//   rf::mma_m16n8k16<T>(d, a, b)  mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32, d += a b (T half_t or bf16_t)
//   rf::mma_m16n8k8_tf32(d, a, b) mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32; rf::to_tf32(v) is
//                                 cvt.rna.tf32.f32 (the TF32 bits of v, rounded to nearest, ties away),
//                                 rf::bits_to_float its float
//   rf::cluster_sync(),           thread-block clusters (sm_90): the cluster's barrier (release/acquire at cluster
//   rf::cluster_rank(),           scope), the block's rank in it, and the address in block `rank` of the cluster of
//   rf::map_shared(p, rank)       what p is in this block's shared memory (distributed shared memory)
//   rf::vec16, rf::ldcg16(p)      16 bytes (uint4), loaded through L2
//   rf::launch_cooperative(...)   a cooperative launch with its co-residency checks (below); with clusters of more
//                                 than one block, a cluster launch whose clusters must all be resident at once
//
// Under RNNFAST_EMULATE the CUDA qualifiers are defined away, threadIdx/blockIdx/blockDim/gridDim are variables the
// fiber scheduler (emulate.cpp) sets for the thread it resumes, every thread of the grid is a fiber, and the
// barriers and shuffles switch fibers. Dynamic shared memory is poisoned (NaN bytes) at every launch and guarded
// against overruns; ldmatrix and cp.async addresses are checked for the alignment the hardware requires.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "capi.h"

#ifndef RNNFAST_EMULATE
// ----------------------------------------------------------------------------------------------- the GPU -------
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define RF_DEVICE __device__ __forceinline__
#define RF_HOST_DEVICE __host__ __device__ __forceinline__

namespace rf {

using half_t = __half;
using bf16_t = __nv_bfloat16;

RF_DEVICE float exp_(float v) { return expf(v); }
RF_DEVICE double exp_(double v) { return exp(v); }
RF_DEVICE float tanh_(float v) { return tanhf(v); }
RF_DEVICE double tanh_(double v) { return tanh(v); }

RF_DEVICE void sync_block() { __syncthreads(); }
RF_DEVICE void sync_grid() { cooperative_groups::this_grid().sync(); }
// Clusters exist from sm_90 on; the launch refuses them on an older GPU, so these never run there.
RF_DEVICE void cluster_sync() {
#if __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __trap();
#endif
}
RF_DEVICE unsigned cluster_rank() {
#if __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}
template <typename T>
RF_DEVICE T* map_shared(T* p, unsigned rank) {
#if __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  return rank == 0 ? p : nullptr;
#endif
}
using vec16 = uint4;
RF_DEVICE vec16 ldcg16(const void* p) { return __ldcg(static_cast<const uint4*>(p)); }
// The block barrier orders every thread's stores before thread 0's release (release is cumulative), so a block that
// sees the count with an acquire load and then passes its own block barrier sees them all.
RF_DEVICE void grid_arrive(unsigned* counter) {
  __syncthreads();
  if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(counter) : "memory");
}
RF_DEVICE void flag_arrive(unsigned* flags, int block, unsigned n) {
  __syncthreads();
  if (threadIdx.x == 0) asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(flags + block), "r"(n) : "memory");
}
RF_DEVICE void flag_wait(const unsigned* flags, int blocks, unsigned n) {
  for (int b = threadIdx.x; b < blocks; b += blockDim.x) {
    unsigned seen;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(seen) : "l"(flags + b) : "memory");
    } while (seen < n);
  }
  __syncthreads();
}
RF_DEVICE void grid_wait(const unsigned* counter, unsigned target) {
  if (threadIdx.x == 0) {
    unsigned seen;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen < target);
  }
  __syncthreads();
}
template <typename T>
RF_DEVICE T shfl_xor(T v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
template <typename T>
RF_DEVICE T ldcg(const T* p) { return __ldcg(p); }
RF_DEVICE unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char rf_smem[];
  return rf_smem;
}

RF_DEVICE void cp_async4(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem) : "memory");
}
// 16 bytes through L2 only (.cg: never a stale L1 line), for data other blocks wrote before a grid barrier.
RF_DEVICE void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}
RF_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
template <typename T>
RF_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
RF_DEVICE uint32_t to_tf32(float v) {
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(u) : "f"(v));
  return u;
}
RF_DEVICE float bits_to_float(uint32_t u) { return __uint_as_float(u); }
RF_DEVICE void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
RF_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
RF_DEVICE void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }


#define RF_CUDA_TRY(call)                                                                         \
  do {                                                                                            \
    const cudaError_t rf_status_ = (call);                                                        \
    if (rf_status_ != cudaSuccess) {                                                              \
      *error = std::string(#call " failed: ") + cudaGetErrorString(rf_status_);                   \
      return RNNFAST_CUDA_ERROR;                                                                  \
    }                                                                                             \
  } while (0)

// A cooperative launch of `blocks` x `threads`, refused with the reason (RNNFAST_REFUSED) when the blocks cannot
// all be resident at once, which the grid barrier needs: the launch itself would fail, or worse, hang.
//
// With cluster > 1 (clusters of that many consecutive blocks, sm_90) the launch is a cluster launch instead, not
// cooperative (the kernels then synchronise through their split-phase barrier, never grid.sync): refused unless
// the GPU can hold every cluster at once.
template <typename Args>
inline int launch_cooperative(void (*kernel)(Args), const Args& p, int64_t blocks, int threads, size_t smem,
                              void* stream, const char* what, std::string* error, int cluster = 1) {
  const void* fn = reinterpret_cast<const void*>(kernel);
  int dev = 0, coop = 0, optin = 0, sms = 0;
  RF_CUDA_TRY(cudaGetDevice(&dev));
  if (cluster > 1) {
    int major = 0;
    RF_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    RF_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (major < 9 || blocks % cluster != 0 || smem > static_cast<size_t>(optin)) {
      *error = std::string(what) + ": clusters of " + std::to_string(cluster) + " blocks need an sm_90 GPU, a grid " +
               "they divide and shared memory the GPU has";
      return RNNFAST_REFUSED;
    }
    RF_CUDA_TRY(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
    if (cluster > 8) RF_CUDA_TRY(cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(blocks));
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = static_cast<cudaStream_t>(stream);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    RF_CUDA_TRY(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
    if (static_cast<int64_t>(clusters) * cluster < blocks) {
      *error = std::string(what) + ": " + std::to_string(blocks / cluster) + " clusters of " +
               std::to_string(cluster) + " blocks must be resident at once for the step barrier, but this GPU holds " +
               std::to_string(clusters);
      return RNNFAST_REFUSED;
    }
    RF_CUDA_TRY(cudaLaunchKernelEx(&cfg, kernel, p));
    RF_CUDA_TRY(cudaGetLastError());
    return RNNFAST_OK;
  }
  RF_CUDA_TRY(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev));
  RF_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  RF_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (!coop) {
    *error = std::string(what) + ": this GPU does not support cooperative launches";
    return RNNFAST_REFUSED;
  }
  if (smem > static_cast<size_t>(optin)) {
    *error = std::string(what) + ": one block needs " + std::to_string(smem) + " bytes of shared memory but this "
             "GPU allows " + std::to_string(optin) + " per block (hidden size too large)";
    return RNNFAST_REFUSED;
  }
  // The device maximum, the same for every caller: a per-launch size could race with another host thread's launch.
  RF_CUDA_TRY(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  int per_sm = 0;
  RF_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, threads, smem));
  if (static_cast<int64_t>(per_sm) * sms < blocks) {
    *error = std::string(what) + ": " + std::to_string(blocks) + " blocks must be resident at once for the grid "
             "barrier, but this GPU holds " + std::to_string(per_sm) + " x " + std::to_string(sms);
    return RNNFAST_REFUSED;
  }
  void* args[] = {const_cast<Args*>(&p)};
  RF_CUDA_TRY(cudaLaunchCooperativeKernel(fn, dim3(static_cast<unsigned>(blocks)), dim3(threads), args, smem,
                                          static_cast<cudaStream_t>(stream)));
  RF_CUDA_TRY(cudaGetLastError());
  return RNNFAST_OK;
}

constexpr int kEmulated = 0;

}  // namespace rf

#else
// ------------------------------------------------------------------------------------------ the CPU emulation ---
#include "emulate.h"

namespace rf {

// The device the emulation stands for: an H100/H200 (132 multiprocessors, 227 KiB of shared memory per block),
// one block of the layer kernels per multiprocessor. rnnfast/backends/cuda.py plans with the same numbers.
constexpr int64_t kEmulatedSMs = 132;
constexpr size_t kEmulatedSmemOptin = 232448;
constexpr int kEmulated = 1;

template <typename Args>
inline int launch_cooperative(void (*kernel)(Args), const Args& p, int64_t blocks, int threads, size_t smem,
                              void* /*stream*/, const char* what, std::string* error, int cluster = 1) {
  if (smem > kEmulatedSmemOptin) {
    *error = std::string(what) + ": one block needs " + std::to_string(smem) + " bytes of shared memory but the "
             "emulated GPU allows " + std::to_string(kEmulatedSmemOptin) + " per block (hidden size too large)";
    return RNNFAST_REFUSED;
  }
  if (blocks > kEmulatedSMs) {
    *error = std::string(what) + ": " + std::to_string(blocks) + " blocks must be resident at once for the grid "
             "barrier, but the emulated GPU holds 1 x " + std::to_string(kEmulatedSMs);
    return RNNFAST_REFUSED;
  }
  const bool ok = launch(static_cast<unsigned>(blocks), static_cast<unsigned>(threads), smem,
                         static_cast<unsigned>(cluster), [&] { kernel(p); }, error);
  if (!ok) *error = std::string(what) + ": " + *error;
  return ok ? RNNFAST_OK : RNNFAST_EMULATION_ERROR;
}

}  // namespace rf
#endif

namespace rf {

template <typename T>
struct acc { using type = float; };
template <>
struct acc<double> { using type = double; };
template <typename T>
using acc_t = typename acc<T>::type;

RF_HOST_DEVICE int imin(int a, int b) { return a < b ? a : b; }
RF_HOST_DEVICE int imax(int a, int b) { return a > b ? a : b; }
template <typename T>
RF_HOST_DEVICE float to_float(T v) { return static_cast<float>(v); }
RF_DEVICE void from_float(float v, half_t* out) { *out = half_t(v); }
RF_DEVICE void from_float(float v, bf16_t* out) { *out = bf16_t(v); }
RF_DEVICE void from_float(float v, float* out) { *out = v; }

}  // namespace rf
