/* The C ABI of the rnnfast CUDA library: plain C, no torch, no CUDA types, so that one build loads under any torch
 * (rnnfast/backends/cuda.py calls it with ctypes) and the same entry points exist in the CPU emulation library.
 *
 * One entry point per cell, direction (forward, backward recurrence) and dtype:
 *
 *   int rnnfast_<cell>_forward_<dtype>(const rnnfast_forward_params*, void* stream)
 *   int rnnfast_<cell>_backward_<dtype>(const rnnfast_backward_params*, void* stream)
 *
 * cell: rnn_tanh, rnn_relu, gru, lstm; dtype: f32, f64, f16, bf16. The caller allocates every buffer (the Python
 * side, with torch, on torch's current stream, passed as a cudaStream_t; ignored by the emulation, which runs
 * synchronously on host memory). A non-zero return is one of the codes below; rnnfast_last_error() then says why
 * (per calling thread). Layouts: row-major, contiguous; "acc" buffers are float (double for f64).
 */
#ifndef RNNFAST_CAPI_H_
#define RNNFAST_CAPI_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RNNFAST_ABI_VERSION 4

/* The library is built with hidden visibility: only these entry points are exported. */
#if defined(__GNUC__)
#define RNNFAST_API __attribute__((visibility("default")))
#else
#define RNNFAST_API
#endif

enum rnnfast_status {
  RNNFAST_OK = 0,
  RNNFAST_INVALID = 1,  /* a bad argument (shape, pointer, flag) */
  RNNFAST_REFUSED = 2,  /* the launch cannot be co-resident: too much shared memory or too many blocks */
  RNNFAST_CUDA_ERROR = 3,  /* a CUDA runtime call failed */
  RNNFAST_EMULATION_ERROR = 4  /* the CPU emulation found a deadlock, a misaligned tile or a shared-memory overrun */
};

typedef struct {
  const void* x;        /* (T, B, I) dtype; read only in fused mode (gx null) */
  const void* gx;       /* (T, B, G*H) acc: x W_ih^T + biases (hoisted mode), or null */
  const void* w_ih;     /* (G*H, I) dtype */
  const void* w_hh;     /* (G*H, H) dtype */
  const void* bias;     /* (G*H) acc: b_ih + b_hh (GRU n: b_in only), fused mode only; or null */
  const void* b_hn;     /* (H) acc, GRU only; or null */
  const int64_t* lengths; /* (B) valid steps per sequence, or null for T */
  void* y;              /* (T, B, H) dtype, out */
  void* h_n;            /* (B, H) dtype, out */
  void* c_n;            /* (B, H) dtype, out, LSTM only */
  void* gates;          /* (T, B, GW*H) dtype, out: the workspace's gate planes */
  void* hs;             /* (T, B, H) dtype: state entering each step; the first step's slot holds h0 on entry */
  void* cs;             /* (T, B, H) dtype, LSTM only; likewise c0 */
  void* hc;             /* (B, H) acc: h0 on entry (each unit's own state, unrounded; scratch) */
  void* cc;             /* (B, H) acc, LSTM only: c0 on entry, likewise */
  void* sync;           /* uint32, zero on entry: the split-phase step barrier's counter, or with sync_flags its
                           ceil(H / block_h) flags, one a block; null: the cooperative grid.sync */
  int64_t T, B, I, H;
  int64_t block_h;      /* hidden units per block: the grid is ceil(H / block_h) blocks */
  int64_t m_tile;       /* batch rows per tensor-core product, a multiple of 16; 0: the whole batch */
  int32_t reverse;
  int32_t tensor_cores; /* the recurrent product: 0 FMA; 1 tensor cores (mma.sync in the dtype for f16/bf16, TF32
                           for f32); 3 3xTF32 (f32 only: about fp32's accuracy on tensor cores) */
  int32_t directions;   /* read from the first struct: 1, or 2 when the pointer is to an array of two, the two
                           directions of a bidirectional layer (same sizes), run in one launch on twice the blocks */
  int32_t sync_flags;   /* 1: sync holds one flag a block (see sync) */
  int32_t cluster;      /* 1, or thread-block clusters of that many blocks (2 to 16, sm_90, sync needed) sharing
                           the tensor-core A operand's reads from L2; the blocks of a direction are rounded up to a
                           multiple of it (the extra ones own no units), and so are sync's flags */
} rnnfast_forward_params;

typedef struct {
  const void* grad_y;   /* (T, B, H) dtype */
  const void* w_hh;     /* (G*H, H) dtype */
  const int64_t* lengths;
  const void* gates;    /* the forward's workspace planes: gates, hs and cs in dtype */
  const void* hs;
  const void* cs;       /* LSTM only */
  void* d_in;           /* (T, B, G*H) dtype, out: gradient of the input-part pre-activations */
  void* d_hid;          /* (T, B, G*H) dtype, out: of the hidden-part ones; the same buffer as d_in except for GRU */
  void* dh;             /* (B, H) acc, in: grad_h_n, out: dh0 */
  void* dc;             /* (B, H) acc, LSTM only, in: grad_c_n, out: dc0 */
  void* direct;         /* (B, H) acc scratch */
  void* sync;           /* as the forward's */
  int64_t T, B, H;
  int64_t block_h;
  int64_t m_tile;       /* as the forward's */
  int32_t reverse;
  int32_t tensor_cores; /* as the forward's, for the recurrent product d_hid W_hh */
  int32_t directions;   /* as the forward's */
  int32_t sync_flags;   /* as the forward's */
  int32_t cluster;      /* as the forward's */
} rnnfast_backward_params;

RNNFAST_API int rnnfast_abi_version(void);
/* 1 for the CPU emulation library, 0 for the GPU one. */
RNNFAST_API int rnnfast_emulated(void);
RNNFAST_API const char* rnnfast_last_error(void);
/* Dynamic shared memory of one block: the W_hh slice; with tensor cores (m_tile > 0, a multiple of 16) the slice
 * padded, one m_tile-row batch tile of the other operand and the partial products (forward: and the prefetched input
 * part of the whole batch). */
RNNFAST_API size_t rnnfast_forward_smem_bytes(int cell, int dtype, int64_t B, int64_t H, int64_t block_h,
                                              int64_t m_tile);
RNNFAST_API size_t rnnfast_backward_smem_bytes(int cell, int dtype, int64_t B, int64_t H, int64_t block_h,
                                               int64_t m_tile);
/* Waits on the step barrier `iters` times with `blocks` blocks: the split-phase one on *counter (uint32, zero on
 * entry; with flags, `blocks` flags), or the cooperative grid barrier when counter is null; writes iters to *passed
 * (device memory). */
RNNFAST_API int rnnfast_grid_barrier(int64_t blocks, int64_t iters, int32_t* passed, uint32_t* counter, int32_t flags,
                                     void* stream);

/* cell ids and dtype ids of the two size queries */
#define RNNFAST_CELL_RNN_TANH 0
#define RNNFAST_CELL_RNN_RELU 1
#define RNNFAST_CELL_GRU 2
#define RNNFAST_CELL_LSTM 3
#define RNNFAST_DTYPE_F32 0
#define RNNFAST_DTYPE_F64 1
#define RNNFAST_DTYPE_F16 2
#define RNNFAST_DTYPE_BF16 3

#define RNNFAST_DECLARE_CELL(cell)                                                                           \
  RNNFAST_API int rnnfast_##cell##_forward_f32(const rnnfast_forward_params*, void*);                                    \
  RNNFAST_API int rnnfast_##cell##_forward_f64(const rnnfast_forward_params*, void*);                                    \
  RNNFAST_API int rnnfast_##cell##_forward_f16(const rnnfast_forward_params*, void*);                                    \
  RNNFAST_API int rnnfast_##cell##_forward_bf16(const rnnfast_forward_params*, void*);                                   \
  RNNFAST_API int rnnfast_##cell##_backward_f32(const rnnfast_backward_params*, void*);                                  \
  RNNFAST_API int rnnfast_##cell##_backward_f64(const rnnfast_backward_params*, void*);                                  \
  RNNFAST_API int rnnfast_##cell##_backward_f16(const rnnfast_backward_params*, void*);                                  \
  RNNFAST_API int rnnfast_##cell##_backward_bf16(const rnnfast_backward_params*, void*);

RNNFAST_DECLARE_CELL(rnn_tanh)
RNNFAST_DECLARE_CELL(rnn_relu)
RNNFAST_DECLARE_CELL(gru)
RNNFAST_DECLARE_CELL(lstm)

#ifdef __cplusplus
}
#endif

#endif /* RNNFAST_CAPI_H_ */
