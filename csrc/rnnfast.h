// Host-side interface between the op registrations (ops.cpp, compiled by the C++ compiler) and the kernels
// (one .cu per cell, compiled by nvcc in parallel). Tensors arrive checked and allocated by ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace rnnfast_cuda {

// Cell ids, also the kernels' template argument.
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

// Undefined tensors stand for absent optional inputs.
struct ForwardTensors {
  at::Tensor x;        // (T, B, I), read only in fused mode
  at::Tensor gx;       // (T, B, G*H) compute dtype: x W_ih^T + biases (hoisted mode); undefined in fused mode
  at::Tensor w_ih;     // (G*H, I)
  at::Tensor w_hh;     // (G*H, H)
  at::Tensor bias;     // (G*H,) compute dtype: b_ih + b_hh (GRU n: b_in only); fused mode only
  at::Tensor b_hn;     // (H,) compute dtype, GRU only
  at::Tensor lengths;  // (B,) int64
  at::Tensor y;        // (T, B, H) out
  at::Tensor h_n;      // (B, H) out
  at::Tensor c_n;      // (B, H) out, LSTM only
  at::Tensor gates;    // (T, B, GW*H) compute dtype, out
  at::Tensor hs;       // (T, B, H) compute dtype: state entering each step; the first step's slot holds h0
  at::Tensor cs;       // (T, B, H) compute dtype, LSTM only; likewise c0
  bool reverse = false;
  int64_t block_h = 1;  // hidden units per block
  bool tensor_cores = false;  // WMMA for the recurrent product (float16/bfloat16 only; ignored otherwise)
};

struct BackwardTensors {
  at::Tensor grad_y;   // (T, B, H)
  at::Tensor w_hh;     // (G*H, H)
  at::Tensor lengths;  // (B,) int64
  at::Tensor gates, hs, cs;  // the forward's workspace planes
  at::Tensor d_in;     // (T, B, G*H) compute dtype, out: gradient of the input-part pre-activations
  at::Tensor d_hid;    // (T, B, G*H) compute dtype, out: of the hidden-part ones (is d_in except for GRU)
  at::Tensor dh;       // (B, H) compute dtype, in: grad_h_n, out: dh0
  at::Tensor dc;       // (B, H) compute dtype, LSTM only, in: grad_c_n, out: dc0
  at::Tensor direct;   // (B, H) compute dtype scratch: the part of dh_prev that bypasses W_hh
  bool reverse = false;
  int64_t block_h = 1;
};

void rnn_tanh_forward_cuda(const ForwardTensors& a);
void rnn_relu_forward_cuda(const ForwardTensors& a);
void gru_forward_cuda(const ForwardTensors& a);
void lstm_forward_cuda(const ForwardTensors& a);
void rnn_tanh_backward_recurrent_cuda(const BackwardTensors& a);
void rnn_relu_backward_recurrent_cuda(const BackwardTensors& a);
void gru_backward_recurrent_cuda(const BackwardTensors& a);
void lstm_backward_recurrent_cuda(const BackwardTensors& a);
// Waits on the grid barrier `iters` times with `blocks` blocks of kThreads; writes iters to passed (int32).
void grid_barrier_cuda(const at::Tensor& passed, int64_t blocks, int64_t iters);

}  // namespace rnnfast_cuda
