// Constants shared by the kernels (layer.cuh) and their C entry points (capi.h): cell ids, threads per block.
// Free of torch and of CUDA headers.
#pragma once

namespace rnnfast_cuda {

// Cell ids, also the kernels' template argument (the same numbers as capi.h's RNNFAST_CELL_*).
constexpr int kRnnTanh = 0;
constexpr int kRnnRelu = 1;
constexpr int kGru = 2;
constexpr int kLstm = 3;

// Threads per block of both kernels; the Python plan and the occupancy check assume it.
constexpr int kThreads = 256;

// Gate rows of W_ih/W_hh per hidden unit.
constexpr int gates_of(int cell) { return cell == kGru ? 3 : (cell == kLstm ? 4 : 1); }
// Planes per hidden unit the forward keeps in the workspace for the backward (GRU adds W_hn h + b_hn).
constexpr int gate_planes_of(int cell) { return cell == kGru ? 4 : gates_of(cell); }

}  // namespace rnnfast_cuda
