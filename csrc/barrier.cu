// A kernel that does nothing but wait on the step barrier, the cooperative grid barrier or a split-phase one
// (layer.cuh, StepBarrier), so that its cost, which every step of the persistent kernels pays once, can
// be measured on its own (rnnfast.backends.cuda.measure_grid_barrier).
#include "layer.cuh"

namespace rnnfast_cuda {

struct BarrierArgs {
  int iters;
  int32_t* passed;
  unsigned* sync;
  bool flags;
};

__global__ void __launch_bounds__(kThreads) grid_barrier_kernel(const BarrierArgs p) {
  const StepBarrier barrier{p.sync, p.flags, static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x)};
  for (int i = 0; i < p.iters; ++i) {
    barrier.arrive(i + 1);
    barrier.wait(i + 1);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.passed = p.iters;
}

}  // namespace rnnfast_cuda

extern "C" int rnnfast_grid_barrier(int64_t blocks, int64_t iters, int32_t* passed, uint32_t* counter,
                                    int32_t flags, void* stream) {
  if (blocks < 1 || iters < 0 || passed == nullptr)
    return rnnfast_cuda::invalid("grid_barrier", "need blocks >= 1, iters >= 0 and a result pointer");
  const rnnfast_cuda::BarrierArgs p{static_cast<int>(iters), passed, reinterpret_cast<unsigned*>(counter), flags != 0};
  return rf::launch_cooperative(&rnnfast_cuda::grid_barrier_kernel, p, blocks, rnnfast_cuda::kThreads, 0, stream,
                                "grid_barrier", &rnnfast_cuda::last_error());
}
