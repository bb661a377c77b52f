// The lstm layer's persistent forward and recurrent backward kernels (templates in layer.cuh) and their C entry
// points (capi.h), one file per cell so that nvcc compiles the cells in parallel.
#include "layer.cuh"

RNNFAST_DEFINE_CELL(lstm, rnnfast_cuda::kLstm)
