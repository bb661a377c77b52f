// A kernel that does nothing but wait on the cooperative grid barrier, so that its cost, which every step of the
// persistent kernels pays once, can be measured on its own (rnnfast.cuda.measure_grid_barrier).
#include "layer.cuh"

namespace rnnfast_cuda {

__global__ void __launch_bounds__(kThreads) grid_barrier_kernel(int iters, int* passed) {
  cg::grid_group grid = cg::this_grid();
  for (int i = 0; i < iters; ++i) grid.sync();
  if (blockIdx.x == 0 && threadIdx.x == 0) *passed = iters;
}

void grid_barrier_cuda(const at::Tensor& passed, int64_t blocks, int64_t iters) {
  const c10::cuda::CUDAGuard guard(passed.device());
  const void* kernel = reinterpret_cast<const void*>(&grid_barrier_kernel);
  check_cooperative(kernel, blocks, 0, "grid_barrier");
  int n = static_cast<int>(iters);
  int* out = passed.data_ptr<int>();
  void* args[] = {&n, &out};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), args, 0,
                                             at::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace rnnfast_cuda
