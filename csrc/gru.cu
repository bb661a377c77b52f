// The gru layer's persistent forward and recurrent backward kernels (templates in layer.cuh), one file per cell so
// that nvcc compiles the cells in parallel.
#include "layer.cuh"

namespace rnnfast_cuda {

RNNFAST_DEFINE_CELL(gru, kGru)

}  // namespace rnnfast_cuda
