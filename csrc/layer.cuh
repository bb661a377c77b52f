// Persistent whole-sequence kernels for one layer in one direction, templated on the cell and dtype.
//
// Work split (forward and backward alike): block `blk` owns hidden units [blk*HB, blk*HB + HB) with every gate
// of those units and the whole batch, for the whole sequence. Its slice of W_hh stays in shared memory from the
// first step to the last. Blocks exchange the state through global memory, one slot per step, and wait for each
// other with a cooperative-groups grid barrier, so the grid must be co-resident (cooperative launch, checked).
//
// Arithmetic: operands in the layer's dtype, products and sums in acc_t (float for half types and float32,
// double for float64), state h and c carried in acc_t, as rnnfast/reference.py computes. The recurrent products of
// the forward (h_{t-1} W_hh^T) and of the backward (d_hid W_hh) run on tensor cores when the caller asks and the
// tiles fit shared memory: ldmatrix and mma.sync m16n8k16 for float16/bfloat16, mma.sync m16n8k8 TF32 for float32
// (one pass under torch.backends.cudnn.allow_tf32, or 3xTF32: the remainders' products added, for about float32's
// accuracy), fp32 accumulation, their K split across every warp of the block (mma_recurrent_product), the batch in
// tiles of m_tile rows so that one tile of the A operand fits beside the resident W_hh slice. The step's pointwise
// part then runs one thread per (sequence, unit), with the units' own h and c in shared memory and the hoisted input
// part of the next step prefetched there (cp.async) before the step barrier; the A operand is in the layer's dtype
// for the product, as cuDNN does. Steps are separated by a split-phase barrier (StepBarrier). Every
// other product (float64, the fused input part, what does not fit) is a plain FMA loop, one warp per (sequence,
// chunk of up to 8 units), lanes splitting K, a butterfly shuffle sum at the end.
//
// Thread-block clusters (cluster > 1, sm_90, a plan switch): the blocks of a cluster stage each tensor-core tile
// together, each reading its share from L2 and storing it into every block of the cluster (mma_recurrent_product).
//
// Per step and block (forward, tensor cores): read B x H of h_{t-1} (layer dtype, one m_tile-row tile at a time; in
// a cluster of n, B x H / n of it from L2 and the rest from the other blocks' shared memory) and B x G*HB of the
// hoisted input (fp32, prefetched) from L2, 2*B*G*HB*H MMA flops (3x for 3xTF32), write B x HB of h, y, c and the
// gates, one step barrier (plus two cluster barriers a batch tile in a cluster). Backward: B x G*H of the gate
// gradients read, 2*B*HB*G*H MMA flops, one step barrier.
// Predicted with clusters of 4 (a switch, off): (a) 2.3 and 3.1, (b) 3.5 and 9.9, (c) 18 and 35 us/step.
// Predicted (kernels/cost.py, cuda_kernel_step; assumptions, not measured on a GPU): (a) LSTM bf16 B=16 H=768,
// 128 blocks x 6 units: 2.3 us/step forward, 4.3 backward; (b) LSTM fp32 B=64 H=512 (TF32; the backward in batch
// tiles of 16 rows): 5.2 and 16.5; (c) GRU bf16 B=256 H=1024 (batch tiles of 48 rows forward, 16 backward): 24 and
// 53. `python -m rnnfast.build --report` prints them.
// Measured: nothing yet.
#pragma once

#include <string>
#include <type_traits>

#include "capi.h"
#include "primitives.cuh"
#include "rnnfast.h"

namespace rnnfast_cuda {

using rf::exp_;
using rf::from_float;
using rf::tanh_;

constexpr int kWarps = kThreads / 32;

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const scalar_t* x;
  const acc_t* gx;  // null in fused mode
  const scalar_t* w_ih;
  const scalar_t* w_hh;
  const acc_t* bias;  // null without bias, and in hoisted mode (gx holds it)
  const acc_t* b_hn;  // GRU only; null without bias
  const int64_t* lengths;  // null: every sequence has T steps
  scalar_t* y;
  scalar_t* h_n;
  scalar_t* c_n;
  scalar_t* gates;  // saved in the layer dtype (16 bits for half types)
  scalar_t* hs;  // the exchange between blocks, in the layer dtype
  scalar_t* cs;  // the saved cell states, in the layer dtype like hs
  acc_t* hc;  // (B, H): each unit's own state, in acc_t, read and written only by the thread that updates it
  acc_t* cc;  // (B, H): the same for LSTM's cell state
  unsigned* sync;  // the step barrier's counter or flags, zero at launch (StepBarrier); null: grid.sync
  bool sync_flags;  // sync holds one flag a block of the direction, not one counter
  int cluster;  // blocks a thread-block cluster, sharing the tensor-core A operand's reads (1: no clusters)
  int T, B, I, H, HB;
  bool reverse;
  int passes;  // 0: FMA; 1: tensor cores (the layer dtype's mma, TF32 for float32); 3: 3xTF32 (float32 only)
  int m_tile;  // rows of the batch per tensor-core product, a multiple of 16: the batch is tiled to fit shared memory
  int n_pad, k_pad;  // G*HB rounded up to the tile width (mma_n_pad) and H to 16: the tensor-core tile grid
  int k_ld;  // row stride of both operands in shared memory: k_pad plus 16 bytes (mma_k_ld)
  int splits;  // K ranges the product is split into, one warp each (mma_splits)
};

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* grad_y;
  const scalar_t* w_hh;
  const int64_t* lengths;
  const scalar_t* gates;
  const scalar_t* hs;
  const scalar_t* cs;
  scalar_t* d_in;  // in the layer dtype, like the forward's saved gates
  scalar_t* d_hid;  // == d_in except for GRU; the backward's exchange between blocks
  acc_t* dh;
  acc_t* dc;
  acc_t* direct;
  unsigned* sync;  // as ForwardArgs
  bool sync_flags;
  int cluster;
  int T, B, H, HB;
  bool reverse;
  int passes, m_tile, n_pad, k_pad, k_ld, splits;  // as ForwardArgs, for M = B, N = HB, K = G*H
};

// The arguments of one launch: `dirs` independent recurrences of the same shape (a bidirectional layer's two
// directions), blocks [d * blocks, (d + 1) * blocks) running dir[d] with its own buffers and barrier counter.
template <typename Args>
struct Directions {
  Args dir[2];
  int blocks;  // per direction
};

template <typename T>
__device__ __forceinline__ T sigmoid_(T v) { return T(1) / (T(1) + exp_(-v)); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  // Butterfly: every lane ends with the total.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += rf::shfl_xor(v, o);
  return v;
}

// How a block's recurrent product runs on tensor cores, per layer dtype: st_t, the operand type kept in shared
// memory (ldmatrix + mma.sync m16n8k16 for the 16-bit types, 16 x 16 tiles; mma.sync m16n8k8 TF32 for float32,
// 16 x 8 tiles: mma_depth, mma_width). st_t void: no tensor-core path (float64, which stays on DFMA). float32
// keeps its operands unrounded in shared memory and rounds each fragment to TF32 as it is loaded; 3xTF32 adds the
// products of the remainders, for about float32's accuracy.
template <typename scalar_t>
struct Mma { using st_t = void; };
template <>
struct Mma<rf::half_t> { using st_t = rf::half_t; };
template <>
struct Mma<rf::bf16_t> { using st_t = rf::bf16_t; };
template <>
struct Mma<float> { using st_t = float; };

// The tile shape of a layer dtype's tensor-core product, from its size (the C size queries know only that): TF32
// mma is 8 deep and its tiles 8 wide; the 16-bit types' are 16 and 16 (two m16n8k16 a tile, one ldmatrix for W).
__host__ __device__ constexpr int mma_depth(size_t elem) { return elem == 4 ? 8 : 16; }
__host__ __device__ constexpr int mma_width(size_t elem) { return elem == 4 ? 8 : 16; }

__host__ __device__ inline int pad16(int64_t n) { return static_cast<int>((n + 15) / 16 * 16); }
__host__ __device__ inline int mma_n_pad(size_t elem, int64_t n) {
  const int w = mma_width(elem);
  return static_cast<int>((n + w - 1) / w * w);
}
// k_pad plus 16 bytes: the 8 rows one ldmatrix (or, TF32, one fragment's word loads) reads fall in different banks.
__host__ __device__ inline int mma_k_ld(size_t elem, int k_pad) { return k_pad + static_cast<int>(16 / elem); }

// How many K ranges the product of an m_tile x n_pad tile grid over k_pad is split into: enough that every warp of
// the block has a (tile, K range) to work on, but no range shorter than one mma deep.
__host__ __device__ inline int mma_splits(int m_tile, int n_pad, int k_pad, size_t elem) {
  const int tiles = (m_tile / 16) * (n_pad / mma_width(elem)), chunks = k_pad / mma_depth(elem);
  const int s = tiles >= kWarps ? 1 : kWarps / tiles;
  return s < chunks ? s : chunks;
}

// Bytes of shared memory of the product of M x K by K x N (mma_recurrent_product), for M the rows of one batch
// tile: both operands padded to [*][k_ld] in st_t, then the fp32 partial products [splits][m_tile][n_pad].
__host__ __device__ inline size_t mma_smem_bytes(size_t elem, int M, int N, int K) {
  const int m = pad16(M), n = mma_n_pad(elem, N), k_pad = pad16(K);
  return elem * static_cast<size_t>(n + m) * mma_k_ld(elem, k_pad) +
         sizeof(float) * static_cast<size_t>(m) * n * mma_splits(m, n, k_pad, elem);
}

// The forward's tensor-core path prefetches the hoisted input part of the next step for the whole batch,
// [2][B][G*HB] fp32 (two buffers, by step parity), behind mma_recurrent_product's region (of one m_tile-row batch
// tile).
__host__ __device__ inline size_t prefetch_offset(size_t elem, int m_tile, int N, int K) {
  return mma_smem_bytes(elem, m_tile, N, K);
}

// The tensor-core forward keeps each of its units' own state on chip, [planes][B][HB] fp32 (h, and LSTM's c), after
// the prefetch buffers: the step reads and writes it there instead of in global memory.
__host__ __device__ inline size_t own_state_offset(size_t elem, int G, int B, int H, int HB, int m_tile) {
  return prefetch_offset(elem, m_tile, G * HB, H) + 2 * sizeof(float) * static_cast<size_t>(B) * G * HB;
}
__host__ __device__ inline int own_state_planes(int G) { return G == 4 ? 2 : 1; }  // LSTM: h and c

// Bytes of shared memory of the forward kernel: the FMA path (m_tile 0) keeps W_hh's slice [G][HB][H]; the mma
// path mma_smem_bytes for M = m_tile, N = G*HB, K = H, then the prefetch buffers and the units' own state.
inline size_t forward_smem_bytes(size_t elem, int G, int B, int H, int HB, int m_tile) {
  if (m_tile == 0) return elem * G * HB * H;
  return own_state_offset(elem, G, B, H, HB, m_tile) +
         sizeof(float) * own_state_planes(G) * static_cast<size_t>(B) * HB;
}

// The backward's: W_hh^T's slice [HB][G*H] on the FMA path (m_tile 0); mma_smem_bytes for M = m_tile, N = HB,
// K = G*H on tensor cores.
inline size_t backward_smem_bytes(size_t elem, int G, int H, int HB, int m_tile) {
  if (m_tile == 0) return elem * G * HB * H;
  return mma_smem_bytes(elem, m_tile, HB, G * H);
}

// The barrier between steps, in two halves: a block arrives at the n-th (n from 1) once its stores that the other
// blocks read are done, and waits before it reads theirs; between the two it may do work of its own. On a counter
// (sync), each of the direction's `blocks` blocks adds one (rf::grid_arrive) and the wait is for n * blocks; on
// flags (sync_flags), block blk stores n into its own flag and the wait is for every flag to reach n (no atomic,
// so no arrivals queue on one address); without sync, the cooperative grid barrier, all of it in the wait (every
// direction of the launch takes the same number of them).
struct StepBarrier {
  unsigned* sync;
  bool flags;
  int blk, blocks;

  __device__ __forceinline__ void arrive(int n) const {
    if (sync == nullptr) return;
    if (flags) rf::flag_arrive(sync, blk, static_cast<unsigned>(n));
    else rf::grid_arrive(sync);
  }
  __device__ __forceinline__ void wait(int n) const {
    if (sync == nullptr) rf::sync_grid();
    else if (flags) rf::flag_wait(sync, blocks, static_cast<unsigned>(n));
    else rf::grid_wait(sync, static_cast<unsigned>(n) * static_cast<unsigned>(blocks));
  }
};

__device__ __forceinline__ bool is_active(const int64_t* lengths, int t, int b) {
  return lengths == nullptr || static_cast<int64_t>(t) < lengths[b];
}

__host__ __device__ inline size_t mma_product_offset(size_t elem, int m_tile, int n_pad, int k_ld) {
  return elem * static_cast<size_t>(n_pad + m_tile) * k_ld;
}

// d += a b for one 16 x 8 x 8 TF32 chunk from float32 operands in the PTX fragment layout (mma_m16n8k8_tf32):
// each rounded to TF32 (passes 1), or split into a TF32 high part and a TF32 remainder, adding the three largest
// products (passes 3, 3xTF32).
__device__ __forceinline__ void tf32_mma(float (&d)[4], const float (&av)[4], const float (&bv)[2], int passes) {
  uint32_t a[4], b[2];
  if (passes == 3) {
    uint32_t a_lo[4], b_lo[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      a[i] = rf::to_tf32(av[i]);
      a_lo[i] = rf::to_tf32(av[i] - rf::bits_to_float(a[i]));
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      b[i] = rf::to_tf32(bv[i]);
      b_lo[i] = rf::to_tf32(bv[i] - rf::bits_to_float(b[i]));
    }
    // The small products first, so that they are not lost against the large one.
    rf::mma_m16n8k8_tf32(d, a_lo, b);
    rf::mma_m16n8k8_tf32(d, a, b_lo);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = rf::to_tf32(av[i]);
#pragma unroll
    for (int i = 0; i < 2; ++i) b[i] = rf::to_tf32(bv[i]);
  }
  rf::mma_m16n8k8_tf32(d, a, b);
}

// The block's recurrent product on tensor cores for one batch tile: prod[m][n] = sum_k a[m0 + m][k] W[n][k] for its
// m_tile x n_pad tile grid (a: M rows of K in global memory, in the layer dtype, written by other blocks before the
// grid barrier; rows from M on are zero), the K chunks of each tile split into `splits` ranges, one warp per (tile,
// range), so every warp works even when the tiles are fewer than the warps. Shared memory: W (operand B,
// [n_pad][k_ld] in st_t) at 0, the batch tile of a in st_t (operand A, row-major [m_tile][k_ld]) after it, the fp32
// partial products [splits][m_tile][n_pad] after that (mma_sum adds them up). Ends with a block barrier, so the
// product is ready for every thread; the barrier after staging a also orders the previous tile's reads of prod
// before this tile's stores. Columns k_pad..k_ld-1 are never read.
//
// In a thread-block cluster (cluster > 1), the blocks stage the same tile: each loads its share of the 16-byte
// chunks from L2 once and stores them into every block of the cluster (distributed shared memory), so that the
// cluster reads the tile from L2 once instead of once a block; a cluster barrier before (every block is done with
// the previous tile) and one after (every chunk has landed everywhere).
template <typename scalar_t, typename in_t>
__device__ void mma_recurrent_product(const in_t* a, unsigned char* smem, int M, int K, int m0, int m_tile,
                                      int n_pad, int k_pad, int k_ld, int splits, int passes, int cluster) {
  using st_t = typename Mma<scalar_t>::st_t;
  constexpr int kK = mma_depth(sizeof(st_t)), kWidth = mma_width(sizeof(st_t));
  const st_t* wt = reinterpret_cast<const st_t*>(smem);
  st_t* at = reinterpret_cast<st_t*>(smem) + static_cast<size_t>(n_pad) * k_ld;
  float* prod = reinterpret_cast<float*>(smem + mma_product_offset(sizeof(st_t), m_tile, n_pad, k_ld));
  // Through L2 only (cp.async.cg, ld.cg), never a stale L1 line. Rows of 16-byte multiples, 16-byte aligned: 16-byte
  // asynchronous copies, consecutive threads on consecutive chunks of a row; else one warp per row, an element a lane.
  constexpr int kVec = 16 / sizeof(st_t);
  const bool wide = std::is_same_v<in_t, st_t> && K % kVec == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0;
  const int row_vecs = k_pad / kVec;
  if (wide && cluster > 1) {
    rf::cluster_sync();
    const int rank = static_cast<int>(rf::cluster_rank());
    for (int idx = rank * blockDim.x + threadIdx.x; idx < m_tile * row_vecs; idx += cluster * blockDim.x) {
      const int m = idx / row_vecs, v = idx % row_vecs, row = m0 + m;
      rf::vec16* dst = reinterpret_cast<rf::vec16*>(at + static_cast<size_t>(m) * k_ld + v * kVec);
      rf::vec16 chunk = {};
      if (row < M && v * kVec < K) chunk = rf::ldcg16(a + static_cast<int64_t>(row) * K + v * kVec);
      for (int r = 0; r < cluster; ++r) *rf::map_shared(dst, static_cast<unsigned>(r)) = chunk;
    }
    rf::cluster_sync();
  } else if (wide) {
    for (int idx = threadIdx.x; idx < m_tile * row_vecs; idx += blockDim.x) {
      const int m = idx / row_vecs, v = idx % row_vecs, row = m0 + m;
      st_t* dst = at + static_cast<size_t>(m) * k_ld + v * kVec;
      if (row < M && v * kVec < K) {
        rf::cp_async16(dst, a + static_cast<int64_t>(row) * K + v * kVec);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) from_float(0.f, dst + i);
      }
    }
    rf::cp_async_commit();
    rf::cp_async_wait_all();
  } else {
    for (int m = threadIdx.x / 32; m < m_tile; m += blockDim.x / 32) {
      const int row = m0 + m;
      for (int k = threadIdx.x % 32; k < k_pad; k += 32)
        from_float(row < M && k < K ? static_cast<float>(rf::ldcg(a + static_cast<int64_t>(row) * K + k)) : 0.f,
                   &at[m * k_ld + k]);
    }
  }
  rf::sync_block();
  const int n_tiles = n_pad / kWidth, tiles = (m_tile / 16) * n_tiles, chunks = k_pad / kK;
  if constexpr (!std::is_same_v<st_t, float>) {
    // 16-bit types: ldmatrix and mma.sync m16n8k16, two n halves of the 16 x 16 tile per k16 chunk. Lane l gives
    // ldmatrix the address of row l%8 of 8x8 matrix l/8: for A, (rows +8 for odd matrices, columns +8 for the
    // last two), so that the registers are mma's a[0..3]; for W, [n][k] being B column-major, (columns +8 for odd
    // matrices, rows +8 for the last two): b of the first n half, then of the second.
    const int lane = threadIdx.x % 32, r8 = lane % 8, odd = (lane / 8) % 2, high = lane / 16;
    for (int work = threadIdx.x / 32; work < tiles * splits; work += blockDim.x / 32) {
      const int tile = work % tiles, split = work / tiles;
      const int mt = tile / n_tiles, nt = tile % n_tiles;
      float acc[2][4] = {};
      const st_t* a_row = at + static_cast<size_t>(mt * 16 + r8 + odd * 8) * k_ld + high * 8;
      const st_t* w_row = wt + static_cast<size_t>(nt * 16 + r8 + high * 8) * k_ld + odd * 8;
      for (int c = split * chunks / splits; c < (split + 1) * chunks / splits; ++c) {
        uint32_t fa[4], fb[4];
        rf::ldmatrix_x4(fa, a_row + c * 16);
        rf::ldmatrix_x4(fb, w_row + c * 16);
        const uint32_t b_lo[2] = {fb[0], fb[1]}, b_hi[2] = {fb[2], fb[3]};
        rf::mma_m16n8k16<st_t>(acc[0], fa, b_lo);
        rf::mma_m16n8k16<st_t>(acc[1], fa, b_hi);
      }
      // D(g, c..c+1) in acc[h][0..1], D(g+8, c..c+1) in acc[h][2..3], g = lane/4, c = 2(lane%4).
      float* out = prod + (static_cast<size_t>(split) * m_tile + mt * 16 + lane / 4) * n_pad + nt * 16 + 2 * (lane % 4);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        out[h * 8] = acc[h][0];
        out[h * 8 + 1] = acc[h][1];
        out[8 * n_pad + h * 8] = acc[h][2];
        out[8 * n_pad + h * 8 + 1] = acc[h][3];
      }
    }
  } else {
    // float32: mma.sync m16n8k8 TF32 on 16 x 8 tiles, the fragments read from shared memory a word at a time:
    // A(g, t), A(g+8, t), A(g, t+4), A(g+8, t+4) and B(t, g), B(t+4, g) of each 8-deep chunk, g = lane/4, t = lane%4.
    const int lane = threadIdx.x % 32, gr = lane / 4, tq = lane % 4;
    for (int work = threadIdx.x / 32; work < tiles * splits; work += blockDim.x / 32) {
      const int tile = work % tiles, split = work / tiles;
      const int mt = tile / n_tiles, nt = tile % n_tiles;
      float acc[4] = {};
      const float* a_p = at + static_cast<size_t>(mt * 16 + gr) * k_ld + tq;
      const float* w_p = wt + static_cast<size_t>(nt * 8 + gr) * k_ld + tq;
      for (int c = split * chunks / splits; c < (split + 1) * chunks / splits; ++c) {
        const int k = c * kK;
        const float av[4] = {a_p[k], a_p[8 * k_ld + k], a_p[k + 4], a_p[8 * k_ld + k + 4]};
        const float bv[2] = {w_p[k], w_p[k + 4]};
        tf32_mma(acc, av, bv, passes);
      }
      float* out = prod + (static_cast<size_t>(split) * m_tile + mt * 16 + gr) * n_pad + nt * 8 + 2 * tq;
      out[0] = acc[0];
      out[1] = acc[1];
      out[8 * n_pad] = acc[2];
      out[8 * n_pad + 1] = acc[3];
    }
  }
  rf::sync_block();
}

// prod[m][n] of mma_recurrent_product (m within the batch tile): the sum of its K ranges' partial products.
__device__ __forceinline__ float mma_sum(const unsigned char* smem, size_t elem, int m_tile, int n_pad, int k_ld,
                                         int splits, int m, int n) {
  const float* prod = reinterpret_cast<const float*>(smem + mma_product_offset(elem, m_tile, n_pad, k_ld));
  float v = 0.f;
  for (int s = 0; s < splits; ++s) v += prod[(static_cast<size_t>(s) * m_tile + m) * n_pad + n];
  return v;
}

// The pointwise part of each cell, named and ordered as in rnnfast/reference.py, whose docstrings hold the
// equations (rnn_update, gru_update, lstm_update and their _backward). Gate values are prefixed g in LSTM (gi, gf,
// gg, go) only because g alone is the gate loop's index elsewhere.
template <typename T>
__device__ __forceinline__ T rnn_update(T pre, bool relu) {
  if (relu) return pre < T(0) ? T(0) : pre;  // NaN passes through, as torch.relu lets it
  return tanh_(pre);
}

template <typename T>
__device__ __forceinline__ T rnn_update_backward(T dh, T h_new, bool relu) {
  if (relu) return h_new > T(0) ? dh : T(0);
  return dh * (T(1) - h_new * h_new);
}

// Returns h'; r, z, n out.
template <typename T>
__device__ __forceinline__ T gru_update(T gx_r, T gx_z, T gx_n, T gh_r, T gh_z, T gh_n, T h, T& r, T& z, T& n) {
  r = sigmoid_(gx_r + gh_r);
  z = sigmoid_(gx_z + gh_z);
  n = tanh_(gx_n + r * gh_n);
  return (T(1) - z) * n + z * h;
}

// dr, dz, dn (d_hid's n plane is dn * r) out; returns dh_direct.
template <typename T>
__device__ __forceinline__ T gru_update_backward(T dh, T h, T r, T z, T n, T gh_n, T& dr, T& dz, T& dn) {
  dn = dh * (T(1) - z) * (T(1) - n * n);
  dr = dn * gh_n * r * (T(1) - r);
  dz = dh * (h - n) * z * (T(1) - z);
  return dh * z;
}

// Returns h'; c' and the gates out.
template <typename T>
__device__ __forceinline__ T lstm_update(T pre_i, T pre_f, T pre_g, T pre_o, T c, T& c_new, T& gi, T& gf, T& gg,
                                         T& go) {
  gi = sigmoid_(pre_i);
  gf = sigmoid_(pre_f);
  gg = tanh_(pre_g);
  go = sigmoid_(pre_o);
  c_new = gf * c + gi * gg;
  return go * tanh_(c_new);
}

// The four pre-activation gradients out (d[0..3]); returns dc_prev.
template <typename T>
__device__ __forceinline__ T lstm_update_backward(T dh, T dc, T c, T gi, T gf, T gg, T go, T (&d)[4]) {
  const T tc = tanh_(gf * c + gi * gg);  // c_t again, in acc_t (c_n went out rounded)
  const T dct = dc + dh * go * (T(1) - tc * tc);
  d[0] = dct * gg * gi * (T(1) - gi);
  d[1] = dct * c * gf * (T(1) - gf);
  d[2] = dct * gi * (T(1) - gg * gg);
  d[3] = dh * tc * go * (T(1) - go);
  return dct * gf;
}

// The end of one forward step for sequence b, unit j, given the hidden and input parts of its pre-activations:
// activations, the saved gates, the state update (a padded step keeps the state) and the outputs. own_h / own_c:
// where the unit's own state is kept on chip (else hc and cc, in global memory); cs is written either way, for the
// backward, in the layer dtype.
template <int CELL, typename scalar_t, typename acc_t>
__device__ __forceinline__ void forward_update(const ForwardArgs<scalar_t, acc_t>& p, int t, int t_next, bool last,
                                               int b, int j, const acc_t (&ah)[gates_of(CELL)],
                                               acc_t (&ax)[gates_of(CELL)], bool input_ready = false,
                                               acc_t* own_h = nullptr, acc_t* own_c = nullptr) {
  constexpr int G = gates_of(CELL);
  constexpr int GW = gate_planes_of(CELL);
  const int B = p.B, H = p.H, GH = G * H;
  const int64_t BH = static_cast<int64_t>(B) * H;
  const int64_t tb = static_cast<int64_t>(t) * B + b;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (input_ready) continue;  // ax holds the prefetched hoisted part already
    if (p.gx != nullptr) ax[g] = p.gx[tb * GH + g * H + j];
    else if (p.bias != nullptr) ax[g] += p.bias[g * H + j];
  }
  scalar_t* gt = p.gates + tb * GW * H;
  const int64_t bj = static_cast<int64_t>(b) * H + j;
  // This thread's own write of the step before (h0 at the first).
  const acc_t h_prev = own_h != nullptr ? *own_h : p.hc[bj];
  acc_t h_new, c_new = acc_t(0), c_prev = acc_t(0);
  if constexpr (CELL == kRnnTanh || CELL == kRnnRelu) {
    h_new = rnn_update(ax[0] + ah[0], CELL == kRnnRelu);
    gt[j] = static_cast<scalar_t>(h_new);
  } else if constexpr (CELL == kGru) {
    const acc_t gh_n = ah[2] + (p.b_hn != nullptr ? p.b_hn[j] : acc_t(0));
    acc_t r, z, n;
    h_new = gru_update(ax[0], ax[1], ax[2], ah[0], ah[1], gh_n, h_prev, r, z, n);
    gt[j] = static_cast<scalar_t>(r);
    gt[H + j] = static_cast<scalar_t>(z);
    gt[2 * H + j] = static_cast<scalar_t>(n);
    gt[3 * H + j] = static_cast<scalar_t>(gh_n);
  } else {  // LSTM, gates i, f, g, o
    c_prev = own_c != nullptr ? *own_c : p.cc[bj];
    acc_t gi, gf, gg, go;
    h_new = lstm_update(ax[0] + ah[0], ax[1] + ah[1], ax[2] + ah[2], ax[3] + ah[3], c_prev, c_new, gi, gf, gg, go);
    gt[j] = static_cast<scalar_t>(gi);
    gt[H + j] = static_cast<scalar_t>(gf);
    gt[2 * H + j] = static_cast<scalar_t>(gg);
    gt[3 * H + j] = static_cast<scalar_t>(go);
  }
  // A padded step outputs zero and keeps the state.
  const bool active = is_active(p.lengths, t, b);
  const acc_t h_out = active ? h_new : h_prev;
  p.y[tb * H + j] = static_cast<scalar_t>(active ? h_new : acc_t(0));
  if (own_h != nullptr) *own_h = h_out;
  else p.hc[bj] = h_out;
  if (!last) p.hs[t_next * BH + bj] = static_cast<scalar_t>(h_out);
  else p.h_n[bj] = static_cast<scalar_t>(h_out);
  if constexpr (CELL == kLstm) {
    const acc_t c_out = active ? c_new : c_prev;
    if (own_c != nullptr) *own_c = c_out;
    else p.cc[bj] = c_out;
    if (!last) p.cs[t_next * BH + bj] = static_cast<scalar_t>(c_out);
    else p.c_n[bj] = static_cast<scalar_t>(c_out);
  }
}

// Issue the copies of step t's hoisted input part for the block's units, [B][G][nj] at buf, to land while the step
// before ends and the grid barrier waits (cp.async: the issuing thread waits for them with cp_async_wait_all, the
// others see them after the next block barrier).
template <int CELL, typename acc_t>
__device__ __forceinline__ void prefetch_input(const acc_t* gx, float* buf, int t, int B, int H, int j0, int nj) {
  constexpr int G = gates_of(CELL);
  for (int idx = threadIdx.x; idx < B * G * nj; idx += blockDim.x) {
    const int b = idx / (G * nj), g = (idx / nj) % G, jl = idx % nj;
    rf::cp_async4(buf + idx, gx + (static_cast<int64_t>(t) * B + b) * G * H + g * H + j0 + jl);
  }
  rf::cp_async_commit();
}

// One block per multiprocessor is all the plan launches, so the compiler may use up to 255 registers a thread.
template <typename scalar_t, typename acc_t, int CELL>
__global__ void __launch_bounds__(kThreads, 1)
layer_forward_kernel(const Directions<ForwardArgs<scalar_t, acc_t>> launch) {
  const int blk = blockIdx.x % launch.blocks;  // within its direction
  const ForwardArgs<scalar_t, acc_t>& p = launch.dir[blockIdx.x / launch.blocks];
  const StepBarrier barrier{p.sync, p.sync_flags, blk, launch.blocks};
  constexpr int G = gates_of(CELL);
  // Units one warp computes together: kUnits * G sums (twice, fused) stay in registers.
  constexpr int kUnits = std::is_same_v<acc_t, double> ? 4 : 8;
  // W_hh slice, [G][HB][H]: row (g, jl) is W_hh row g*H + j0 + jl; rows past H are zero.
  // Tensor-core path: see mma_recurrent_product. ldmatrix and cp.async want 16-byte aligned rows: every region
  // offset is a multiple of 32 bytes.
  unsigned char* smem_raw = rf::dynamic_smem();
  scalar_t* w_s = reinterpret_cast<scalar_t*>(smem_raw);

  const int T = p.T, B = p.B, I = p.I, H = p.H, HB = p.HB;
  const int j0 = blk * HB;
  const int nj = rf::imax(0, rf::imin(HB, H - j0));  // 0 in the blocks that only round the grid up to clusters
  const int64_t BH = static_cast<int64_t>(B) * H;
  using st_t = typename Mma<scalar_t>::st_t;
  constexpr bool kHasMma = !std::is_void_v<st_t>;
  const bool tc = kHasMma && p.passes != 0;
  if (!tc) {
    for (int idx = threadIdx.x; idx < G * HB * H; idx += blockDim.x) {
      const int k = idx % H, row = idx / H, g = row / HB, jl = row % HB;
      w_s[idx] = jl < nj ? p.w_hh[static_cast<int64_t>(g * H + j0 + jl) * H + k] : scalar_t(0);
    }
  }
  if constexpr (kHasMma) {
    if (tc) {
      // The mma's operand B, column-major [n_pad][k_ld]: column n = g*HB + jl is W_hh row g*H + j0 + jl, zero-padded.
      st_t* wt = reinterpret_cast<st_t*>(smem_raw);
      for (int idx = threadIdx.x; idx < p.n_pad * p.k_pad; idx += blockDim.x) {
        const int n = idx / p.k_pad, k = idx % p.k_pad, g = n / HB, jl = n % HB;
        if (n < G * HB && jl < nj && k < H) wt[n * p.k_ld + k] = p.w_hh[static_cast<int64_t>(g * H + j0 + jl) * H + k];
        else from_float(0.f, &wt[n * p.k_ld + k]);
      }
    }
  }

  // Tensor-core path: the units' own state [planes][B][HB], from h0 (hc) and c0 (cc); the block
  // barrier below makes it, and the W_hh slice, every thread's.
  acc_t* own = tc ? reinterpret_cast<acc_t*>(smem_raw + own_state_offset(sizeof(scalar_t), G, B, H, HB, p.m_tile))
                  : nullptr;
  if (tc) {
    for (int item = threadIdx.x; item < B * nj; item += blockDim.x) {
      const int b = item / nj, jl = item % nj;
      const int64_t bj = static_cast<int64_t>(b) * H + j0 + jl;
      own[b * HB + jl] = p.hc[bj];
      if constexpr (CELL == kLstm) own[(B + b) * HB + jl] = p.cc[bj];
    }
  }
  rf::sync_block();
  // Where (b, jl)'s own h and c are kept on the tensor-core path (null: in global memory).
  auto own_h = [&](int b, int jl) { return own != nullptr ? own + b * HB + jl : nullptr; };
  auto own_c = [&](int b, int jl) { return own != nullptr && CELL == kLstm ? own + (B + b) * HB + jl : nullptr; };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Tensor-core path, hoisted mode only: the hoisted input part, [2][B][G][nj] fp32.
  float* prefetched = reinterpret_cast<float*>(smem_raw + prefetch_offset(sizeof(scalar_t), p.m_tile, G * HB, H));
  const bool hoisted = p.gx != nullptr;
  if constexpr (kHasMma) {
    if (tc && hoisted) prefetch_input<CELL>(p.gx, prefetched, p.reverse ? T - 1 : 0, B, H, j0, nj);
  }
  // Rows of the batch per pass: one m_tile-row batch tile at a time on tensor cores, the whole batch on FMA.
  const int rows = tc ? p.m_tile : B;
  for (int s = 0; s < T; ++s) {
    const int t = p.reverse ? T - 1 - s : s;
    const int t_next = p.reverse ? t - 1 : t + 1;  // slot of the state entering the next step
    const bool last = s == T - 1;
    // Every unit of h_{t-1} is written (the barrier's first half ended the step before).
    if (s > 0) barrier.wait(s);
    // The slot was written by other blocks before the barrier: read it through L2 (ld.cg), never a stale L1 line.
    const scalar_t* h_in = p.hs + t * BH;
    // This step's input part landed (this thread's copies; everyone's after the first product's block barriers).
    if (tc && hoisted) rf::cp_async_wait_all();
    for (int b0 = 0; b0 < B; b0 += rows) {
      const int b1 = rf::imin(B, b0 + rows);
      if constexpr (kHasMma) {
        if (tc) {
          mma_recurrent_product<scalar_t>(h_in, smem_raw, B, H, b0, p.m_tile, p.n_pad, p.k_pad, p.k_ld, p.splits,
                                          p.passes, p.cluster);
          if (hoisted) {
            // The next step's input part, into the other buffer (last read two steps ago), while this one ends;
            // after the last tile's staging, whose wait for its own copies would otherwise wait for these too.
            const float* gx_now = prefetched + (s % 2) * B * G * nj;
            if (b1 == B && !last)
              prefetch_input<CELL>(p.gx, prefetched + ((s + 1) % 2) * B * G * nj, t_next, B, H, j0, nj);
            // The pointwise part, one thread per (sequence, own unit): nothing is left to reduce.
            for (int item = threadIdx.x; item < (b1 - b0) * nj; item += blockDim.x) {
              const int b = b0 + item / nj, jl = item % nj;
              acc_t ah[G], ax[G];
#pragma unroll
              for (int g = 0; g < G; ++g) {
                ah[g] = static_cast<acc_t>(
                    mma_sum(smem_raw, sizeof(scalar_t), p.m_tile, p.n_pad, p.k_ld, p.splits, b - b0, g * HB + jl));
                ax[g] = static_cast<acc_t>(gx_now[(b * G + g) * nj + jl]);
              }
              forward_update<CELL>(p, t, t_next, last, b, j0 + jl, ah, ax, true, own_h(b, jl), own_c(b, jl));
            }
            continue;
          }
        }
      }
      // One warp per (sequence, chunk of kUnits own units): every h_{t-1} and x_t element is read once per chunk.
      const int chunks = (nj + kUnits - 1) / kUnits;
      for (int item = warp; item < (b1 - b0) * chunks; item += kWarps) {
        const int b = b0 + item / chunks, jc = (item % chunks) * kUnits;
        const scalar_t* h_row = h_in + static_cast<int64_t>(b) * H;
        acc_t ah[kUnits][G], ax[kUnits][G];  // hidden and input parts of the pre-activations
#pragma unroll
        for (int u = 0; u < kUnits; ++u) {
#pragma unroll
          for (int g = 0; g < G; ++g) ah[u][g] = ax[u][g] = acc_t(0);
        }
        if (!tc) {
          for (int k = lane; k < H; k += 32) {
            const acc_t hv = static_cast<acc_t>(rf::ldcg(h_row + k));
#pragma unroll
            for (int u = 0; u < kUnits; ++u) {
              if (jc + u < nj) {
#pragma unroll
                for (int g = 0; g < G; ++g) ah[u][g] += hv * static_cast<acc_t>(w_s[(g * HB + jc + u) * H + k]);
              }
            }
          }
        }
        if (p.gx == nullptr) {  // fused: x_t times these units' W_ih rows, here in the step
          const scalar_t* x_row = p.x + (static_cast<int64_t>(t) * B + b) * I;
          for (int k = lane; k < I; k += 32) {
            const acc_t xv = static_cast<acc_t>(x_row[k]);
#pragma unroll
            for (int u = 0; u < kUnits; ++u) {
              if (jc + u < nj) {
#pragma unroll
                for (int g = 0; g < G; ++g)
                  ax[u][g] += xv * static_cast<acc_t>(p.w_ih[static_cast<int64_t>(g * H + j0 + jc + u) * I + k]);
              }
            }
          }
        }
        // The guards are warp-uniform, so every lane takes part in each shuffle.
#pragma unroll
        for (int u = 0; u < kUnits; ++u) {
          if (jc + u < nj) {
#pragma unroll
            for (int g = 0; g < G; ++g) {
              if (!tc) ah[u][g] = warp_sum(ah[u][g]);
              if (p.gx == nullptr) ax[u][g] = warp_sum(ax[u][g]);
            }
          }
        }
        // Lane u finishes unit jc + u (every lane holds every sum; static indices keep the arrays in registers).
#pragma unroll
        for (int u = 0; u < kUnits; ++u) {
          if (lane == u && jc + u < nj) {
            if (tc) {
#pragma unroll
              for (int g = 0; g < G; ++g)
                ah[u][g] = static_cast<acc_t>(mma_sum(smem_raw, sizeof(scalar_t), p.m_tile, p.n_pad, p.k_ld,
                                                      p.splits, b - b0, g * HB + jc + u));
            }
            forward_update<CELL>(p, t, t_next, last, b, j0 + jc + u, ah[u], ax[u], false, own_h(b, jc + u),
                                 own_c(b, jc + u));
          }
        }
      }
    }
    // This block's units of h_t are written; the next step waits for every block's.
    if (!last) barrier.arrive(s + 1);
  }
}

// Reverse time. Per step, phase A (elementwise, the block's own units): gate gradients from dh, dc and the saved
// gates; phase B (after the grid barrier, since it needs every unit's gate gradients): dh_prev for the block's own
// units through the W_hh^T slice. Phase B's output feeds only the same block's next phase A, so a block barrier
// separates them.
template <typename scalar_t, typename acc_t, int CELL>
__global__ void __launch_bounds__(kThreads, 1)
layer_backward_recurrent_kernel(const Directions<BackwardArgs<scalar_t, acc_t>> launch) {
  const int blk = blockIdx.x % launch.blocks;  // within its direction
  const BackwardArgs<scalar_t, acc_t>& p = launch.dir[blockIdx.x / launch.blocks];
  const StepBarrier barrier{p.sync, p.sync_flags, blk, launch.blocks};
  constexpr int G = gates_of(CELL);
  constexpr int GW = gate_planes_of(CELL);
  constexpr int kUnits = 8;  // units one warp reduces together in phase B
  // W_hh^T slice, [HB][G*H]: row kl is column k0 + kl of W_hh; rows past H are zero. Tensor-core path: the same slice
  // as operand B of mma_recurrent_product, [n_pad][k_ld], zero-padded.
  unsigned char* smem_raw = rf::dynamic_smem();
  scalar_t* w_s = reinterpret_cast<scalar_t*>(smem_raw);

  const int T = p.T, B = p.B, H = p.H, HB = p.HB;
  const int k0 = blk * HB;
  const int nk = rf::imax(0, rf::imin(HB, H - k0));  // 0 in the blocks that only round the grid up to clusters
  const int GH = G * H;
  const int64_t BH = static_cast<int64_t>(B) * H;
  using st_t = typename Mma<scalar_t>::st_t;
  constexpr bool kHasMma = !std::is_void_v<st_t>;
  const bool tc = kHasMma && p.passes != 0;
  if (!tc) {
    for (int idx = threadIdx.x; idx < HB * GH; idx += blockDim.x) {
      const int r = idx % GH, kl = idx / GH;
      w_s[idx] = kl < nk ? p.w_hh[static_cast<int64_t>(r) * H + k0 + kl] : scalar_t(0);
    }
  }
  if constexpr (kHasMma) {
    if (tc) {
      st_t* wt = reinterpret_cast<st_t*>(smem_raw);
      for (int idx = threadIdx.x; idx < p.n_pad * p.k_pad; idx += blockDim.x) {
        const int n = idx / p.k_pad, r = idx % p.k_pad;
        if (n < nk && r < GH) wt[n * p.k_ld + r] = p.w_hh[static_cast<int64_t>(r) * H + k0 + n];
        else from_float(0.f, &wt[n * p.k_ld + r]);
      }
    }
  }
  rf::sync_block();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int s = 0; s < T; ++s) {
    const int t = p.reverse ? s : T - 1 - s;  // the forward's steps, last first

    // Phase A: one thread per (sequence, own unit).
    for (int item = threadIdx.x; item < B * nk; item += blockDim.x) {
      const int b = item / nk, j = k0 + item % nk;
      const int64_t tb = static_cast<int64_t>(t) * B + b;
      const int64_t bj = static_cast<int64_t>(b) * H + j;
      const bool active = is_active(p.lengths, t, b);
      const acc_t dh_cur = p.dh[bj];
      const acc_t dh_t = active ? dh_cur + static_cast<acc_t>(p.grad_y[tb * H + j]) : acc_t(0);
      const scalar_t* gt = p.gates + tb * GW * H;
      scalar_t* din = p.d_in + tb * GH;
      scalar_t* dhid = p.d_hid + tb * GH;
      auto g_ = [&](int i) { return static_cast<acc_t>(gt[i]); };
      auto put = [](scalar_t* q, int i, acc_t v) { q[i] = static_cast<scalar_t>(v); };
      acc_t direct = acc_t(0);  // the part of dh_prev that does not pass through W_hh
      if constexpr (CELL == kRnnTanh || CELL == kRnnRelu) {
        put(din, j, rnn_update_backward(dh_t, g_(j), CELL == kRnnRelu));
      } else if constexpr (CELL == kGru) {
        const acc_t r = g_(j), z = g_(H + j), n = g_(2 * H + j), gh_n = g_(3 * H + j);
        const acc_t h_prev = static_cast<acc_t>(p.hs[t * BH + bj]);
        acc_t dr, dz, dn;
        direct = gru_update_backward(dh_t, h_prev, r, z, n, gh_n, dr, dz, dn);
        put(din, j, dr);
        put(din, H + j, dz);
        put(din, 2 * H + j, dn);
        put(dhid, j, dr);
        put(dhid, H + j, dz);
        put(dhid, 2 * H + j, dn * r);
      } else {  // LSTM
        const acc_t gi = g_(j), gf = g_(H + j), gg = g_(2 * H + j), go = g_(3 * H + j);
        const acc_t c_prev = static_cast<acc_t>(p.cs[t * BH + bj]);
        const acc_t dc_cur = p.dc[bj];
        acc_t d[4];
        // dh_t is zero at a padded step, and dc is masked, so that step's gate gradients are zero.
        const acc_t dc_prev = lstm_update_backward(dh_t, active ? dc_cur : acc_t(0), c_prev, gi, gf, gg, go, d);
#pragma unroll
        for (int q = 0; q < 4; ++q) put(din, q * H + j, d[q]);
        // A padded step passes the state, and so its gradient, through unchanged.
        p.dc[bj] = active ? dc_prev : dc_cur;
      }
      p.direct[bj] = active ? direct : dh_cur;
    }
    // Phase B reads every unit's gate gradients of this step.
    barrier.arrive(s + 1);
    barrier.wait(s + 1);

    // Phase B: dh_prev[b, k] = direct + sum_r d_hid[t, b, r] W_hh[r, k].
    if constexpr (kHasMma) {
      if (tc) {
        // On tensor cores, one m_tile-row batch tile at a time, then one thread per (sequence, own unit).
        for (int b0 = 0; b0 < B; b0 += p.m_tile) {
          mma_recurrent_product<scalar_t>(p.d_hid + static_cast<int64_t>(t) * B * GH, smem_raw, B, GH, b0, p.m_tile,
                                          p.n_pad, p.k_pad, p.k_ld, p.splits, p.passes, p.cluster);
          for (int item = threadIdx.x; item < (rf::imin(B, b0 + p.m_tile) - b0) * nk; item += blockDim.x) {
            const int b = b0 + item / nk, kl = item % nk;
            const int64_t bk = static_cast<int64_t>(b) * H + k0 + kl;
            const acc_t sum = static_cast<acc_t>(
                mma_sum(smem_raw, sizeof(scalar_t), p.m_tile, p.n_pad, p.k_ld, p.splits, b - b0, kl));
            p.dh[bk] = is_active(p.lengths, t, b) ? p.direct[bk] + sum : p.direct[bk];
          }
        }
        rf::sync_block();
        continue;
      }
    }
    // One warp per (sequence, chunk of kUnits own units), each d_hid element read once per chunk.
    const int chunks = (nk + kUnits - 1) / kUnits;
    for (int item = warp; item < B * chunks; item += kWarps) {
      const int b = item / chunks, kc = (item % chunks) * kUnits;
      const int64_t tb = static_cast<int64_t>(t) * B + b;
      const scalar_t* dr = p.d_hid + tb * GH;
      acc_t acc[kUnits];
#pragma unroll
      for (int u = 0; u < kUnits; ++u) acc[u] = acc_t(0);
      for (int r = lane; r < GH; r += 32) {
        const acc_t dv = static_cast<acc_t>(rf::ldcg(dr + r));
#pragma unroll
        for (int u = 0; u < kUnits; ++u)
          if (kc + u < nk) acc[u] += dv * static_cast<acc_t>(w_s[(kc + u) * GH + r]);
      }
      const bool active = is_active(p.lengths, t, b);
#pragma unroll
      for (int u = 0; u < kUnits; ++u) {
        if (kc + u < nk) {  // warp-uniform: every lane takes part in the shuffles
          acc[u] = warp_sum(acc[u]);
          if (lane == u) {
            const int64_t bk = static_cast<int64_t>(b) * H + k0 + kc + u;
            p.dh[bk] = active ? p.direct[bk] + acc[u] : p.direct[bk];
          }
        }
      }
    }
    // dh and direct of the own units are rewritten by other threads of this block in the next phase A.
    rf::sync_block();
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The calling thread's last error message (capi.cpp).
std::string& last_error();

inline int invalid(const char* what, const std::string& why) {
  last_error() = std::string(what) + ": " + why;
  return RNNFAST_INVALID;
}
inline bool refuse(const char* what, const std::string& why) {
  invalid(what, why);
  return false;
}

// The tensor-core fields of both kernels' arguments from the C parameters: passes (0 FMA, 1, or 3 for 3xTF32) and
// the batch tile (m_tile 0: the whole batch, padded to 16). False, with the reason set, for a mode the dtype has not.
template <typename scalar_t>
bool set_tensor_cores(int32_t mode, int64_t m_tile, int B, const char* what, int* passes, int* tile) {
  constexpr bool kHasMma = !std::is_void_v<typename Mma<scalar_t>::st_t>;
  constexpr bool kTf32 = std::is_same_v<scalar_t, float>;
  if (mode != 0 && mode != 1 && mode != 3) {
    invalid(what, "tensor_cores must be 0 (FMA), 1 or 3 (3xTF32), got " + std::to_string(mode));
    return false;
  }
  if ((mode != 0 && !kHasMma) || (mode == 3 && !kTf32)) {
    invalid(what, std::string("tensor_cores ") + std::to_string(mode) + " is not a mode of this dtype (" +
                      (kTf32 ? "float32 has 1 (TF32) and 3 (3xTF32)" : kHasMma ? "16-bit types have 1" : "none") +
                      ")");
    return false;
  }
  if (m_tile < 0 || m_tile % 16 != 0) {
    invalid(what, "m_tile must be a non-negative multiple of 16, got " + std::to_string(m_tile));
    return false;
  }
  *passes = mode;
  *tile = m_tile == 0 ? pad16(B) : static_cast<int>(m_tile < pad16(B) ? m_tile : pad16(B));
  return true;
}

// ForwardArgs from one direction's C parameters, filled here, in one place; false (the reason set) for bad ones.
template <typename scalar_t, int CELL>
bool fill_forward(const rnnfast_forward_params* a, const char* what, ForwardArgs<scalar_t, rf::acc_t<scalar_t>>* out) {
  using acc_t = rf::acc_t<scalar_t>;
  if (a->w_hh == nullptr || a->y == nullptr || a->h_n == nullptr || a->gates == nullptr || a->hs == nullptr ||
      a->hc == nullptr ||
      (a->gx == nullptr && (a->x == nullptr || a->w_ih == nullptr)) ||
      (CELL == kLstm && (a->cs == nullptr || a->c_n == nullptr || a->cc == nullptr)))
    return refuse(what, "a required buffer is null");
  if (a->gx != nullptr && a->bias != nullptr) return refuse(what, "the bias goes into gx in hoisted mode");
  ForwardArgs<scalar_t, acc_t>& p = *out;
  p.x = static_cast<const scalar_t*>(a->x);
  p.gx = static_cast<const acc_t*>(a->gx);
  p.w_ih = static_cast<const scalar_t*>(a->w_ih);
  p.w_hh = static_cast<const scalar_t*>(a->w_hh);
  p.bias = static_cast<const acc_t*>(a->bias);
  p.b_hn = CELL == kGru ? static_cast<const acc_t*>(a->b_hn) : nullptr;
  p.lengths = a->lengths;
  p.y = static_cast<scalar_t*>(a->y);
  p.h_n = static_cast<scalar_t*>(a->h_n);
  p.c_n = static_cast<scalar_t*>(a->c_n);
  p.gates = static_cast<scalar_t*>(a->gates);
  p.hs = static_cast<scalar_t*>(a->hs);
  p.cs = static_cast<scalar_t*>(a->cs);
  p.hc = static_cast<acc_t*>(a->hc);
  p.cc = static_cast<acc_t*>(a->cc);
  p.sync = static_cast<unsigned*>(a->sync);
  p.sync_flags = a->sync_flags != 0;
  p.cluster = a->cluster;
  p.T = static_cast<int>(a->T);
  p.B = static_cast<int>(a->B);
  p.I = static_cast<int>(a->I);
  p.H = static_cast<int>(a->H);
  p.HB = static_cast<int>(a->block_h);
  p.reverse = a->reverse != 0;
  if (!set_tensor_cores<scalar_t>(a->tensor_cores, a->m_tile, p.B, what, &p.passes, &p.m_tile)) return false;
  p.n_pad = mma_n_pad(sizeof(scalar_t), static_cast<int64_t>(gates_of(CELL)) * p.HB);
  p.k_pad = pad16(p.H);
  p.k_ld = mma_k_ld(sizeof(scalar_t), p.k_pad);
  p.splits = mma_splits(p.m_tile, p.n_pad, p.k_pad, sizeof(scalar_t));
  return true;
}

// BackwardArgs from one direction's C parameters.
template <typename scalar_t, int CELL>
bool fill_backward(const rnnfast_backward_params* a, const char* what,
                   BackwardArgs<scalar_t, rf::acc_t<scalar_t>>* out) {
  using acc_t = rf::acc_t<scalar_t>;
  if (a->grad_y == nullptr || a->w_hh == nullptr || a->gates == nullptr || a->hs == nullptr ||
      a->d_in == nullptr || a->d_hid == nullptr || a->dh == nullptr || a->direct == nullptr ||
      (CELL == kLstm && (a->cs == nullptr || a->dc == nullptr)))
    return refuse(what, "a required buffer is null");
  BackwardArgs<scalar_t, acc_t>& p = *out;
  p.grad_y = static_cast<const scalar_t*>(a->grad_y);
  p.w_hh = static_cast<const scalar_t*>(a->w_hh);
  p.lengths = a->lengths;
  p.gates = static_cast<const scalar_t*>(a->gates);
  p.hs = static_cast<const scalar_t*>(a->hs);
  p.cs = static_cast<const scalar_t*>(a->cs);
  p.d_in = static_cast<scalar_t*>(a->d_in);
  p.d_hid = static_cast<scalar_t*>(a->d_hid);
  p.dh = static_cast<acc_t*>(a->dh);
  p.dc = static_cast<acc_t*>(a->dc);
  p.direct = static_cast<acc_t*>(a->direct);
  p.sync = static_cast<unsigned*>(a->sync);
  p.sync_flags = a->sync_flags != 0;
  p.cluster = a->cluster;
  p.T = static_cast<int>(a->T);
  p.B = static_cast<int>(a->B);
  p.H = static_cast<int>(a->H);
  p.HB = static_cast<int>(a->block_h);
  p.reverse = a->reverse != 0;
  if (!set_tensor_cores<scalar_t>(a->tensor_cores, a->m_tile, p.B, what, &p.passes, &p.m_tile)) return false;
  p.n_pad = mma_n_pad(sizeof(scalar_t), p.HB);
  p.k_pad = pad16(static_cast<int64_t>(gates_of(CELL)) * p.H);
  p.k_ld = mma_k_ld(sizeof(scalar_t), p.k_pad);
  p.splits = mma_splits(p.m_tile, p.n_pad, p.k_pad, sizeof(scalar_t));
  return true;
}

// The checks common to both kernels' C parameters: a[0]'s directions (1, or 2: a[0] and a[1] in one launch) and
// sizes, the same in every direction. Sets *empty for a launch with nothing to do. False, the reason set, when bad.
template <typename Params>
bool check_directions(const Params* a, const char* what, bool* empty) {
  if (a == nullptr) return refuse(what, "null parameters");
  if (a->directions != 1 && a->directions != 2)
    return refuse(what, "directions must be 1 or 2, got " + std::to_string(a->directions));
  for (int d = 0; d < a->directions; ++d) {
    const Params& q = a[d];
    if (q.T < 0 || q.B < 0 || q.H < 0 || q.block_h < 1)
      return refuse(what, "sizes must be non-negative and block_h at least 1");
    if (q.T != a->T || q.B != a->B || q.H != a->H || q.block_h != a->block_h || q.m_tile != a->m_tile ||
        q.tensor_cores != a->tensor_cores || q.cluster != a->cluster)
      return refuse(what, "both directions of one launch need the same sizes, block_h, m_tile, tensor_cores and "
                          "cluster");
    if (q.cluster < 1 || q.cluster > 16) return refuse(what, "cluster must be 1 to 16 blocks");
    if (q.cluster > 1 && q.sync == nullptr)
      return refuse(what, "clusters need the split-phase step barrier (sync): a cluster launch is not cooperative");
  }
  *empty = a->B == 0 || a->H == 0 || a->T == 0;
  return true;
}

// One forward launch from the C parameters: one block per block_h units of each direction.
template <typename scalar_t, int CELL>
int launch_forward(const rnnfast_forward_params* a, void* stream, const char* what) {
  using acc_t = rf::acc_t<scalar_t>;
  bool empty = false;
  if (!check_directions(a, what, &empty)) return RNNFAST_INVALID;
  if (a->I < 0 || (a->directions == 2 && a[1].I != a->I)) return invalid(what, "bad input size");
  if (empty) return RNNFAST_OK;
  Directions<ForwardArgs<scalar_t, acc_t>> launch{};
  for (int d = 0; d < a->directions; ++d)
    if (!fill_forward<scalar_t, CELL>(a + d, what, &launch.dir[d])) return RNNFAST_INVALID;
  const ForwardArgs<scalar_t, acc_t>& p = launch.dir[0];
  launch.blocks = static_cast<int>(ceil_div(ceil_div(p.H, p.HB), p.cluster) * p.cluster);
  const size_t smem = forward_smem_bytes(sizeof(scalar_t), gates_of(CELL), p.B, p.H, p.HB, p.passes ? p.m_tile : 0);
  return rf::launch_cooperative(&layer_forward_kernel<scalar_t, acc_t, CELL>, launch,
                                static_cast<int64_t>(launch.blocks) * a->directions, kThreads, smem, stream, what,
                                &last_error(), p.cluster);
}

// One backward-recurrence launch from the C parameters.
template <typename scalar_t, int CELL>
int launch_backward(const rnnfast_backward_params* a, void* stream, const char* what) {
  using acc_t = rf::acc_t<scalar_t>;
  bool empty = false;
  if (!check_directions(a, what, &empty)) return RNNFAST_INVALID;
  if (empty) return RNNFAST_OK;
  Directions<BackwardArgs<scalar_t, acc_t>> launch{};
  for (int d = 0; d < a->directions; ++d)
    if (!fill_backward<scalar_t, CELL>(a + d, what, &launch.dir[d])) return RNNFAST_INVALID;
  const BackwardArgs<scalar_t, acc_t>& p = launch.dir[0];
  launch.blocks = static_cast<int>(ceil_div(ceil_div(p.H, p.HB), p.cluster) * p.cluster);
  const size_t smem = backward_smem_bytes(sizeof(scalar_t), gates_of(CELL), p.H, p.HB, p.passes ? p.m_tile : 0);
  return rf::launch_cooperative(&layer_backward_recurrent_kernel<scalar_t, acc_t, CELL>, launch,
                                static_cast<int64_t>(launch.blocks) * a->directions, kThreads, smem, stream, what,
                                &last_error(), p.cluster);
}

}  // namespace rnnfast_cuda

// One cell's eight C entry points: forward and backward for the four dtypes.
#define RNNFAST_DEFINE_DTYPE(name, CELL, suffix, scalar)                                                   \
  extern "C" int rnnfast_##name##_forward_##suffix(const rnnfast_forward_params* a, void* stream) {      \
    return rnnfast_cuda::launch_forward<scalar, CELL>(a, stream, #name "_forward_" #suffix);             \
  }                                                                                                      \
  extern "C" int rnnfast_##name##_backward_##suffix(const rnnfast_backward_params* a, void* stream) {    \
    return rnnfast_cuda::launch_backward<scalar, CELL>(a, stream, #name "_backward_" #suffix);           \
  }
#define RNNFAST_DEFINE_CELL(name, CELL)                              \
  RNNFAST_DEFINE_DTYPE(name, CELL, f32, float)                       \
  RNNFAST_DEFINE_DTYPE(name, CELL, f64, double)                      \
  RNNFAST_DEFINE_DTYPE(name, CELL, f16, rf::half_t)                  \
  RNNFAST_DEFINE_DTYPE(name, CELL, bf16, rf::bf16_t)
