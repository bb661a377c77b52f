// The C ABI's queries and error message (capi.h); the entry points themselves are in the per-cell .cu files.
// Compiled by nvcc for the GPU library and by the host compiler for the emulation, like the kernels.
#include "layer.cuh"

namespace rnnfast_cuda {

std::string& last_error() {
  thread_local std::string message;
  return message;
}

namespace {

size_t dtype_size(int dtype) { return dtype == RNNFAST_DTYPE_F64 ? 8 : (dtype == RNNFAST_DTYPE_F32 ? 4 : 2); }
bool has_mma(int dtype) { return dtype != RNNFAST_DTYPE_F64; }

}  // namespace
}  // namespace rnnfast_cuda

extern "C" int rnnfast_abi_version(void) { return RNNFAST_ABI_VERSION; }
extern "C" int rnnfast_emulated(void) { return rf::kEmulated; }
extern "C" const char* rnnfast_last_error(void) { return rnnfast_cuda::last_error().c_str(); }

extern "C" size_t rnnfast_forward_smem_bytes(int cell, int dtype, int64_t B, int64_t H, int64_t block_h,
                                             int64_t m_tile) {
  using namespace rnnfast_cuda;
  return forward_smem_bytes(dtype_size(dtype), gates_of(cell), static_cast<int>(B), static_cast<int>(H),
                            static_cast<int>(block_h), has_mma(dtype) ? static_cast<int>(m_tile) : 0);
}

extern "C" size_t rnnfast_backward_smem_bytes(int cell, int dtype, int64_t B, int64_t H, int64_t block_h,
                                              int64_t m_tile) {
  using namespace rnnfast_cuda;
  (void)B;
  return backward_smem_bytes(dtype_size(dtype), gates_of(cell), static_cast<int>(H), static_cast<int>(block_h),
                             has_mma(dtype) ? static_cast<int>(m_tile) : 0);
}
