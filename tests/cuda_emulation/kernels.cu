// Test kernels for the CPU emulation of csrc/primitives.cuh (tests/test_cuda_emulation.py). Built with the host
// compiler and -DRNNFAST_EMULATE into a shared library with csrc/emulate.cpp; each entry point has the one shape
//
//   int emu_<name>(void* const* bufs, const long long* ints, char* err, int err_len)
//
// (buffers and integer arguments in the order the test passes them) and returns 0 when its launches succeeded,
// 1 when a launch failed (the reason in err), 2 on a bad argument, 3 when a launch after a failed one went wrong.
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "primitives.cuh"

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

int report(bool ok, const std::string& error, char* err, int err_len) {
  if (!ok && err != nullptr && err_len > 0) {
    std::strncpy(err, error.c_str(), static_cast<size_t>(err_len) - 1);
    err[err_len - 1] = '\0';
  }
  return ok ? 0 : 1;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---------------------------------------------------------------------------------------- sync_block ---
// Thread t writes s[t], then reads its neighbour's s[(t+1) % n]: only a barrier in between makes every read see
// the neighbour's write (without one, a thread reads the 0xFF poison of a neighbour that has not run yet).
struct RotateArgs {
  int* out;
  bool skip_sync;
};

__global__ void rotate_kernel(RotateArgs a) {
  int* s = reinterpret_cast<int*>(rf::dynamic_smem());
  const unsigned n = blockDim.x, t = threadIdx.x;
  s[t] = static_cast<int>(blockIdx.x * 1000 + t);
  if (!a.skip_sync) rf::sync_block();
  a.out[blockIdx.x * n + t] = s[(t + 1) % n];
}

// A tree sum over the block, a barrier between levels: out[block] = sum of in over the block's threads.
struct TreeArgs {
  const int* in;
  int* out;
  bool skip_sync;
};

__global__ void tree_sum_kernel(TreeArgs a) {
  int* s = reinterpret_cast<int*>(rf::dynamic_smem());
  const unsigned t = threadIdx.x;
  s[t] = a.in[blockIdx.x * blockDim.x + t];
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (!a.skip_sync) rf::sync_block();
    if (t < stride) s[t] += s[t + stride];
  }
  if (t == 0) a.out[blockIdx.x] = s[0];
}

bool rotate(unsigned blocks, unsigned threads, int* out, bool skip, std::string* error) {
  const RotateArgs a{out, skip};
  return rf::launch(blocks, threads, threads * sizeof(int), [&] { rotate_kernel(a); }, error);
}

// ------------------------------------------------------------------------------------------ sync_grid ---
// Rounds of: write my value, grid barrier, read the value of a thread in another block. buf holds 2 x N.
struct GridArgs {
  uint32_t* buf;
  uint32_t* out;
  int rounds;
  unsigned* counter;  // non-null: the split-phase barrier on it (grid_arrive, grid_wait) instead of sync_grid
  bool flags;         // with counter: one flag a block there (flag_arrive, flag_wait)
};

__global__ void grid_exchange_kernel(GridArgs a) {
  const uint32_t n = gridDim.x * blockDim.x, gid = blockIdx.x * blockDim.x + threadIdx.x;
  uint32_t v = gid;
  for (int r = 0; r < a.rounds; ++r) {
    uint32_t* slot = a.buf + static_cast<size_t>(r & 1) * n;
    slot[gid] = v;
    // Every write of this round before any read; the other slot's readers are done too.
    if (a.counter != nullptr && a.flags) {
      rf::flag_arrive(a.counter, static_cast<int>(blockIdx.x), static_cast<unsigned>(r + 1));
      rf::flag_wait(a.counter, static_cast<int>(gridDim.x), static_cast<unsigned>(r + 1));
    } else if (a.counter != nullptr) {
      rf::grid_arrive(a.counter);
      rf::grid_wait(a.counter, static_cast<unsigned>(r + 1) * gridDim.x);
    } else {
      rf::sync_grid();
    }
    v = v * 3u + slot[(gid + 257u * static_cast<uint32_t>(r + 1)) % n];
  }
  a.out[gid] = v;
}

// ------------------------------------------------------------------------------------------- clusters ---
// Every block writes its index into slot [its rank] of every block of its cluster (map_shared), then, after the
// cluster barrier, thread t < cluster reads slot t: out[block * cluster + t]. mode 1: block 1's threads skip the
// barrier; mode 2: a rank past the cluster.
struct ClusterArgs {
  int* out;
  int cluster, mode;
};

__global__ void cluster_kernel(ClusterArgs a) {
  int* slots = reinterpret_cast<int*>(rf::dynamic_smem());
  const unsigned c = static_cast<unsigned>(a.cluster), rank = rf::cluster_rank();
  if (threadIdx.x == 0) {
    for (unsigned r = 0; r < c + (a.mode == 2 ? 1 : 0); ++r)
      *rf::map_shared(slots + rank, r) = static_cast<int>(blockIdx.x);
  }
  if (a.mode == 1 && blockIdx.x == 1) return;
  rf::cluster_sync();
  if (threadIdx.x < c) a.out[blockIdx.x * c + threadIdx.x] = slots[threadIdx.x];
}

// bufs: out (int32, blocks * cluster); ints: blocks, threads, cluster, mode.
EMU_EXPORT int emu_cluster(void* const* bufs, const long long* ints, char* err, int err_len) {
  const ClusterArgs a{static_cast<int*>(bufs[0]), static_cast<int>(ints[2]), static_cast<int>(ints[3])};
  std::string e;
  const bool ok = rf::launch(static_cast<unsigned>(ints[0]), static_cast<unsigned>(ints[1]), 64,
                             static_cast<unsigned>(ints[2]), [&] { cluster_kernel(a); }, &e);
  return report(ok, e, err, err_len);
}

// ------------------------------------------------------------------------------------------- shfl_xor ---
struct ShflArgs {
  const float* in_f;
  float* out_f;
  const double* in_d;
  double* out_d;
  int* perm_i;          // [thread][mask]: shfl_xor(gid, mask)
  uint32_t* perm_u;     // [thread][mask]: shfl_xor(~gid, mask)
  int64_t* perm_ll;     // [thread][mask]: shfl_xor(gid * 2^33 + 7, mask)
  uint16_t* perm_h;     // [thread][mask]: shfl_xor(half_t(gid % 2048), mask).bits
};

template <typename T>
RF_DEVICE T butterfly_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += rf::shfl_xor(v, o);
  return v;
}

__global__ void shfl_kernel(ShflArgs a) {
  const unsigned gid = blockIdx.x * blockDim.x + threadIdx.x;
  a.out_f[gid] = butterfly_sum(a.in_f[gid]);
  a.out_d[gid] = butterfly_sum(a.in_d[gid]);
  for (int mask = 0; mask < 32; ++mask) {
    a.perm_i[gid * 32 + mask] = rf::shfl_xor(static_cast<int>(gid), mask);
    a.perm_u[gid * 32 + mask] = rf::shfl_xor(~gid, mask);
    a.perm_ll[gid * 32 + mask] = rf::shfl_xor(static_cast<int64_t>(gid) * (int64_t{1} << 33) + 7, mask);
    a.perm_h[gid * 32 + mask] = rf::shfl_xor(rf::half_t(static_cast<int>(gid % 2048)), mask).bits;
  }
}

// ------------------------------------------------------------------------------- ldmatrix + mma.sync ---
// D = A B + C for A 16 x K (row-major, lda), B K x 8 given as B^T [8][ldb] (the layer kernels' W[n][k]), C/D 16 x 8
// row-major float: A and B^T staged in shared memory, ldmatrix x4 for A, x2 of the x4 for B (both k halves),
// mma_m16n8k16 per 16-deep chunk. offset (elements) shifts the staged A, misaligning its rows when not 8.
struct MmaArgs {
  const void* a;
  const void* bt;
  const float* c;
  float* d;
  int k, lda, ldb, offset;
};

template <typename T>
__global__ void mma_kernel(MmaArgs p) {
  T* sa = reinterpret_cast<T*>(rf::dynamic_smem()) + p.offset;
  T* sb = reinterpret_cast<T*>(rf::dynamic_smem()) + 16 * p.lda + 16;
  const T* A = static_cast<const T*>(p.a);
  const T* Bt = static_cast<const T*>(p.bt);
  for (int i = threadIdx.x; i < 16 * p.lda; i += blockDim.x) sa[i] = A[i];
  for (int i = threadIdx.x; i < 8 * p.ldb; i += blockDim.x) sb[i] = Bt[i];
  rf::sync_block();
  const int lane = threadIdx.x % 32, gr = lane / 4, c2 = 2 * (lane % 4);
  float acc[4] = {p.c[gr * 8 + c2], p.c[gr * 8 + c2 + 1], p.c[(gr + 8) * 8 + c2], p.c[(gr + 8) * 8 + c2 + 1]};
  for (int kc = 0; kc < p.k; kc += 16) {
    uint32_t fa[4], fb[4];
    rf::ldmatrix_x4(fa, sa + (lane % 8 + ((lane / 8) % 2) * 8) * p.lda + kc + (lane / 16) * 8);
    // B^T rows n = lane % 8 (both pairs of matrices alike), k halves by odd matrix.
    rf::ldmatrix_x4(fb, sb + (lane % 8) * p.ldb + kc + ((lane / 8) % 2) * 8);
    const uint32_t b[2] = {fb[0], fb[1]};
    rf::mma_m16n8k16<T>(acc, fa, b);
  }
  p.d[gr * 8 + c2] = acc[0];
  p.d[gr * 8 + c2 + 1] = acc[1];
  p.d[(gr + 8) * 8 + c2] = acc[2];
  p.d[(gr + 8) * 8 + c2 + 1] = acc[3];
}

// The same product in TF32 from float32 operands, as the layer kernels do it: fragments read a word at a time
// (A(g, t), A(g+8, t), A(g, t+4), A(g+8, t+4); B(t, g), B(t+4, g)), rounded with to_tf32 (convert 0: not),
// mma_m16n8k8_tf32 per 8-deep chunk.
__global__ void mma_tf32_kernel(MmaArgs p, bool convert) {
  const float* A = static_cast<const float*>(p.a);
  const float* Bt = static_cast<const float*>(p.bt);
  const int lane = threadIdx.x % 32, gr = lane / 4, t = lane % 4, c2 = 2 * t;
  float acc[4] = {p.c[gr * 8 + c2], p.c[gr * 8 + c2 + 1], p.c[(gr + 8) * 8 + c2], p.c[(gr + 8) * 8 + c2 + 1]};
  auto op = [&](float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return convert ? rf::to_tf32(v) : u;
  };
  for (int k = 0; k < p.k; k += 8) {
    const uint32_t a[4] = {op(A[gr * p.lda + k + t]), op(A[(gr + 8) * p.lda + k + t]), op(A[gr * p.lda + k + t + 4]),
                           op(A[(gr + 8) * p.lda + k + t + 4])};
    const uint32_t b[2] = {op(Bt[gr * p.ldb + k + t]), op(Bt[gr * p.ldb + k + t + 4])};
    rf::mma_m16n8k8_tf32(acc, a, b);
  }
  p.d[gr * 8 + c2] = acc[0];
  p.d[gr * 8 + c2 + 1] = acc[1];
  p.d[(gr + 8) * 8 + c2] = acc[2];
  p.d[(gr + 8) * 8 + c2 + 1] = acc[3];
}

// --------------------------------------------------------------------------------- dynamic shared memory ---
struct SmemArgs {
  unsigned char* out;  // [block][smem_bytes]: what the block found in its shared memory
  int* misaligned;     // [block]: the shared memory's address modulo 128
  long long write_at;  // mode 1: the offset the writer thread writes
  unsigned writer_block, writer_thread;
  int mode;            // 0: copy out, then scribble zeros; 1: one thread writes one byte at write_at
  size_t bytes;
};

__global__ void smem_kernel(SmemArgs a) {
  unsigned char* s = rf::dynamic_smem();
  if (a.mode == 0) {
    if (threadIdx.x == 0) a.misaligned[blockIdx.x] = static_cast<int>(reinterpret_cast<uintptr_t>(s) % 128);
    for (size_t i = threadIdx.x; i < a.bytes; i += blockDim.x) a.out[blockIdx.x * a.bytes + i] = s[i];
    rf::sync_block();
    for (size_t i = threadIdx.x; i < a.bytes; i += blockDim.x) s[i] = 0;  // the next launch must poison again
  } else if (blockIdx.x == a.writer_block && threadIdx.x == a.writer_thread) {
    s[a.write_at] = 0;
  }
  rf::sync_block();
}

// ------------------------------------------------------------------------------------------ failures ---
struct FailArgs {
  int mode;
  int* out;
};

// 80 KiB of locals, more than a fiber's 64 KiB stack; its own function, so that only this case has the frame.
__attribute__((noinline)) int deep_frame(unsigned t) {
  volatile unsigned char big[80 << 10];
  for (size_t i = 0; i < sizeof(big); i += 512) big[i] = 1;
  rf::sync_block();
  return big[t];
}

__global__ void fail_kernel(FailArgs a) {
  const unsigned t = threadIdx.x, lane = t % 32;
  switch (a.mode) {
    case 0:  // thread 0 skips the block barrier and exits
      if (t != 0) rf::sync_block();
      break;
    case 1:  // block 1 skips the grid barrier
      if (blockIdx.x != 1) rf::sync_grid();
      break;
    case 2:  // lane 3 shuffles while the rest of its warp waits at the block barrier
      if (lane == 3) a.out[t] = rf::shfl_xor(1, 1);
      rf::sync_block();
      break;
    case 3: {  // half the warp shuffles, the other half multiplies tiles
      if (lane < 16) {
        a.out[t] = rf::shfl_xor(1, 1);
      } else {
        float d[4] = {};
        const uint32_t x[4] = {}, y[2] = {};
        rf::mma_m16n8k16<rf::half_t>(d, x, y);
      }
      break;
    }
    case 4:  // warps 0-3 wait at the grid barrier, warps 4-7 at the block barrier: neither can complete
      if (t < 128) rf::sync_grid();
      else rf::sync_block();
      break;
    case 5:  // thread 7 throws
      if (t == 7) throw std::runtime_error("thrown by the test kernel");
      rf::sync_block();
      break;
    case 6:  // lane 31 of warp 1 exits while its warp shuffles
      if (t == 63) return;
      a.out[t] = rf::shfl_xor(static_cast<int>(t), 1);
      break;
    case 7:  // shuffles in a block of 48 threads: not whole warps
      a.out[t] = rf::shfl_xor(static_cast<int>(t), 1);
      break;
    case 8:  // a stack overflow
      a.out[t] = deep_frame(t);
      break;
    case 12: {  // lanes 16-31 leave before mma_m16n8k16, which needs the whole warp
      if (lane >= 16) return;
      float d[4] = {};
      const uint32_t x[4] = {}, y[2] = {};
      rf::mma_m16n8k16<rf::bf16_t>(d, x, y);
      break;
    }
    case 13:  // block 1 never raises its flag (a.out[0..2] are the flags)
      if (blockIdx.x != 1) rf::flag_arrive(reinterpret_cast<unsigned*>(a.out), static_cast<int>(blockIdx.x), 1);
      rf::flag_wait(reinterpret_cast<unsigned*>(a.out), static_cast<int>(gridDim.x), 1);
      break;
    case 11:  // block 1 never arrives at the split-phase barrier the others wait at (a.out[0] is the counter)
      if (blockIdx.x != 1) rf::grid_arrive(reinterpret_cast<unsigned*>(a.out));
      rf::grid_wait(reinterpret_cast<unsigned*>(a.out), gridDim.x);
      break;
    case 9:  // lane 0 shuffles first, then the rest of its warp reaches the block barrier
      if (lane == 0) a.out[t] = rf::shfl_xor(1, 1);
      rf::sync_block();
      break;
    case 10: {  // not a failure: warp 0 spins, shuffling, until warp 1 raises a flag (a.out[0]); it must get to
      volatile int* flag = a.out;
      if (t >= 32) {
        if (t == 32) *flag = 1;
        break;
      }
      int spins = 0;
      for (;;) {  // the lanes may read the flag at different times: OR their reads, so that all leave together
        int raised = *flag;
        for (int o = 16; o > 0; o >>= 1) raised |= rf::shfl_xor(raised, o);
        if (raised) break;
        ++spins;
      }
      if (t == 0) a.out[1] = spins > 0;
      break;
    }
    default:
      break;
  }
}

}  // namespace

// --------------------------------------------------------------------------------------------- cp_async4 ---
// Thread t copies in[t] into the shared word of its neighbour t+1 with cp.async, waits for its copy, and after a
// block barrier reads the word it was sent: out[t] = in[t-1].
// cp_async16 (wide): four words at a time, in[4t..4t+3] to the neighbour's four; offset words added to the source
// (1 misaligns it).
struct CopyArgs {
  const int* in;
  int* out;
  int wide, offset;
};

__global__ void cp_async_kernel(CopyArgs a) {
  int* s = reinterpret_cast<int*>(rf::dynamic_smem());
  const unsigned n = blockDim.x, t = threadIdx.x, base = blockIdx.x * n;
  const unsigned w = a.wide ? 4 : 1;
  if (a.wide) rf::cp_async16(s + (t + 1) % n * 4, a.in + (base + t) * 4 + a.offset);
  else rf::cp_async4(s + (t + 1) % n, a.in + base + t);
  rf::cp_async_commit();
  rf::cp_async_wait_all();
  rf::sync_block();
  for (unsigned i = 0; i < w; ++i) a.out[(base + t) * w + i] = s[t * w + i];
}

// bufs: in, out (int32, blocks*threads, x4 wide); ints: blocks, threads, wide, offset.
EMU_EXPORT int emu_cp_async(void* const* bufs, const long long* ints, char* err, int err_len) {
  // A 16-byte aligned copy of the input: numpy promises less.
  const size_t words = static_cast<size_t>(ints[0] * ints[1]) * (ints[2] ? 4 : 1) + 4;
  int* in = static_cast<int*>(std::aligned_alloc(64, (words * 4 + 63) / 64 * 64));
  std::memcpy(in, bufs[0], (words - 4) * 4);
  const CopyArgs a{in, static_cast<int*>(bufs[1]), static_cast<int>(ints[2]), static_cast<int>(ints[3])};
  std::string e;
  const unsigned threads = static_cast<unsigned>(ints[1]);
  const bool ok = rf::launch(static_cast<unsigned>(ints[0]), threads, threads * sizeof(int) * (ints[2] ? 4 : 1),
                             [&] { cp_async_kernel(a); }, &e);
  std::free(in);
  return report(ok, e, err, err_len);
}

// bufs: out (int32, blocks*threads); ints: blocks, threads, skip_sync.
EMU_EXPORT int emu_sync_block(void* const* bufs, const long long* ints, char* err, int err_len) {
  std::string e;
  const bool ok = rotate(static_cast<unsigned>(ints[0]), static_cast<unsigned>(ints[1]), static_cast<int*>(bufs[0]),
                         ints[2] != 0, &e);
  return report(ok, e, err, err_len);
}

// bufs: in (int32, blocks*threads), out (int32, blocks); ints: blocks, threads (a power of two), skip_sync.
EMU_EXPORT int emu_tree_sum(void* const* bufs, const long long* ints, char* err, int err_len) {
  const TreeArgs a{static_cast<const int*>(bufs[0]), static_cast<int*>(bufs[1]), ints[2] != 0};
  std::string e;
  const unsigned threads = static_cast<unsigned>(ints[1]);
  const bool ok = rf::launch(static_cast<unsigned>(ints[0]), threads, threads * sizeof(int),
                             [&] { tree_sum_kernel(a); }, &e);
  return report(ok, e, err, err_len);
}

// bufs: buf (uint32, 2*N), out (uint32, N), seconds (float64, 1), counter (uint32, blocks); ints: blocks, threads,
// rounds, barrier (0 sync_grid, 1 the split-phase one on counter[0], 2 on one flag a block).
EMU_EXPORT int emu_sync_grid(void* const* bufs, const long long* ints, char* err, int err_len) {
  const GridArgs a{static_cast<uint32_t*>(bufs[0]), static_cast<uint32_t*>(bufs[1]), static_cast<int>(ints[2]),
                   ints[3] != 0 ? static_cast<unsigned*>(bufs[3]) : nullptr, ints[3] == 2};
  std::string e;
  const auto t0 = std::chrono::steady_clock::now();
  const bool ok = rf::launch(static_cast<unsigned>(ints[0]), static_cast<unsigned>(ints[1]), 0,
                             [&] { grid_exchange_kernel(a); }, &e);
  static_cast<double*>(bufs[2])[0] = seconds_since(t0);
  return report(ok, e, err, err_len);
}

// bufs: in_f, out_f, in_d, out_d, perm_i, perm_u, perm_ll, perm_h; ints: blocks, threads.
EMU_EXPORT int emu_shfl(void* const* bufs, const long long* ints, char* err, int err_len) {
  const ShflArgs a{static_cast<const float*>(bufs[0]), static_cast<float*>(bufs[1]),
                   static_cast<const double*>(bufs[2]), static_cast<double*>(bufs[3]),
                   static_cast<int*>(bufs[4]), static_cast<uint32_t*>(bufs[5]),
                   static_cast<int64_t*>(bufs[6]), static_cast<uint16_t*>(bufs[7])};
  std::string e;
  const bool ok = rf::launch(static_cast<unsigned>(ints[0]), static_cast<unsigned>(ints[1]), 0,
                             [&] { shfl_kernel(a); }, &e);
  return report(ok, e, err, err_len);
}

// Host conversions, no launch. bufs: x_f (float32, nf), x_d (float64, nd), x_i (int64, ni), then out uint16:
// half(x_f), bf16(x_f), half(x_d), bf16(x_d), half(x_i), bf16(x_i), half(int(x_i % 100000)), then out float32
// (65536 each): float(half bits i), float(bf16 bits i). ints: nf, nd, ni. Returns 2 if a spelled-out form is wrong.
EMU_EXPORT int emu_convert(void* const* bufs, const long long* ints, char*, int) {
  const auto* xf = static_cast<const float*>(bufs[0]);
  const auto* xd = static_cast<const double*>(bufs[1]);
  const auto* xi = static_cast<const long long*>(bufs[2]);
  uint16_t* out[7];
  for (int j = 0; j < 7; ++j) out[j] = static_cast<uint16_t*>(bufs[3 + j]);
  for (long long i = 0; i < ints[0]; ++i) {
    out[0][i] = rf::half_t(xf[i]).bits;
    out[1][i] = rf::bf16_t(xf[i]).bits;
  }
  for (long long i = 0; i < ints[1]; ++i) {
    out[2][i] = rf::half_t(xd[i]).bits;
    out[3][i] = rf::bf16_t(xd[i]).bits;
  }
  for (long long i = 0; i < ints[2]; ++i) {
    out[4][i] = rf::half_t(xi[i]).bits;
    out[5][i] = rf::bf16_t(xi[i]).bits;
    out[6][i] = rf::half_t(static_cast<int>(xi[i] % 100000)).bits;
  }
  auto* hf = static_cast<float*>(bufs[10]);
  auto* bf = static_cast<float*>(bufs[11]);
  for (unsigned u = 0; u < 65536; ++u) {
    rf::half_t h;
    h.bits = static_cast<uint16_t>(u);
    rf::bf16_t b;
    b.bits = static_cast<uint16_t>(u);
    hf[u] = h;  // through operator float, as a kernel assigns one
    bf[u] = static_cast<float>(b);
  }
  // The forms kernels write: half_t(0), half_t(1.5f), from_float.
  rf::half_t z(0), one_half(1.5f), r;
  rf::from_float(2.5f, &r);
  rf::bf16_t bz(0), bo(1.5f), br;
  rf::from_float(-3.0f, &br);
  const bool forms = z.bits == 0 && one_half.bits == 0x3E00 && r.bits == 0x4100 && bz.bits == 0 &&
                     bo.bits == 0x3FC0 && br.bits == 0xC040 && rf::to_float(one_half) == 1.5f;
  return forms ? 0 : 2;
}

// bufs: values (float32), rounded in place by rf::to_tf32; ints: count.
EMU_EXPORT int emu_tf32(void* const* bufs, const long long* ints, char*, int) {
  float* v = static_cast<float*>(bufs[0]);
  for (long long i = 0; i < ints[0]; ++i) v[i] = rf::bits_to_float(rf::to_tf32(v[i]));
  return 0;
}

// bufs: a (16 x lda), bt (8 x ldb) 16-bit (float32 for TF32); c, d (16 x 8 float32); ints: dtype (0 half, 1 bf16,
// 2 tf32, 3 tf32 unconverted), k, lda, ldb, offset.
EMU_EXPORT int emu_mma(void* const* bufs, const long long* ints, char* err, int err_len) {
  const MmaArgs p{bufs[0], bufs[1], static_cast<const float*>(bufs[2]), static_cast<float*>(bufs[3]),
                  static_cast<int>(ints[1]), static_cast<int>(ints[2]), static_cast<int>(ints[3]),
                  static_cast<int>(ints[4])};
  const size_t smem = 2 * (16 * static_cast<size_t>(p.lda) + 16 + 8 * static_cast<size_t>(p.ldb));
  std::string e;
  const bool ok = ints[0] == 0   ? rf::launch(1, 32, smem, [&] { mma_kernel<rf::half_t>(p); }, &e)
                  : ints[0] == 1 ? rf::launch(1, 32, smem, [&] { mma_kernel<rf::bf16_t>(p); }, &e)
                                 : rf::launch(1, 32, 0, [&] { mma_tf32_kernel(p, ints[0] == 2); }, &e);
  return report(ok, e, err, err_len);
}

// bufs: out (uint8, 2 launches x blocks x bytes), misaligned (int32, blocks); ints: blocks, threads, bytes, mode,
// write_at, writer_block, writer_thread. Mode 0 launches twice, the second launch's view in the second half of out.
EMU_EXPORT int emu_smem(void* const* bufs, const long long* ints, char* err, int err_len) {
  const unsigned blocks = static_cast<unsigned>(ints[0]), threads = static_cast<unsigned>(ints[1]);
  const size_t bytes = static_cast<size_t>(ints[2]);
  SmemArgs a{static_cast<unsigned char*>(bufs[0]), static_cast<int*>(bufs[1]), ints[4],
             static_cast<unsigned>(ints[5]), static_cast<unsigned>(ints[6]), static_cast<int>(ints[3]), bytes};
  std::string e;
  bool ok = rf::launch(blocks, threads, bytes, [&] { smem_kernel(a); }, &e);
  if (ok && a.mode == 0) {
    a.out += static_cast<size_t>(blocks) * bytes;
    ok = rf::launch(blocks, threads, bytes, [&] { smem_kernel(a); }, &e);
  }
  return report(ok, e, err, err_len);
}

// bufs: out (int32, threads), seconds (float64, 1); ints: mode, blocks, threads. The failing launch, then a good
// one (the sync_block kernel) to show the emulation recovered.
EMU_EXPORT int emu_fail(void* const* bufs, const long long* ints, char* err, int err_len) {
  const FailArgs a{static_cast<int>(ints[0]), static_cast<int*>(bufs[0])};
  std::string e;
  const auto t0 = std::chrono::steady_clock::now();
  const bool ok = rf::launch(static_cast<unsigned>(ints[1]), static_cast<unsigned>(ints[2]), 0,
                             [&] { fail_kernel(a); }, &e);
  static_cast<double*>(bufs[1])[0] = seconds_since(t0);
  std::string e2;
  int* out = static_cast<int*>(std::calloc(2 * 64, sizeof(int)));
  bool again = rotate(2, 64, out, false, &e2);
  for (unsigned i = 0; again && i < 2 * 64; ++i) again = out[i] == static_cast<int>((i / 64) * 1000 + (i + 1) % 64);
  std::free(out);
  if (!again) return report(false, "the launch after the failed one went wrong: " + e2, err, err_len) + 2;
  return report(ok, e, err, err_len);
}

// The refusals: an empty grid, too many threads per block, a launch from inside a kernel, and a primitive called
// outside any launch. ints: which (0..3). Returns 1 with the message, as a failed launch does.
EMU_EXPORT int emu_refuse(void* const*, const long long* ints, char* err, int err_len) {
  std::string e;
  bool ok = true;
  switch (ints[0]) {
    case 0: ok = rf::launch(0, 32, 0, [] {}, &e); break;
    case 1: ok = rf::launch(1, 2048, 0, [] {}, &e); break;
    case 2: {
      std::string inner;
      bool inner_ok = true;
      ok = rf::launch(1, 32, 0, [&] { if (threadIdx.x == 0) inner_ok = rf::launch(1, 32, 0, [] {}, &inner); }, &e);
      if (ok && !inner_ok) return report(false, inner, err, err_len);
      break;
    }
    case 3:
      try {
        rf::sync_block();
      } catch (const std::logic_error& x) {
        return report(false, x.what(), err, err_len);
      }
      break;
    default: return 2;
  }
  return report(ok, e, err, err_len);
}
