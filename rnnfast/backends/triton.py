"""The ``triton`` backend: the host side of the kernels in :mod:`rnnfast.kernels.layer` (plans, weight packing,
launchers) and its registration.

Modes (``backend="triton:<mode>"``): ``hoisted`` (default) computes the input product for all steps as one GEMM
before the recurrent kernel; ``fused`` multiplies ``x_t`` by ``W_ih`` inside each step.

A launch is built (:func:`forward_launch`, :func:`backward_launch`) and then run; the AOT report
(:mod:`rnnfast.kernels.aot`) builds the same launch on meta tensors and compiles it with the JIT's own
specialisation, so what it reports is what runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton

from ..kernels import layer
from ..reference import GATES, compute_dtype
from ..workspace import (gate_planes, input_and_weight_grads, split_workspace, widened_addmm, workspace_bytes,
                         zero_gaps)
from . import KernelBackend, LayerGrads, LayerOutputs, kernel_layer_problem, register

# triton.jit picks the interpreter when the module is imported, so this is fixed for the process.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SCHEDULES = ("persistent", "step")
# A packed weight slice stays on chip for the whole sequence (the compiler keeps a loop-invariant dot operand in
# shared memory) when it takes at most RESIDENT_BYTES in at most MAX_CHUNKS chunks: the backward slice of anchor (a),
# 3072 x 16 in 16 bits, is 96 KB. Each step's operand rows go through registers and shared memory a chunk at a time,
# so a chunk is at most A_TILE_BYTES of them (BLOCK_B rows); that is what keeps float32 at B=64 from spilling.
# `python -m rnnfast.kernels.aot` reports registers, shared memory and spills for the plans this gives, and the
# compile tests check that the anchors' plans do not spill. Not measured on a GPU.
RESIDENT_BYTES = 160 * 1024
A_TILE_BYTES = 32 * 1024
MAX_CHUNKS = 4
STREAM_BLOCK_K = 32
NUM_WARPS = 8


@dataclass(frozen=True)
class KernelPlan:
    """How one kernel (forward or backward) of a layer is split over programs and launched."""

    schedule: str  # "persistent": one launch; "step": one launch per step
    block_b: int  # sequences per program
    block_h: int  # hidden units per program (all their gates)
    block_k: int  # K tile of the recurrent product (a resident chunk, or the streaming tile)
    nk: int  # resident chunks of the recurrent weight slice; 0: it streams from L2 every step
    block_i: int = 0  # K tile of the fused input product (forward only)
    num_warps: int = NUM_WARPS

    @property
    def w_resident(self) -> bool:
        return self.nk > 0

    def grid(self, B: int, H: int, dirs: int = 1) -> tuple[int, int, int]:
        return triton.cdiv(B, self.block_b), triton.cdiv(H, self.block_h), dirs

    def needs_sync(self, H: int) -> bool:
        """Several programs share a batch tile inside one launch: they wait for each other every step."""
        return self.schedule == "persistent" and triton.cdiv(H, self.block_h) > 1

    def k_pad(self, K: int) -> int:
        """Rows of the packed recurrent operand: the resident chunks, or K rounded up to the streaming tile."""
        return self.nk * self.block_k if self.nk else triton.cdiv(K, self.block_k) * self.block_k

    def describe(self) -> str:
        k = f"k{self.block_k}x{self.nk} resident" if self.nk else f"k{self.block_k} streamed"
        return f"{self.schedule} b{self.block_b} h{self.block_h} {k} w{self.num_warps}"


@dataclass(frozen=True)
class Plan:
    """The forward and backward kernel plans of a layer."""

    forward: KernelPlan
    backward: KernelPlan

    @property
    def schedule(self) -> str:
        return self.forward.schedule

    def needs_sync(self, H: int) -> bool:
        return self.forward.needs_sync(H) or self.backward.needs_sync(H)


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    # tl.dot needs every tile dimension to be a power of two and at least 16.
    p = max(lo, triton.next_power_of_2(max(n, 1)))
    return min(p, hi) if hi is not None else p


def gate_slots(cell: str) -> int:
    """Columns per hidden unit of the packed forward operand: the gate count rounded up to a power of two."""
    return 1 if GATES[cell] == 1 else 4


def _chunks(K: int, n_cols: int, rows: int, esize: int, block_k: int | None) -> tuple[int, int]:
    """(block_k, nk) of a recurrent operand with K rows: resident in the fewest padded rows if it fits the budget
    (chunks of at most A_TILE_BYTES of operand rows), else streamed (nk = 0)."""
    max_bk = max(16, A_TILE_BYTES // (rows * esize))
    if block_k is None:
        best = None
        for nk in range(1, MAX_CHUNKS + 1):
            bk = _pow2(triton.cdiv(K, nk))
            if bk <= max_bk and bk * nk * n_cols * esize <= RESIDENT_BYTES and (
                    best is None or bk * nk < best[0] * best[1]):
                best = (bk, nk)
        return best if best is not None else (min(_pow2(K), STREAM_BLOCK_K), 0)
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    nk = triton.cdiv(K, block_k)
    return (block_k, nk) if nk <= MAX_CHUNKS and nk * block_k * n_cols * esize <= RESIDENT_BYTES else (block_k, 0)


def _num_warps(block_b: int, n_cols: int) -> int:
    """One warp per 16 x 8 tile of the product, 4 to 8: more would repeat the same MMA (M = 16 has one row of
    tiles), fewer would leave too few threads to load a step's operand rows."""
    return max(4, min(NUM_WARPS, (block_b // 16) * (n_cols // 8)))


@dataclass(frozen=True)
class Device:
    """What planning needs to know of a GPU: its multiprocessors and their limits."""

    sms: int
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    smem_per_sm: int = 233472  # bytes, H100/H200 (228 KB; 1 KB of it reserved per block)
    blocks_per_sm: int = 32
    arch: int = 90

    @classmethod
    def of(cls, device: torch.device) -> "Device":
        p = torch.cuda.get_device_properties(device)
        return cls(p.multi_processor_count, getattr(p, "regs_per_multiprocessor", 65536),
                   getattr(p, "max_threads_per_multi_processor", 2048),
                   getattr(p, "shared_memory_per_multiprocessor", 233472), 32, p.major * 10 + p.minor)


H200 = Device(132)


def occupancy(registers: int, shared: int, num_warps: int, dev: Device) -> int:
    """Programs of a compiled kernel that one multiprocessor holds at once: the least of what its registers (per
    warp, in units of 256), shared memory (plus the 1 KB per block the driver reserves), threads and block slots
    allow."""
    regs_per_warp = triton.cdiv(max(registers, 1) * 32, 256) * 256
    by_regs = (dev.regs_per_sm // regs_per_warp) // num_warps
    by_smem = dev.smem_per_sm // (shared + 1024)
    by_threads = dev.threads_per_sm // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, dev.blocks_per_sm))


def _candidates(kind, H, min_bh, resident, kernel_plan):
    """Every persistent plan worth pricing: each slice size, its weights resident (where they fit) or streamed."""
    out = []
    for bh in (1, 2, 4, 8, 16, 32, 64, 128):
        if min_bh <= bh <= max(min_bh, _pow2(H, lo=1)):
            for res in ((None, False) if resident is None else (resident,)):
                kp = kernel_plan(kind, bh, "persistent", res)
                if kp not in out:
                    out.append(kp)
    return out


def _fits(kp: KernelPlan, kind: str, H: int, others: int, target: "Device", resources) -> bool:
    """All programs of a persistent plan can be resident at once (trivially when none waits for another)."""
    if not kp.needs_sync(H):
        return True
    if resources is None:
        per_sm = 1
    else:
        regs, shared, *spill = resources(kind, kp)
        if spill and spill[0]:
            return False  # a plan whose kernel spills registers to local memory is never worth running
        per_sm = occupancy(regs, shared, kp.num_warps, target)
    return others * triton.cdiv(H, kp.block_h) <= per_sm * target.sms


def _step_slice(H: int, others: int, min_bh: int, sms: int) -> int:
    """Hidden units per program of the per-step schedule (no co-residency needed): the largest slice whose grid
    (``others`` programs per slice) still fills every multiprocessor, else the smallest."""
    cands = [bh for bh in (1, 2, 4, 8, 16, 32, 64, 128) if min_bh <= bh <= max(min_bh, _pow2(H, lo=1))]
    full = [bh for bh in cands if others * triton.cdiv(H, bh) >= sms]
    return max(full) if full else min(cands)


def make_plan(cell: str, device: torch.device, B: int, I: int, H: int, *, dtype: torch.dtype = torch.float32,
              dirs: int = 1, fused: bool = False, schedule: str | None = None, block_b: int | None = None,
              block_h: int | None = None, block_k: int | None = None, block_i: int | None = None,
              sm_count: int | None = None,
              resident: bool | None = None, target: Device | None = None, resources=None) -> Plan:
    """Choose tiles and schedule for the forward and backward kernels; explicit arguments are honoured or refused
    with the reason.

    The persistent schedule's grid is sized from the compiled kernel's occupancy: ``resources(kind, kplan)`` gives
    ``(registers, shared bytes[, spilled bytes])`` of the kernel that plan compiles to (on a GPU, the JIT's own compile; for a GPU
    target from a machine without one, :mod:`rnnfast.kernels.aot`). ``target`` (or ``sm_count``) stands in for the
    device; without ``resources`` there, one program per multiprocessor is assumed, which always fits. A plan that
    cannot be co-resident runs the per-step schedule, or is refused when ``schedule="persistent"`` was asked for.
    ``fused`` is the forward's input mode, whose kernel (and so occupancy) differs. Among the plans that fit (and do not spill), the per-step cost model (:mod:`rnnfast.kernels.cost`) picks.
    ``resident=False`` streams the recurrent weights even where they would fit on chip. An explicit ``block_h`` is
    the forward's slice; the backward's is at least 16, its dot's narrowest N.
    """
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    for name, v in (("block_b", block_b), ("block_h", block_h), ("block_i", block_i)):
        if v is not None and (v < 1 or v & (v - 1)):
            raise ValueError(f"{name} must be a power of two, got {v}")
    if target is None and sm_count is not None:
        target = Device(sm_count)
    if target is None and device.type == "cuda" and not INTERPRETED:
        target = Device.of(device)
        if resources is None:
            resources = _jit_resources(cell, dtype, device, B, I, H, dirs, fused)
    esize = torch.empty((), dtype=dtype).element_size()
    NG, NGP = GATES[cell], gate_slots(cell)
    block_b = _pow2(B, hi=64) if block_b is None else block_b
    if block_b < 16:
        raise ValueError(f"block_b must be at least 16 (a tl.dot tile), got {block_b}")
    n_bt = triton.cdiv(B, block_b)
    block_i = block_i or _pow2(I, hi=64)
    if block_i < 16:
        raise ValueError(f"block_i must be at least 16 (a tl.dot tile), got {block_i}")

    def kernel_plan(kind: str, bh: int, sched: str, res: bool | None = resident) -> KernelPlan:
        n_cols, K = (NGP * bh, H) if kind == "forward" else (bh, NG * H)
        bk, nk = _chunks(K, n_cols, block_b, esize, block_k)
        if res is False and nk:
            bk, nk = block_k or min(_pow2(K), STREAM_BLOCK_K), 0
        return KernelPlan(sched, block_b, bh, bk, nk, block_i if kind == "forward" else 0,
                          _num_warps(block_b, n_cols))

    def choose(kind: str) -> KernelPlan:
        # tl.dot's N is NGP * block_h forward and block_h backward: at least 16.
        min_bh = 16 // NGP if kind == "forward" else 16
        if block_h is not None:
            if kind == "backward":
                bh = max(block_h, min_bh)  # the backward's dot has N = block_h: a narrower forward slice widens
            elif block_h < min_bh:
                raise ValueError(f"block_h must be at least {min_bh} for the {cell} {kind} kernel (a tl.dot needs "
                                 f"16 columns), got {block_h}")
            else:
                bh = block_h
        elif target is None:
            # One program per batch tile and direction: the interpreter runs it without a grid barrier.
            bh = max(min_bh, _pow2(H, lo=1))
        else:
            # In the order the per-step cost model (rnnfast.kernels.cost) predicts them, the first that fits: each
            # check may compile a kernel, so the cheapest-looking ones are tried first.
            from ..kernels import cost
            ranked = [] if schedule == "step" else sorted(
                _candidates(kind, H, min_bh, resident, kernel_plan),
                key=lambda kp: cost.kernel_step(kind, kp, cell, dtype, B, I, H, target)["us"])
            for kp in ranked:
                if _fits(kp, kind, H, n_bt * dirs, target, resources):
                    return kp
            if schedule == "persistent":
                raise ValueError(f"no slice of the {cell} {kind} kernel lets all its programs be resident at "
                                 f"once on this GPU ({target.sms} multiprocessors); use schedule='step'")
            return kernel_plan(kind, _step_slice(H, n_bt * dirs, min_bh, target.sms), "step")
        sched = schedule or "persistent"
        kp = kernel_plan(kind, bh, sched)
        if sched == "persistent" and kp.needs_sync(H):
            if target is None:
                raise ValueError("the persistent schedule with several programs per batch tile waits on an "
                                 "in-kernel barrier, which the Triton interpreter (programs run one after another) "
                                 "cannot run; use schedule='step' or block_h >= hidden size")
            n = n_bt * dirs * triton.cdiv(H, bh)
            per_sm = 1 if resources is None else occupancy(*resources(kind, kp)[:2], kp.num_warps, target)
            if n > per_sm * target.sms:
                raise ValueError(f"the persistent schedule needs all {n} programs of the {kind} kernel resident at "
                                 f"once, but this GPU holds {per_sm * target.sms} of them; use schedule='step' or "
                                 f"larger tiles")
        return kp

    return Plan(choose("forward"), choose("backward"))


def _jit_resources(cell, dtype, device, B, I, H, dirs, fused):
    """``resources`` for :func:`make_plan` on this GPU: compile the kernel a plan gives, with the JIT's
    specialisation, for this GPU's architecture, and read its registers and shared memory."""
    from ..kernels import aot

    return aot.resources_for(cell, dtype, B, I, H, arch=Device.of(device).arch, dirs=dirs, fused=fused,
                             precision=_precision(dtype, device))


@functools.lru_cache(maxsize=256)
def _cached_plan(cell, device, B, I, H, dtype, dirs, fused, precision):
    # precision is part of the key: the TF32 switch changes the compiled kernel, and so its occupancy.
    return make_plan(cell, device, B, I, H, dtype=dtype, dirs=dirs, fused=fused)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    # TF32 for float32 under the switch torch.nn's RNNs obey (cuDNN's, on by default); IEEE fp32 otherwise.
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


# -- packed weights --------------------------------------------------------------------------------------------------

def _forward_slots(cell: str, which: str) -> list[int]:
    """The packed column slot of each gate of W_hh / W_ih (GRU keeps the two parts of n apart: slots 2 and 3)."""
    if cell == "gru":
        return [0, 1, 2] if which == "hh" else [0, 1, 3]
    return list(range(GATES[cell]))


def _pack_gates(w: torch.Tensor, slots: list[int], NGP: int, H: int, bh: int, k_pad: int) -> torch.Tensor:
    """``(NGP, n_slices, bh, k_pad)``: row ``g*H + u`` of ``w (NG*H, K)`` at ``[slots[g], u // bh, u % bh]``,
    zeros elsewhere."""
    NG, K = len(slots), w.shape[1]
    n_s = triton.cdiv(H, bh)
    out = w.new_zeros(NGP, n_s * bh, k_pad)
    out[slots, :H, :K] = w.view(NG, H, K)
    return out.view(NGP, n_s, bh, k_pad)


def pack_forward(cell: str, w: torch.Tensor, which: str, H: int, bh: int, k_pad: int) -> torch.Tensor:
    """A forward weight (``which``: "hh" or "ih") as the kernel's operand: ``(n_slices, k_pad, bh*NGP)``,
    column ``unit*NGP + slot``."""
    p = _pack_gates(w, _forward_slots(cell, which), gate_slots(cell), H, bh, k_pad)
    return p.permute(1, 3, 2, 0).reshape(p.shape[1], k_pad, bh * p.shape[0])


def pack_bias(cell: str, b_ih: torch.Tensor, b_hh: torch.Tensor, H: int, bh: int, ct: torch.dtype) -> torch.Tensor:
    """The folded biases in the packed column order, ``(n_slices*bh*NGP,)`` in the compute dtype: per gate
    ``b_ih + b_hh``, except GRU's n, whose ``b_hn`` (slot 2) stays with the hidden part that ``r`` multiplies."""
    NGP, n_s = gate_slots(cell), triton.cdiv(H, bh)
    b_ih, b_hh = b_ih.to(ct).view(-1, H), b_hh.to(ct).view(-1, H)
    out = b_ih.new_zeros(NGP, n_s * bh)
    if cell == "gru":
        out[[0, 1], :H] = b_ih[:2] + b_hh[:2]
        out[2, :H] = b_hh[2]
        out[3, :H] = b_ih[2]
    else:
        out[:GATES[cell], :H] = b_ih + b_hh
    return out.view(NGP, n_s, bh).permute(1, 2, 0).reshape(-1)


def pack_backward(w_hh: torch.Tensor, H: int, bh: int, k_pad: int) -> torch.Tensor:
    """W_hh as the backward's operand: ``(n_slices, k_pad, bh)``, the column slices of ``W_hh (NG*H, H)``."""
    n_s = triton.cdiv(H, bh)
    out = w_hh.new_zeros(k_pad, n_s * bh)
    out[:w_hh.shape[0], :H] = w_hh
    return out.view(k_pad, n_s, bh).permute(1, 0, 2).contiguous()


def _hoisted(cell, x, w_ihs, b_ihs, b_hhs, H, bh, ct) -> torch.Tensor:
    """The input part of every step and direction as one GEMM, ``(T, B, DIRS * n_slices*bh*NGP)`` in the compute
    dtype, columns in the packed order, biases folded in. Half types are multiplied with fp32 accumulation and
    rounded once, to fp32 (never to the layer dtype first)."""
    T, B, I = x.shape
    w = torch.cat([pack_forward(cell, wi, "ih", H, bh, I).permute(1, 0, 2).reshape(I, -1) for wi in w_ihs], 1)
    b = None
    if b_ihs is not None:
        b = torch.cat([pack_bias(cell, bi, bh_, H, bh, ct) for bi, bh_ in zip(b_ihs, b_hhs)])
    gx = widened_addmm(b, x.reshape(T * B, I), w, ct)
    return gx.view(T, B, -1)


# -- launches --------------------------------------------------------------------------------------------------------

@dataclass
class Launch:
    """One kernel's launch: the grid, the arguments, the compile-time arguments and launch options, and the steps
    (one launch for the persistent schedule, one per step otherwise)."""

    kernel: object
    grid: tuple
    args: tuple
    meta: dict
    T: int
    persistent: bool

    def step_args(self, s: int, n: int) -> tuple:
        return self.args + (s, n)

    def run(self):
        if self.persistent:
            self.kernel[self.grid](*self.step_args(0, self.T), **self.meta)
        else:
            for s in range(self.T):
                self.kernel[self.grid](*self.step_args(s, 1), **self.meta)


def launch_options(kplan: KernelPlan, H: int) -> dict:
    """``num_warps``, and a cooperative launch wherever programs wait for each other (the driver then refuses a grid
    that cannot be co-resident, loudly, where a plain launch could hang)."""
    return dict(num_warps=kplan.num_warps, **({"launch_cooperative_grid": True} if kplan.needs_sync(H) else {}))


def forward_meta(cell: str, kplan: KernelPlan, H: int, *, fused: bool, reverse: bool, dirs: int, has_len: bool,
                 has_bias: bool, precision: str) -> dict:
    return dict(CELL=layer.CELL_IDS[cell], NGP=gate_slots(cell), GW=gate_planes(cell), FUSED=bool(fused),
                REVERSE=bool(reverse), DIRS=dirs, HAS_LEN=bool(has_len), HAS_BIAS=bool(has_bias),
                BLOCK_B=kplan.block_b, BLOCK_H=kplan.block_h, BLOCK_K=kplan.block_k, NK=kplan.nk,
                BLOCK_I=kplan.block_i, PERSISTENT=kplan.schedule == "persistent", SYNC=kplan.needs_sync(H),
                PRECISION=precision, **launch_options(kplan, H))


def backward_meta(cell: str, kplan: KernelPlan, H: int, *, reverse: bool, dirs: int, has_len: bool,
                  precision: str) -> dict:
    return dict(CELL=layer.CELL_IDS[cell], NG=GATES[cell], GW=gate_planes(cell), REVERSE=bool(reverse), DIRS=dirs,
                HAS_LEN=bool(has_len), BLOCK_B=kplan.block_b, BLOCK_H=kplan.block_h, BLOCK_K=kplan.block_k,
                NK=kplan.nk, PERSISTENT=kplan.schedule == "persistent", SYNC=kplan.needs_sync(H),
                PRECISION=precision, **launch_options(kplan, H))


@dataclass
class ForwardState:
    """What the forward allocates: its outputs, the workspace, and what its launch reads."""

    y: torch.Tensor
    h_n: torch.Tensor
    c_n: torch.Tensor | None
    ws: torch.Tensor
    launch: Launch | None


def forward_launch(cell, x, h0, c0, w_ihs, w_hhs, b_ihs, b_hhs, lengths, reverse, *, fused: bool,
                   plan: Plan | None = None) -> ForwardState:
    """Allocate and prepare the forward of ``DIRS = len(w_hhs)`` directions (direction 1 reversed when there are
    two): ``h0``, ``c0`` are ``(DIRS, B, H)``; ``y`` comes out ``(T, B, DIRS*H)``. Nothing runs on the GPU but
    the packing and the hoisted GEMM."""
    T, B, I = x.shape
    D = len(w_hhs)
    H = w_hhs[0].shape[1]
    dt, ct, dev = x.dtype, compute_dtype(x.dtype), x.device
    precision = _precision(dt, dev)
    plan = plan or _cached_plan(cell, dev, B, I, H, dt, D, bool(fused), precision)
    kp = plan.forward
    y = torch.empty(T, B, D * H, dtype=dt, device=dev)
    h_n = torch.empty(D, B, H, dtype=dt, device=dev)
    c_n = torch.empty(D, B, H, dtype=dt, device=dev) if cell == "lstm" else None
    ws = torch.empty(workspace_bytes(cell, D, T, B, H, dt), dtype=torch.uint8, device=dev)
    if B == 0:
        return ForwardState(y, h_n, c_n, ws, None)
    gates, hs, cs = split_workspace(cell, ws, D, T, B, H, dt)
    zero_gaps(cell, ws, D, T, B, H, dt)
    for d in range(D):
        t0 = T - 1 if (reverse or d == 1) else 0
        hs[d, t0].copy_(h0[d])
        if cs is not None:
            cs[d, t0].copy_(c0[d])
    carry_h = h0.to(ct, copy=True).contiguous()
    carry_c = c0.to(ct, copy=True).contiguous() if cell == "lstm" else carry_h
    k_pad = kp.k_pad(H)
    wh = torch.stack([pack_forward(cell, w, "hh", H, kp.block_h, k_pad) for w in w_hhs])
    has_bias = b_ihs is not None
    x = x.contiguous()
    if fused:
        i_pad = triton.cdiv(I, kp.block_i) * kp.block_i
        wi = torch.stack([pack_forward(cell, w, "ih", H, kp.block_h, i_pad) for w in w_ihs])
        b = (torch.cat([pack_bias(cell, bi, bhh, H, kp.block_h, ct) for bi, bhh in zip(b_ihs, b_hhs)])
             if has_bias else carry_h)
        gx = carry_h  # placeholder pointer
    else:
        i_pad = 0
        wi = wh  # placeholder pointer
        b = carry_h
        gx = _hoisted(cell, x, w_ihs, b_ihs, b_hhs, H, kp.block_h, ct)
    sync = torch.zeros(D * kp.grid(B, H)[0], dtype=torch.int32, device=dev)
    args = (x, gx, wi, wh, b, carry_h if lengths is None else lengths, hs, carry_c if cs is None else cs, gates, y,
            h_n, carry_c if c_n is None else c_n, carry_h, carry_c, sync, T, B, I, H, k_pad, i_pad)
    meta = forward_meta(cell, kp, H, fused=fused, reverse=reverse and D == 1, dirs=D, has_len=lengths is not None,
                        has_bias=has_bias, precision=precision)
    return ForwardState(y, h_n, c_n, ws, Launch(layer.layer_forward_kernel, kp.grid(B, H, D), args, meta, T,
                                                 kp.schedule == "persistent"))


def _on(dev):
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def forward_directions(cell, x, h0, c0, w_ihs, w_hhs, b_ihs, b_hhs, lengths, reverse, *, fused: bool,
                       plan: Plan | None = None):
    """Run :func:`forward_launch`'s forward. Returns ``(y (T, B, DIRS*H), h_n, c_n (DIRS, B, H), workspace)``."""
    st = forward_launch(cell, x, h0, c0, w_ihs, w_hhs, b_ihs, b_hhs, lengths, reverse, fused=fused, plan=plan)
    if st.launch is not None:
        with _on(x.device):
            st.launch.run()
    return st.y, st.h_n, st.c_n, st.ws


def forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, *, fused: bool, plan: Plan | None = None):
    """One direction. Returns ``(y, h_n, c_n, workspace)`` as :meth:`rnnfast.backends.Backend.forward`."""
    bias = None if b_ih is None else ([b_ih], [b_hh])
    y, h_n, c_n, ws = forward_directions(cell, x, h0[None], None if c0 is None else c0[None], [w_ih], [w_hh],
                                         *(bias or (None, None)), lengths, reverse, fused=fused, plan=plan)
    return y, h_n[0], (c_n[0] if c_n is not None else None), ws


def backward_launch(cell, grad_y, grad_h_n, grad_c_n, x, w_hhs, lengths, reverse, ws, *, plan: Plan | None = None):
    """Allocate and prepare the backward's recurrent kernel for ``DIRS = len(w_hhs)`` directions. Returns
    ``(launch or None, d_in, d_hid, dh, dc, (gates, hs, cs))``."""
    T, B, I = x.shape
    D = len(w_hhs)
    H = w_hhs[0].shape[1]
    NG = GATES[cell]
    dt, ct, dev = x.dtype, compute_dtype(x.dtype), x.device
    # The backward's plan does not depend on the forward's input mode.
    plan = plan or _cached_plan(cell, dev, B, I, H, dt, D, False, _precision(dt, dev))
    kp = plan.backward
    gates, hs, cs = split_workspace(cell, ws, D, T, B, H, dt)
    d_in = torch.empty(D, T, B, NG * H, dtype=dt, device=dev)
    d_hid = torch.empty_like(d_in) if cell == "gru" else d_in
    dh = grad_h_n.to(ct).contiguous().clone()
    dc = grad_c_n.to(ct).contiguous().clone() if cell == "lstm" else None
    launch = None
    if B > 0:
        k_pad = kp.k_pad(NG * H)
        wt = torch.stack([pack_backward(w, H, kp.block_h, k_pad) for w in w_hhs])
        sync = torch.zeros(D * kp.grid(B, H)[0], dtype=torch.int32, device=dev)
        args = (grad_y.contiguous(), wt, dh if lengths is None else lengths, hs, dh if cs is None else cs, gates,
                d_in, d_hid, dh, dh if dc is None else dc, sync, T, B, H, k_pad)
        meta = backward_meta(cell, kp, H, reverse=reverse and D == 1, dirs=D, has_len=lengths is not None,
                             precision=_precision(dt, dev))
        launch = Launch(layer.layer_backward_kernel, kp.grid(B, H, D), args, meta, T, kp.schedule == "persistent")
    return launch, d_in, d_hid, dh, dc, (gates, hs, cs)


def backward_directions(cell, grad_y, grad_h_n, grad_c_n, x, w_ihs, w_hhs, has_bias, lengths, reverse, ws, *,
                        plan: Plan | None = None):
    """Gradients ``(dx, dh0, dc0 (DIRS, B, H), [(dw_ih, dw_hh, db_ih, db_hh)] per direction)``."""
    T = x.shape[0]
    ct = compute_dtype(x.dtype)
    launch, d_in, d_hid, dh, dc, (_, hs, _) = backward_launch(cell, grad_y, grad_h_n, grad_c_n, x, w_hhs, lengths,
                                                              reverse, ws, plan=plan)
    if launch is not None:
        with _on(x.device):
            launch.run()
    dx, dh0, weights = None, [], []
    for d, (w_ih, w_hh) in enumerate(zip(w_ihs, w_hhs)):
        # The last forward step's gate gradients still have to pass through W_hh to reach h0.
        t_first = T - 1 if (reverse or d == 1) else 0
        dh0.append(dh[d] + d_hid[d, t_first].to(ct) @ w_hh.to(ct))
        dx_d, dw_ih, dw_hh, db_ih, db_hh = input_and_weight_grads(d_in[d], d_hid[d], x, w_ih, hs[d], has_bias)
        dx = dx_d if dx is None else dx + dx_d
        weights.append((dw_ih, dw_hh, db_ih, db_hh))
    return dx, torch.stack(dh0).to(x.dtype), (dc.to(x.dtype) if dc is not None else None), weights


def backward(cell, grad_y, grad_h_n, grad_c_n, x, w_ih, w_hh, b_ih, lengths, reverse, ws, *,
             plan: Plan | None = None):
    """Gradients ``(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh)`` of one direction from the forward's workspace."""
    dx, dh0, dc0, [(dw_ih, dw_hh, db_ih, db_hh)] = backward_directions(
        cell, grad_y, grad_h_n[None], None if grad_c_n is None else grad_c_n[None], x, [w_ih], [w_hh],
        b_ih is not None, lengths, reverse, ws, plan=plan)
    return dx, dh0[0], (dc0[0] if dc0 is not None else None), dw_ih, dw_hh, db_ih, db_hh


class TritonBackend(KernelBackend):
    """Whole-sequence Triton kernels; see :mod:`rnnfast.kernels.layer` for the work split and schedules."""

    name = "triton"
    cpu_mode = INTERPRETED
    cpu_mode_name = "the Triton interpreter (TRITON_INTERPRET)"

    def unavailable(self, spec):
        reason = kernel_layer_problem(spec, SUPPORTED_DTYPES, "program")
        if reason is not None:
            return reason
        if INTERPRETED:
            if spec.device.type != "cpu":
                return (f"TRITON_INTERPRET is set, so the kernels run on CPU tensors only (got {spec.device}); "
                        "unset it before importing rnnfast to run them on the GPU")
            if spec.dtype == torch.bfloat16:
                return "the Triton interpreter computes bfloat16 dot products wrongly; bfloat16 runs on the GPU"
            return None
        if spec.device.type != "cuda":
            return (f"Triton kernels need CUDA tensors, got {spec.device} (set TRITON_INTERPRET=1 before importing "
                    "rnnfast to run them on the CPU, slowly, for testing)")
        if torch.cuda.get_device_capability(spec.device) < (8, 0):
            return "the kernels need a GPU of compute capability 8.0 (Ampere) or newer"
        return None

    def forward(self, inputs):
        a = inputs
        y, h_n, c_n, ws = forward(a.cell, a.x, a.h0, a.c0, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.lengths, a.reverse,
                                  fused=self.mode == "fused")
        return LayerOutputs(y, h_n, c_n, ws)

    def backward(self, inputs, outputs, grads):
        a = inputs
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = backward(a.cell, grads.y, grads.h_n, grads.c_n, a.x, a.w_ih,
                                                            a.w_hh, a.b_ih, a.lengths, a.reverse, outputs.workspace)
        return LayerGrads(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None)


register(TritonBackend())
