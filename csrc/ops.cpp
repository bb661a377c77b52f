// Schemas and CUDA implementations of the low-level kernel ops that rnnfast/cuda.py (CudaBackend) calls. Fake
// kernels are registered from Python (rnnfast/cuda.py) once this library is loaded.
//
// Namespace: rnnfast_cuda, not rnnfast. The Python side already owns rnnfast::{rnn_tanh, rnn_relu, gru, lstm} and
// their _backward ops as torch.library fragments. TORCH_LIBRARY(rnnfast, m) does load next to them (checked with
// torch 2.14), but it would spend the namespace's single TORCH_LIBRARY block on internal kernels and mix them into
// the public op list; a namespace of their own cannot collide with those names and loads, or not, independently.
#include <torch/library.h>

#include <ATen/ATen.h>

#include "rnnfast.h"

namespace rnnfast_cuda {
namespace {

using at::Tensor;
using std::optional;

const char* cell_name(int cell) {
  switch (cell) {
    case kRnnTanh: return "rnn_tanh";
    case kRnnRelu: return "rnn_relu";
    case kGru: return "gru";
    default: return "lstm";
  }
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_tensor(const Tensor& t, const char* op, const char* what, const Tensor& like, at::ScalarType dtype,
                  at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cuda(), op, ": ", what, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), op, ": ", what, " is on ", t.device(), " but x is on ", like.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", what, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": expected ", what, " of shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous");
}

void check_dtype(const Tensor& x, const char* op) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": dtype must be float32, float64, float16 or bfloat16, got ", t);
}

// The workspace is one flat compute-dtype buffer: gates (T, B, GW*H), then hs (T, B, H), then cs (T, B, H) for
// LSTM. Same layout as the Triton backend's.
int64_t workspace_numel(int cell, int64_t T, int64_t B, int64_t H) {
  return T * B * H * (gate_planes_of(cell) + 1 + (cell == kLstm ? 1 : 0));
}

std::tuple<Tensor, Tensor, Tensor> split_workspace(int cell, const Tensor& ws, int64_t T, int64_t B, int64_t H) {
  const int64_t n = T * B * H, gw = gate_planes_of(cell);
  Tensor gates = ws.narrow(0, 0, gw * n).view({T, B, gw * H});
  Tensor hs = ws.narrow(0, gw * n, n).view({T, B, H});
  Tensor cs = cell == kLstm ? ws.narrow(0, (gw + 1) * n, n).view({T, B, H}) : Tensor();
  return {gates, hs, cs};
}

void check_lengths(const optional<Tensor>& lengths, const char* op, const Tensor& x, int64_t B) {
  if (lengths.has_value()) check_tensor(*lengths, op, "lengths", x, at::kLong, {B});
}

template <int CELL>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const Tensor& x, const Tensor& h0, const optional<Tensor>& c0,
                                                   const Tensor& w_ih, const Tensor& w_hh,
                                                   const optional<Tensor>& gx, const optional<Tensor>& bias,
                                                   const optional<Tensor>& b_hn, const optional<Tensor>& lengths,
                                                   bool reverse, int64_t block_h, bool tensor_cores) {
  const char* op = cell_name(CELL);
  check_dtype(x, op);
  TORCH_CHECK(x.dim() == 3, op, ": x must be (T, B, I), got ", x.sizes());
  TORCH_CHECK(w_hh.dim() == 2, op, ": w_hh must be 2-D, got ", w_hh.sizes());
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1), G = gates_of(CELL);
  const auto dt = x.scalar_type(), ct = compute_type(dt);
  check_tensor(x, op, "x", x, dt, {T, B, I});
  check_tensor(h0, op, "h0", x, dt, {B, H});
  check_tensor(w_ih, op, "w_ih", x, dt, {G * H, I});
  check_tensor(w_hh, op, "w_hh", x, dt, {G * H, H});
  TORCH_CHECK(c0.has_value() == (CELL == kLstm), op, ": c0 is required for lstm and only for lstm");
  if (c0.has_value()) check_tensor(*c0, op, "c0", x, dt, {B, H});
  if (gx.has_value()) check_tensor(*gx, op, "gx", x, ct, {T, B, G * H});
  TORCH_CHECK(!(gx.has_value() && bias.has_value()), op, ": the bias goes into gx in hoisted mode");
  if (bias.has_value()) check_tensor(*bias, op, "bias", x, ct, {G * H});
  TORCH_CHECK(!b_hn.has_value() || CELL == kGru, op, ": b_hn is only used by gru");
  if (b_hn.has_value()) check_tensor(*b_hn, op, "b_hn", x, ct, {H});
  check_lengths(lengths, op, x, B);
  TORCH_CHECK(T > 0, op, ": the sequence must have at least one step");
  TORCH_CHECK(block_h >= 1, op, ": block_h must be at least 1, got ", block_h);

  const auto opts = x.options();
  Tensor ws = at::empty({workspace_numel(CELL, T, B, H)}, opts.dtype(ct));
  auto [gates, hs, cs] = split_workspace(CELL, ws, T, B, H);
  const int64_t t0 = reverse ? T - 1 : 0;
  hs[t0].copy_(h0);
  if (CELL == kLstm) cs[t0].copy_(*c0);

  ForwardTensors a;
  a.x = x;
  a.gx = gx.has_value() ? *gx : Tensor();
  a.w_ih = w_ih;
  a.w_hh = w_hh;
  a.bias = bias.has_value() ? *bias : Tensor();
  a.b_hn = b_hn.has_value() ? *b_hn : Tensor();
  a.lengths = lengths.has_value() ? *lengths : Tensor();
  a.y = at::empty({T, B, H}, opts);
  a.h_n = at::empty({B, H}, opts);
  a.c_n = CELL == kLstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
  a.gates = gates;
  a.hs = hs;
  a.cs = cs;
  a.reverse = reverse;
  a.block_h = block_h;
  a.tensor_cores = tensor_cores;
  switch (CELL) {
    case kRnnTanh: rnn_tanh_forward_cuda(a); break;
    case kRnnRelu: rnn_relu_forward_cuda(a); break;
    case kGru: gru_forward_cuda(a); break;
    default: lstm_forward_cuda(a); break;
  }
  return {a.y, a.h_n, a.c_n, ws};
}

template <int CELL>
std::tuple<Tensor, Tensor, Tensor, Tensor> backward_recurrent(const Tensor& grad_y, const Tensor& grad_h_n,
                                                              const optional<Tensor>& grad_c_n, const Tensor& w_hh,
                                                              const Tensor& ws, const optional<Tensor>& lengths,
                                                              bool reverse, int64_t block_h) {
  const char* op = cell_name(CELL);
  check_dtype(grad_y, op);
  TORCH_CHECK(grad_y.dim() == 3, op, ": grad_y must be (T, B, H), got ", grad_y.sizes());
  TORCH_CHECK(w_hh.dim() == 2, op, ": w_hh must be 2-D, got ", w_hh.sizes());
  const int64_t T = grad_y.size(0), B = grad_y.size(1), H = w_hh.size(1), G = gates_of(CELL);
  const auto dt = grad_y.scalar_type(), ct = compute_type(dt);
  check_tensor(grad_y, op, "grad_y", grad_y, dt, {T, B, H});
  check_tensor(grad_h_n, op, "grad_h_n", grad_y, dt, {B, H});
  check_tensor(w_hh, op, "w_hh", grad_y, dt, {G * H, H});
  check_tensor(ws, op, "workspace", grad_y, ct, {workspace_numel(CELL, T, B, H)});
  TORCH_CHECK(grad_c_n.has_value() == (CELL == kLstm), op, ": grad_c_n is required for lstm and only for lstm");
  if (grad_c_n.has_value()) check_tensor(*grad_c_n, op, "grad_c_n", grad_y, dt, {B, H});
  check_lengths(lengths, op, grad_y, B);
  TORCH_CHECK(block_h >= 1, op, ": block_h must be at least 1, got ", block_h);

  const auto opts = grad_y.options().dtype(ct);
  auto [gates, hs, cs] = split_workspace(CELL, ws, T, B, H);
  BackwardTensors a;
  a.grad_y = grad_y;
  a.w_hh = w_hh;
  a.lengths = lengths.has_value() ? *lengths : Tensor();
  a.gates = gates;
  a.hs = hs;
  a.cs = cs;
  a.d_in = at::empty({T, B, G * H}, opts);
  a.d_hid = CELL == kGru ? at::empty({T, B, G * H}, opts) : a.d_in;
  a.dh = grad_h_n.to(ct).contiguous().clone();
  a.dc = CELL == kLstm ? grad_c_n->to(ct).contiguous().clone() : at::empty({0}, opts);
  a.direct = at::empty({B, H}, opts);
  a.reverse = reverse;
  a.block_h = block_h;
  switch (CELL) {
    case kRnnTanh: rnn_tanh_backward_recurrent_cuda(a); break;
    case kRnnRelu: rnn_relu_backward_recurrent_cuda(a); break;
    case kGru: gru_backward_recurrent_cuda(a); break;
    default: lstm_backward_recurrent_cuda(a); break;
  }
  // Outputs never alias each other: the non-GRU d_hid is d_in, returned once.
  return {a.d_in, CELL == kGru ? a.d_hid : at::empty({0}, opts), a.dh, a.dc};
}

Tensor grid_barrier(const Tensor& device_like, int64_t blocks, int64_t iters) {
  TORCH_CHECK(device_like.is_cuda(), "grid_barrier: device_like must be a CUDA tensor");
  TORCH_CHECK(blocks >= 1 && iters >= 0, "grid_barrier: need blocks >= 1 and iters >= 0");
  Tensor passed = at::empty({}, device_like.options().dtype(at::kInt));
  grid_barrier_cuda(passed, blocks, iters);
  return passed;
}

}  // namespace

}  // namespace rnnfast_cuda

// Outputs: forward -> (y, h_n, c_n (empty unless lstm), workspace); backward_recurrent -> (d_in, d_hid (empty
// unless gru), dh0, dc0 (empty unless lstm)), the last three in the compute dtype.
#define RNNFAST_FORWARD_SCHEMA(cell)                                                                       \
  cell "_forward(Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? gx, Tensor? bias, "      \
       "Tensor? b_hn, Tensor? lengths, bool reverse, int block_h, bool tensor_cores) -> "     \
       "(Tensor, Tensor, Tensor, Tensor)"
#define RNNFAST_BACKWARD_SCHEMA(cell)                                                                      \
  cell "_backward_recurrent(Tensor grad_y, Tensor grad_h_n, Tensor? grad_c_n, Tensor w_hh, Tensor workspace, " \
       "Tensor? lengths, bool reverse, int block_h) -> (Tensor, Tensor, Tensor, Tensor)"

TORCH_LIBRARY(rnnfast_cuda, m) {
  m.def(RNNFAST_FORWARD_SCHEMA("rnn_tanh"));
  m.def(RNNFAST_FORWARD_SCHEMA("rnn_relu"));
  m.def(RNNFAST_FORWARD_SCHEMA("gru"));
  m.def(RNNFAST_FORWARD_SCHEMA("lstm"));
  m.def(RNNFAST_BACKWARD_SCHEMA("rnn_tanh"));
  m.def(RNNFAST_BACKWARD_SCHEMA("rnn_relu"));
  m.def(RNNFAST_BACKWARD_SCHEMA("gru"));
  m.def(RNNFAST_BACKWARD_SCHEMA("lstm"));
  // Measures the grid barrier alone: returns iters once every block has passed it that many times.
  m.def("grid_barrier(Tensor device_like, int blocks, int iters) -> Tensor");
}

TORCH_LIBRARY_IMPL(rnnfast_cuda, CUDA, m) {
  m.impl("rnn_tanh_forward", &rnnfast_cuda::forward<rnnfast_cuda::kRnnTanh>);
  m.impl("rnn_relu_forward", &rnnfast_cuda::forward<rnnfast_cuda::kRnnRelu>);
  m.impl("gru_forward", &rnnfast_cuda::forward<rnnfast_cuda::kGru>);
  m.impl("lstm_forward", &rnnfast_cuda::forward<rnnfast_cuda::kLstm>);
  m.impl("rnn_tanh_backward_recurrent", &rnnfast_cuda::backward_recurrent<rnnfast_cuda::kRnnTanh>);
  m.impl("rnn_relu_backward_recurrent", &rnnfast_cuda::backward_recurrent<rnnfast_cuda::kRnnRelu>);
  m.impl("gru_backward_recurrent", &rnnfast_cuda::backward_recurrent<rnnfast_cuda::kGru>);
  m.impl("lstm_backward_recurrent", &rnnfast_cuda::backward_recurrent<rnnfast_cuda::kLstm>);
  m.impl("grid_barrier", &rnnfast_cuda::grid_barrier);
}

