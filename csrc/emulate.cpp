// The fiber scheduler of the CPU emulation (emulate.h): the globals, the fibers, the barriers and the launch.
//
// Every thread of the grid is a fiber with a 64 KiB stack (one mmap, MAP_NORESERVE, a PROT_NONE guard page under
// each stack while the process's map-count limit allows), all alive at once, on the launching OS thread. A fiber
// runs until it blocks at a barrier or a warp collective, or finishes, and then switches straight to the next ready
// fiber (x86-64: a dozen instructions; elsewhere, or with -DRF_EMULATE_UCONTEXT, swapcontext). The last thread to
// arrive at a barrier releases the others onto the run queue in thread order and carries on: at the queue's front
// for a warp or block barrier (see release), at its back for the grid barrier. When the queue runs dry with
// threads unfinished, no barrier can complete: a deadlock. A failed check records its message and switches to the
// launching context for good, as does a fault (SIGSEGV, SIGBUS, SIGFPE) in a fiber; the launch then drops every
// fiber (their stacks hold only the kernel's frames, nothing to destroy) and returns false.
#include "emulate.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__) && !defined(RF_EMULATE_UCONTEXT)
#define RF_EMU_ASM 1
#endif
#include <ucontext.h>

rf_dim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim, gridDim;  // a 1-D launch: y and z indices 0, sizes 1

namespace rf {
namespace detail {
unsigned char* current_smem = nullptr;
}
}  // namespace rf

#ifdef RF_EMU_ASM
// rf_emu_switch(save, load): push the callee-saved registers and the SSE/x87 control words, store the stack
// pointer in *save, load `load`, pop the same. A new fiber's stack is laid out as if it had switched out just
// before rf_emu_trampoline, which calls rf_emu_fiber_entry with the stack 16-byte aligned.
extern "C" void rf_emu_switch(void** save, void* load);
extern "C" void rf_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl rf_emu_switch
  .hidden rf_emu_switch
  .type rf_emu_switch, @function
rf_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size rf_emu_switch, .-rf_emu_switch

  .p2align 4
  .globl rf_emu_trampoline
  .hidden rf_emu_trampoline
  .type rf_emu_trampoline, @function
rf_emu_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  call rf_emu_fiber_entry
  ud2
  .cfi_endproc
  .size rf_emu_trampoline, .-rf_emu_trampoline
)");
#endif

extern "C" RF_EMU_API void rf_emu_fiber_entry();

namespace {

using rf::detail::Collective;

constexpr size_t kStackBytes = size_t{64} << 10;
constexpr size_t kStackMargin = size_t{4} << 10;  // a fiber that blocks with less stack left than this has overflowed
constexpr size_t kCanaryWords = 8;                // at the bottom of a stack that has no guard page
constexpr uint64_t kCanary = 0x52464e4f43414e41ull;
constexpr size_t kSmemAlign = 128;
constexpr size_t kSmemGuard = 4096;  // pattern-filled bytes before and after each block's dynamic shared memory
constexpr size_t kQuickGuard = 16;   // guard bytes checked whenever a fiber yields, to name the thread
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxFibers = size_t{1} << 18;
constexpr size_t kMaxSmemTotal = size_t{1} << 30;

enum class State : uint8_t { ready, running, wait_block, wait_cluster, wait_grid, wait_warp, spin, done };

struct Context {
#ifdef RF_EMU_ASM
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

struct Fiber {
  Context ctx;
  unsigned block = 0, thread = 0;
  State state = State::ready;
  Collective waits_in = Collective::shfl_xor;  // with State::wait_warp
  bool guarded = false;                        // a guard page lies under the stack; else a canary does
  unsigned char* stack_lo = nullptr;
};

struct Scope {  // a block, a warp or the grid
  unsigned arrived = 0;  // threads waiting at its barrier now
  unsigned exited = 0;
  unsigned first_exited = 0;  // thread index (within the block) of the first to exit
  unsigned first_exited_block = 0;
};

struct Slot {
  uint64_t value;
  Collective what;
};

struct Warp : Scope {
  unsigned gen = 0;         // collectives completed; the slots alternate so a lane may read after release
  unsigned at_barrier = 0;  // lanes waiting at sync_block or sync_grid
  Slot slot[2][32];
};

struct Launch {
  unsigned blocks = 0, threads = 0, warps_per_block = 0;
  size_t n = 0;
  size_t smem_bytes = 0, smem_stride = 0;
  unsigned char* smem = nullptr;  // blocks x smem_stride; block b's memory at smem + b*stride + kSmemGuard
  unsigned char* stacks = nullptr;
  size_t stacks_bytes = 0, stack_stride = 0;
  std::vector<Fiber> fibers;
  std::vector<Scope> block_scopes;
  std::vector<Scope> cluster_scopes;  // blocks / cluster of them
  unsigned cluster = 1;               // blocks a cluster
  std::vector<Warp> warps;
  Scope grid;
  std::vector<Fiber*> queue;  // ring buffer of ready fibers; each fiber is in it at most once
  size_t q_head = 0, q_size = 0;
  unsigned front_budget = 0;  // releases that may still jump the queue before one goes to its back
  size_t done = 0;
  size_t spins = 0;  // spin() calls since a thread last did anything else (arrived, exited, saw its flag)
  bool failed = false;
  std::string error;
  void (*body)(void*) = nullptr;
  void* context = nullptr;
  Fiber* cur = nullptr;
  Context main;
  bool in_main = true;                 // the launching context runs, not a fiber
  bool faulted = false;                // a fiber took SIGSEGV/SIGBUS/SIGFPE; fault_message says where
  char fault_message[256] = {};
  std::vector<unsigned char> pattern;  // the guard bytes

  unsigned char* smem_of(unsigned block) { return smem + block * smem_stride + kSmemGuard; }
  Warp& warp_of(const Fiber* f) { return warps[f->block * warps_per_block + f->thread / 32]; }
  void push(Fiber* f) {
    queue[(q_head + q_size) % n] = f;
    ++q_size;
  }
  void push_front(Fiber* f) {
    q_head = (q_head + n - 1) % n;
    queue[q_head] = f;
    ++q_size;
  }
  Fiber* pop() {
    if (q_size == 0) return nullptr;
    Fiber* f = queue[q_head];
    q_head = (q_head + 1) % n;
    --q_size;
    return f;
  }
};

Launch* g = nullptr;  // the launch in progress
std::mutex g_launch_mutex;
thread_local bool t_in_launch = false;

const char* name_of(Collective c) {
  switch (c) {
    case Collective::shfl_xor: return "shfl_xor";
    case Collective::ldmatrix: return "ldmatrix";
    case Collective::mma_m16n8k16: return "mma_m16n8k16";
    case Collective::mma_m16n8k8: return "mma_m16n8k8";
  }
  return "?";
}

std::string where(const Fiber* f) {
  return "block " + std::to_string(f->block) + " thread " + std::to_string(f->thread);
}

inline void jump(Context& from, Context& to) {
#ifdef RF_EMU_ASM
  rf_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

// Makes f the running thread: what the kernel sees as threadIdx, blockIdx and its shared memory.
inline void resume(Fiber* f) {
  g->cur = f;
  f->state = State::running;
  threadIdx.x = f->thread;
  blockIdx.x = f->block;
  rf::detail::current_smem = g->smem_of(f->block);
}

// Records the first failure and leaves the fiber for good: the launching context takes over.
[[noreturn]] void fail_now(std::string message) {
  if (!g->failed) {
    g->failed = true;
    g->error = std::move(message);
  }
  g->in_main = true;
  jump(g->cur->ctx, g->main);
  std::abort();  // never resumed
}

// The checks run whenever a fiber stops running: its stack, and the guard bytes next to its block's shared memory,
// so that the thread that wrote them is the one named.
void check_slice(Fiber* self) {
  const auto frame = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  const auto lo = reinterpret_cast<uintptr_t>(self->stack_lo);
  const bool canary_ok =
      self->guarded || reinterpret_cast<const uint64_t*>(self->stack_lo)[kCanaryWords - 1] == kCanary;
  if (frame < lo + kStackMargin || !canary_ok)
    fail_now(where(self) + ": stack overflow: the emulation gives each thread " + std::to_string(kStackBytes >> 10) +
             " KiB of stack (a large local array?)");
  const unsigned char* s = g->smem_of(self->block);
  if (std::memcmp(s + g->smem_bytes, g->pattern.data(), kQuickGuard) != 0)
    fail_now(where(self) + ": wrote past the end of its block's " + std::to_string(g->smem_bytes) +
             " bytes of dynamic shared memory (dynamic shared memory overrun)");
  if (std::memcmp(s - kQuickGuard, g->pattern.data() + kSmemGuard - kQuickGuard, kQuickGuard) != 0)
    fail_now(where(self) + ": wrote before the start of its block's dynamic shared memory (dynamic shared memory "
             "underrun)");
}

// self has blocked or finished: run the next ready fiber, or return to the launching context when there is none.
void yield(Fiber* self) {
  check_slice(self);
  Fiber* next = g->pop();
  if (next != nullptr) {
    resume(next);
    jump(self->ctx, next->ctx);
  } else {
    g->in_main = true;
    jump(self->ctx, g->main);
  }
}

Fiber* require_fiber(const char* what) {
  if (!t_in_launch || g == nullptr || g->cur == nullptr)
    throw std::logic_error(std::string("rf::") + what + " called outside a kernel running under rf::launch");
  return g->cur;
}

// Puts the threads a barrier releases (all of first[0, count) but self, which carries on) on the queue. A warp or
// block barrier puts them at its front, so that a warp's lanes run on while their stacks are in cache (with a full
// grid at the back of the queue, every switch would be a cache miss); every kFrontBudget releases one goes to the
// back instead, so that every warp keeps making progress, e.g. one that spins on a flag another warp sets.
constexpr unsigned kFrontBudget = 1024;

void release(Fiber* self, Fiber* first, size_t count, bool front) {
  if (front && g->front_budget > 0) {
    --g->front_budget;
    for (size_t i = count; i-- > 0;) {
      Fiber* f = first + i;
      if (f != self) {
        f->state = State::ready;
        g->push_front(f);
      }
    }
    return;
  }
  g->front_budget = kFrontBudget;
  for (size_t i = 0; i < count; ++i) {
    Fiber* f = first + i;
    if (f != self) {
      f->state = State::ready;
      g->push(f);
    }
  }
}

std::string exited_thread(const Scope& s) {
  return "block " + std::to_string(s.first_exited_block) + " thread " + std::to_string(s.first_exited);
}

// The collective the waiting lanes of self's warp are in.
const char* warp_waits_in(const Fiber* self) {
  const Fiber* lanes = &g->fibers[static_cast<size_t>(self->block) * g->threads + (self->thread / 32) * 32];
  for (unsigned l = 0; l < 32 && (self->thread / 32) * 32 + l < g->threads; ++l)
    if (lanes[l].state == State::wait_warp) return name_of(lanes[l].waits_in);
  return "a warp collective";
}

void check_warp_at_barrier(Fiber* self, const char* what) {
  const Warp& w = g->warp_of(self);
  if (w.arrived != 0)
    fail_now(where(self) + ": reaches " + what + " while " + std::to_string(w.arrived) + " lanes of its warp wait at " +
             warp_waits_in(self) + ": the warp diverged at a collective, which needs all 32 lanes");
}

// Exited threads can never arrive: a barrier of their scope can never complete.
void on_exit(Fiber* self) {
  Scope& b = g->block_scopes[self->block];
  Scope& c = g->cluster_scopes[self->block / g->cluster];
  Warp& w = g->warp_of(self);
  const std::string at = where(self) + " exited while ";
  if (b.arrived != 0)
    fail_now(at + std::to_string(b.arrived) + " threads of its block wait at sync_block, which needs every thread of "
             "the block (a sync_block it skipped?)");
  if (c.arrived != 0)
    fail_now(at + std::to_string(c.arrived) + " threads of its cluster wait at cluster_sync, which needs every "
             "thread of the cluster (a cluster_sync it skipped?)");
  if (g->grid.arrived != 0)
    fail_now(at + std::to_string(g->grid.arrived) + " threads of the grid wait at sync_grid, which needs every "
             "thread of the grid (a sync_grid it skipped?)");
  if (w.arrived != 0 && g->threads % 32 == 0)
    fail_now(at + std::to_string(w.arrived) + " lanes of its warp wait at " + warp_waits_in(self) +
             ", which needs all 32 lanes");
  for (Scope* s : {static_cast<Scope*>(&b), &c, static_cast<Scope*>(&w), &g->grid}) {
    if (s->exited++ == 0) {
      s->first_exited = self->thread;
      s->first_exited_block = self->block;
    }
  }
}

// "thread 0", "threads 1-255", "threads 0-3, 8, 10-12 and more".
std::string ranges(const std::vector<unsigned>& ids) {
  std::string out = ids.size() == 1 ? "thread " : "threads ";
  size_t shown = 0;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (shown == 6) {
      out += " and more";
      break;
    }
    out += (shown ? ", " : "") + std::to_string(ids[i]) + (j > i ? "-" + std::to_string(ids[j]) : "");
    ++shown;
    i = j + 1;
  }
  return out;
}

std::string state_text(const Fiber& f) {
  switch (f.state) {
    case State::wait_block: return "wait at sync_block";
    case State::wait_cluster: return "wait at cluster_sync";
    case State::wait_grid: return "wait at sync_grid";
    case State::wait_warp: return std::string("wait at ") + name_of(f.waits_in);
    case State::spin: return "spin on a flag (grid_wait)";
    case State::done: return "have exited";
    default: return "are ready";
  }
}

// Where every unfinished thread stands, block by block; blocks whose threads all wait alike are summarised.
std::string deadlock_message() {
  std::string out = "deadlock: every unfinished thread waits and no barrier can complete (a barrier that some "
                    "thread skipped, or lanes of a warp in different places):";
  size_t described = 0, uniform = 0;
  for (unsigned b = 0; b < g->blocks; ++b) {
    std::vector<std::pair<std::string, std::vector<unsigned>>> groups;
    for (unsigned t = 0; t < g->threads; ++t) {
      const std::string s = state_text(g->fibers[static_cast<size_t>(b) * g->threads + t]);
      auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& gr) { return gr.first == s; });
      if (it == groups.end()) groups.push_back({s, {t}});
      else it->second.push_back(t);
    }
    if (groups.size() == 1) {
      ++uniform;
      continue;
    }
    if (described++ >= 4) continue;
    std::sort(groups.begin(), groups.end(),
              [](const auto& x, const auto& y) { return x.second.size() < y.second.size(); });
    out += " block " + std::to_string(b) + ":";
    for (size_t i = 0; i < groups.size(); ++i)
      out += (i ? "," : "") + std::string(" ") + ranges(groups[i].second) + " " + groups[i].first;
    out += ";";
  }
  if (described > 4) out += " and " + std::to_string(described - 4) + " more such blocks;";
  if (uniform) out += " " + std::to_string(uniform) + " other blocks have all their threads waiting alike.";
  if (out.back() == ';') out.back() = '.';
  return out;
}

// A block's guard bytes after the launch: the whole guard, not just the bytes the fibers checked as they went.
std::string smem_guard_problem() {
  for (unsigned b = 0; b < g->blocks; ++b) {
    const unsigned char* s = g->smem_of(b);
    const size_t after = g->smem_stride - kSmemGuard - g->smem_bytes;
    const unsigned char* before = s - kSmemGuard;
    if (std::memcmp(before, g->pattern.data(), kSmemGuard) != 0) {
      size_t first = 0, last = kSmemGuard;
      while (before[first] == g->pattern[first]) ++first;
      while (before[last - 1] == g->pattern[last - 1]) --last;
      return "block " + std::to_string(b) + ": dynamic shared memory underrun: bytes -" +
             std::to_string(kSmemGuard - first) + " to -" + std::to_string(kSmemGuard - last + 1) +
             " (before the start of its dynamic shared memory) were written";
    }
    if (std::memcmp(s + g->smem_bytes, g->pattern.data(), after) != 0) {
      size_t last = after;
      while (s[g->smem_bytes + last - 1] == g->pattern[last - 1]) --last;
      size_t first = 0;
      while (s[g->smem_bytes + first] == g->pattern[first]) ++first;
      return "block " + std::to_string(b) + ": dynamic shared memory overrun: bytes " +
             std::to_string(g->smem_bytes + first) + " to " + std::to_string(g->smem_bytes + last - 1) +
             " were written, past the end of its " + std::to_string(g->smem_bytes) + " bytes";
    }
  }
  return {};
}

size_t count_maps() {
  FILE* f = std::fopen("/proc/self/maps", "r");
  if (f == nullptr) return 0;
  size_t lines = 0, got;
  char buf[1 << 16];
  while ((got = std::fread(buf, 1, sizeof(buf), f)) > 0) lines += static_cast<size_t>(std::count(buf, buf + got, '\n'));
  std::fclose(f);
  return lines;
}

size_t max_maps() {
  static const size_t limit = [] {
    FILE* f = std::fopen("/proc/sys/vm/max_map_count", "r");
    unsigned long long v = 65530;
    if (f != nullptr) {
      if (std::fscanf(f, "%llu", &v) != 1) v = 65530;
      std::fclose(f);
    }
    return static_cast<size_t>(v);
  }();
  return limit;
}

// The stacks, one mapping; guard pages for as many as the map-count limit leaves room for (each guard splits the
// mapping, two more entries), keeping a margin for the rest of the process.
std::string make_stacks(Launch& L) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  L.stack_stride = kStackBytes + page;
  L.stacks_bytes = L.stack_stride * L.n;
  void* p = mmap(nullptr, L.stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return "cannot map " + std::to_string(L.stacks_bytes >> 20) + " MiB of fiber stacks";
  L.stacks = static_cast<unsigned char*>(p);
  // Counting the process's mappings costs more than a small launch: only when the guards could approach the limit.
  const size_t limit = max_maps(), used = 2 * L.n < limit / 4 ? 0 : count_maps() + 2048;
  const size_t guards = std::min(L.n, limit > used ? (limit - used) / 2 : 0);
  uint32_t control[2] = {0, 0};
#ifdef RF_EMU_ASM
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
#endif
  for (size_t i = 0; i < L.n; ++i) {
    Fiber& f = L.fibers[i];
    unsigned char* base = L.stacks + i * L.stack_stride;
    f.stack_lo = base + page;
    f.guarded = i < guards && mprotect(base, page, PROT_NONE) == 0;
    if (!f.guarded)
      for (size_t w = 0; w < kCanaryWords; ++w) reinterpret_cast<uint64_t*>(f.stack_lo)[w] = kCanary;
#ifdef RF_EMU_ASM
    // As rf_emu_switch leaves a stack: control words, r15..r12, rbx, rbp, then the return address.
    auto* top = reinterpret_cast<uint64_t*>(f.stack_lo + kStackBytes - 16);
    top[-1] = reinterpret_cast<uint64_t>(&rf_emu_trampoline);
    for (int r = 2; r <= 7; ++r) top[-r] = 0;
    top[-8] = control[0] | static_cast<uint64_t>(control[1] & 0xFFFF) << 32;
    f.ctx.sp = top - 8;
#else
    (void)control;
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = f.stack_lo;
    f.ctx.uc.uc_stack.ss_size = kStackBytes;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, &rf_emu_fiber_entry, 0);
#endif
  }
  return {};
}

std::string make_smem(Launch& L) {
  const size_t rounded = (L.smem_bytes + kSmemAlign - 1) / kSmemAlign * kSmemAlign;
  L.smem_stride = kSmemGuard + rounded + kSmemGuard;
  if (L.smem_stride * L.blocks > kMaxSmemTotal)
    return std::to_string(L.blocks) + " blocks of " + std::to_string(L.smem_bytes) +
           " bytes of dynamic shared memory are more than the emulation allocates (1 GiB)";
  L.smem = static_cast<unsigned char*>(std::aligned_alloc(kSmemAlign, L.smem_stride * L.blocks));
  if (L.smem == nullptr) return "cannot allocate the dynamic shared memory";
  L.pattern.resize(kSmemGuard + rounded);
  for (size_t i = 0; i < L.pattern.size(); ++i) L.pattern[i] = static_cast<unsigned char>(0xA5 ^ (i * 0x3B) ^ (i >> 8));
  for (unsigned b = 0; b < L.blocks; ++b) {
    unsigned char* s = L.smem_of(b);
    std::memcpy(s - kSmemGuard, L.pattern.data(), kSmemGuard);
    std::memset(s, 0xFF, L.smem_bytes);  // NaN in fp32, fp16 and bf16: a read before any write shows
    std::memcpy(s + L.smem_bytes, L.pattern.data(), L.smem_stride - kSmemGuard - L.smem_bytes);
  }
  return {};
}

// Faults while a fiber runs fail the launch instead of killing the process: a stack overflow into a guard page, or
// a kernel's out-of-bounds pointer. Installed for the launch only; a fault that is not a fiber's goes to the
// handler that was there before (the fault repeats once the previous disposition is back).
constexpr int kFaultSignals[] = {SIGSEGV, SIGBUS, SIGFPE};
struct sigaction g_old_actions[3];
stack_t g_old_altstack;
alignas(64) char g_altstack[64 << 10];

void on_fault(int sig, siginfo_t* info, void* uctx) {
  Launch* L = g;
  if (L != nullptr && t_in_launch && !L->in_main && L->cur != nullptr) {
    const auto addr = reinterpret_cast<uintptr_t>(info->si_addr), base = reinterpret_cast<uintptr_t>(L->stacks);
    const auto lo = reinterpret_cast<uintptr_t>(L->cur->stack_lo);
    const size_t page = L->stack_stride - kStackBytes;
    // A guard page, or just under the running fiber's stack (a frame larger than a page jumps the guard), or the
    // stack pointer itself under it.
    bool overflow = (addr >= base && addr < base + L->stacks_bytes && (addr - base) % L->stack_stride < page) ||
                    (addr < lo && addr + (size_t{1} << 20) >= lo);
#if defined(__x86_64__) && defined(REG_RSP)
    overflow = overflow || static_cast<uintptr_t>(static_cast<ucontext_t*>(uctx)->uc_mcontext.gregs[REG_RSP]) < lo;
#else
    (void)uctx;
#endif
    const char* what = sig == SIGFPE ? "an arithmetic exception (an integer division by zero?)"
                       : overflow    ? "a stack overflow: the emulation gives each thread 64 KiB of stack (a large "
                                       "local array?)"
                                     : "a segmentation fault (a read or write out of bounds?)";
    std::snprintf(L->fault_message, sizeof(L->fault_message), "block %u thread %u: %s at address %p", L->cur->block,
                  L->cur->thread, what, info->si_addr);
    L->faulted = true;
    L->in_main = true;
    Context dead;  // the faulting fiber is never resumed
    jump(dead, L->main);
  }
  for (int i = 0; i < 3; ++i)
    if (kFaultSignals[i] == sig) sigaction(sig, &g_old_actions[i], nullptr);
}

void install_fault_handlers() {
  stack_t ss{};
  ss.ss_sp = g_altstack;
  ss.ss_size = sizeof(g_altstack);
  sigaltstack(&ss, &g_old_altstack);
  struct sigaction sa {};
  sa.sa_sigaction = &on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  for (int i = 0; i < 3; ++i) sigaction(kFaultSignals[i], &sa, &g_old_actions[i]);
}

void remove_fault_handlers() {
  for (int i = 0; i < 3; ++i) sigaction(kFaultSignals[i], &g_old_actions[i], nullptr);
  sigaltstack(&g_old_altstack, nullptr);
}

void run(Launch& L) {
  for (auto& f : L.fibers) L.push(&f);
  Fiber* first = L.pop();
  resume(first);
  L.in_main = false;
  jump(L.main, first->ctx);
  // Back here: every thread finished, a check failed, a fiber faulted, or the queue ran dry with threads waiting.
  if (L.faulted && !L.failed) {
    L.failed = true;
    L.error = L.fault_message;
  }
  if (!L.failed && L.done != L.n) {
    L.failed = true;
    L.error = deadlock_message();
  }
}

}  // namespace

extern "C" void rf_emu_fiber_entry() {
  Fiber* self = g->cur;
  std::string thrown;
  bool threw = false;
  try {
    g->body(g->context);
  } catch (const std::exception& e) {
    threw = true;
    thrown = e.what();
  } catch (...) {
    threw = true;
    thrown = "an exception that is no std::exception";
  }
  // Outside the handler: the exception is gone before this fiber is left for good.
  if (threw) fail_now(where(self) + ": the kernel threw: " + thrown);
  on_exit(self);
  self->state = State::done;
  ++g->done;
  g->spins = 0;
  yield(self);
  std::abort();  // a finished fiber is never resumed
}

namespace rf {
namespace detail {

void arrive_block() {
  Fiber* self = require_fiber("sync_block");
  Scope& b = g->block_scopes[self->block];
  if (b.exited != 0)
    fail_now(where(self) + ": waits at sync_block, but " + exited_thread(b) +
             " has exited: the barrier needs every thread of the block and can never complete");
  check_warp_at_barrier(self, "sync_block");
  g->spins = 0;
  if (++b.arrived == g->threads) {
    b.arrived = 0;
    release(self, &g->fibers[static_cast<size_t>(self->block) * g->threads], g->threads, true);
    for (unsigned w = 0; w < g->warps_per_block; ++w) g->warps[self->block * g->warps_per_block + w].at_barrier = 0;
    return;
  }
  ++g->warp_of(self).at_barrier;
  self->state = State::wait_block;
  yield(self);
}

void arrive_cluster() {
  Fiber* self = require_fiber("cluster_sync");
  Scope& c = g->cluster_scopes[self->block / g->cluster];
  if (c.exited != 0)
    fail_now(where(self) + ": waits at cluster_sync, but " + exited_thread(c) +
             " has exited: the barrier needs every thread of the cluster and can never complete");
  check_warp_at_barrier(self, "cluster_sync");
  g->spins = 0;
  const unsigned first = self->block / g->cluster * g->cluster;
  if (++c.arrived == g->cluster * g->threads) {
    c.arrived = 0;
    release(self, &g->fibers[static_cast<size_t>(first) * g->threads], static_cast<size_t>(g->cluster) * g->threads,
            true);
    for (unsigned w = 0; w < g->cluster * g->warps_per_block; ++w)
      g->warps[first * g->warps_per_block + w].at_barrier = 0;
    return;
  }
  ++g->warp_of(self).at_barrier;
  self->state = State::wait_cluster;
  yield(self);
}

unsigned cluster_size() { return g != nullptr ? g->cluster : 1; }

unsigned char* map_shared(const void* p, unsigned rank) {
  Fiber* self = require_fiber("map_shared");
  const auto* c = static_cast<const unsigned char*>(p);
  const unsigned char* own = g->smem_of(self->block);
  if (c < own || c >= own + g->smem_bytes)
    fail("map_shared: the address is not in this block's dynamic shared memory");
  if (rank >= g->cluster)
    fail("map_shared: rank " + std::to_string(rank) + " of a cluster of " + std::to_string(g->cluster) + " blocks");
  return g->smem_of(self->block / g->cluster * g->cluster + rank) + (c - own);
}

void arrive_grid() {
  Fiber* self = require_fiber("sync_grid");
  if (g->grid.exited != 0)
    fail_now(where(self) + ": waits at sync_grid, but " + exited_thread(g->grid) +
             " has exited: the barrier needs every thread of the grid and can never complete");
  check_warp_at_barrier(self, "sync_grid");
  g->spins = 0;
  if (++g->grid.arrived == g->n) {
    g->grid.arrived = 0;
    release(self, g->fibers.data(), g->n, false);
    for (auto& w : g->warps) w.at_barrier = 0;
    return;
  }
  ++g->warp_of(self).at_barrier;
  self->state = State::wait_grid;
  yield(self);
}

namespace {

// The collective's part common to all: deposit the value, wait for the warp, check that its lanes agree, and
// return the slots of this collective, every lane's value, which stay as they are until this lane's next
// collective completes.
const Slot* arrive_warp(Collective what, uint64_t value) {
  Fiber* self = require_fiber(name_of(what));
  if (g->threads % 32 != 0)
    fail_now(where(self) + ": " + name_of(what) + " needs whole warps, but blockDim.x is " +
             std::to_string(g->threads) + ", not a multiple of 32");
  Warp& w = g->warp_of(self);
  const unsigned lane = self->thread % 32;
  if (w.exited != 0)
    fail_now(where(self) + ": " + name_of(what) + " needs all 32 lanes of the warp, but " + exited_thread(w) +
             " has exited");
  if (w.at_barrier != 0)
    fail_now(where(self) + ": calls " + name_of(what) + " while " + std::to_string(w.at_barrier) +
             " lanes of its warp wait at a block or grid barrier: the warp diverged, and the collective needs all "
             "32 lanes");
  const unsigned gen = w.gen & 1;
  g->spins = 0;
  w.slot[gen][lane] = {value, what};
  if (++w.arrived == 32) {
    w.arrived = 0;
    ++w.gen;
    const Slot* s = w.slot[gen];
    const std::string warp = "block " + std::to_string(self->block) + " warp " + std::to_string(self->thread / 32);
    for (unsigned l = 1; l < 32; ++l) {
      if (s[l].what != s[0].what)
        fail_now(warp + ": its lanes are in different warp collectives at once: lane 0 in " + name_of(s[0].what) +
                 ", lane " + std::to_string(l) + " in " + name_of(s[l].what) + " (divergent code?)");
    }
    release(self, &g->fibers[static_cast<size_t>(self->block) * g->threads + (self->thread / 32) * 32], 32, true);
  } else {
    self->state = State::wait_warp;
    self->waits_in = what;
    yield(self);
  }
  return w.slot[gen];
}

}  // namespace

uint64_t warp_collective(Collective what, uint64_t value, int lane_mask) {
  const Slot* slots = arrive_warp(what, value);
  const unsigned lane = g->cur->thread % 32;
  unsigned src = lane ^ static_cast<unsigned>(lane_mask);
  if (src >= 32) src = lane;
  return slots[src].value;
}

void warp_gather(Collective what, uint64_t value, uint64_t* all) {
  const Slot* slots = arrive_warp(what, value);
  for (unsigned l = 0; l < 32; ++l) all[l] = slots[l].value;
}

bool in_smem(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= current_smem && c + bytes <= current_smem + g->smem_bytes;
}

// A thread that waits for a flag another thread sets: to the back of the queue, so that every other ready thread
// runs first. When every ready thread has spun once since anyone last did anything else, none of them can set what
// the others wait for (the threads not in the queue wait at barriers that need the spinners): a deadlock.
void spin() {
  Fiber* self = require_fiber("spin");
  if (++g->spins > g->q_size + 1)
    fail_now(deadlock_message() + " (the spinning threads wait for a flag that no thread that can run will set: a "
                                  "block that never reaches the grid_arrive the wait counts on?)");
  self->state = State::spin;
  g->push(self);
  yield(self);
}

void progressed() { g->spins = 0; }

void fail(const std::string& message) {
  Fiber* self = require_fiber("a check");
  fail_now(where(self) + ": " + message);
}

bool launch(unsigned blocks, unsigned threads, size_t smem_bytes, unsigned cluster, void (*body)(void*),
            void* context, std::string* error) {
  auto refuse = [&](const std::string& why) {
    if (error != nullptr) *error = "rf::launch: " + why;
    return false;
  };
  if (t_in_launch) return refuse("called from inside a kernel; the emulation runs one launch at a time");
  if (blocks == 0 || threads == 0)
    return refuse("an empty grid (" + std::to_string(blocks) + " blocks of " + std::to_string(threads) + " threads)");
  if (threads > kMaxThreadsPerBlock)
    return refuse(std::to_string(threads) + " threads per block, more than the 1024 a GPU allows");
  if (cluster == 0 || cluster > 16 || blocks % cluster != 0)
    return refuse("clusters of " + std::to_string(cluster) + " blocks must divide the grid of " +
                  std::to_string(blocks) + " (and be 1 to 16 blocks)");
  if (static_cast<size_t>(blocks) * threads > kMaxFibers)
    return refuse(std::to_string(static_cast<size_t>(blocks) * threads) + " threads, more than the emulation's " +
                  std::to_string(kMaxFibers));

  std::lock_guard<std::mutex> lock(g_launch_mutex);
  Launch L;
  std::string problem;
  try {
    L.blocks = blocks;
    L.threads = threads;
    L.warps_per_block = (threads + 31) / 32;
    L.n = static_cast<size_t>(blocks) * threads;
    L.smem_bytes = smem_bytes;
    L.body = body;
    L.context = context;
    L.fibers.resize(L.n);
    for (size_t i = 0; i < L.n; ++i) {
      L.fibers[i].block = static_cast<unsigned>(i / threads);
      L.fibers[i].thread = static_cast<unsigned>(i % threads);
    }
    L.block_scopes.resize(blocks);
    L.cluster = cluster;
    L.cluster_scopes.resize(blocks / cluster);
    L.warps.resize(static_cast<size_t>(blocks) * L.warps_per_block);
    L.queue.resize(L.n);
    problem = make_smem(L);
    if (problem.empty()) problem = make_stacks(L);
  } catch (const std::bad_alloc&) {
    problem = "out of memory for " + std::to_string(L.n) + " threads";
  }
  if (problem.empty()) {
    const rf_dim3 saved[4] = {threadIdx, blockIdx, blockDim, gridDim};
    blockDim = rf_dim3{threads, 1, 1};
    gridDim = rf_dim3{blocks, 1, 1};
    g = &L;
    t_in_launch = true;
    install_fault_handlers();
    run(L);
    remove_fault_handlers();
    const std::string guard = smem_guard_problem();
    if (!guard.empty()) {
      if (!L.failed) L.error = guard;
      else L.error += " (also: " + guard + ")";
      L.failed = true;
    }
    g = nullptr;
    t_in_launch = false;
    rf::detail::current_smem = nullptr;
    threadIdx = saved[0];
    blockIdx = saved[1];
    blockDim = saved[2];
    gridDim = saved[3];
    if (L.failed) problem = L.error;
  }
  if (L.stacks != nullptr) munmap(L.stacks, L.stacks_bytes);
  std::free(L.smem);
  return problem.empty() ? true : refuse(problem);
}

}  // namespace detail
}  // namespace rf
