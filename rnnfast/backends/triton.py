"""The ``triton`` backend: the host side of the kernels in :mod:`rnnfast.kernels.layer` (plans, launchers) and its
registration.

Modes (``backend="triton:<mode>"``): ``hoisted`` (default) computes ``x @ W_ih^T`` for all steps as one GEMM before
the recurrent kernel; ``fused`` multiplies ``x_t`` by ``W_ih`` inside each step.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton

from ..kernels import layer
from ..reference import GATES, compute_dtype
from ..workspace import (fold_biases, gate_planes, hoisted_input, input_and_weight_grads, split_workspace,
                         workspace_numel)
from . import KernelBackend, LayerGrads, LayerOutputs, kernel_layer_problem, register

# triton.jit picks the interpreter when the module is imported, so this is fixed for the process.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SCHEDULES = ("persistent", "step")
# Tile limits from the compiler's register report for sm_90 (`python -m rnnfast.kernels.aot`), not from timings:
# with 8 warps and 32-deep K tiles the forward and backward kernels of every cell fit in registers without
# spilling for batch tiles up to 64; a W_hh slice kept in registers for the whole sequence (every gate, K <= 128)
# fits only beside a 16-row batch tile. Speed is not measured on a GPU yet.
RESIDENT_MAX_K = 128
RESIDENT_MAX_BLOCK_B = 16
STREAM_BLOCK_K = 32
NUM_WARPS = 8


@dataclass(frozen=True)
class Plan:
    """How a layer is split over programs and launched."""

    schedule: str  # "persistent": one launch; "step": one launch per step
    block_b: int  # sequences per program
    block_h: int  # hidden units per program (all their gates)
    block_k: int  # K tile of the recurrent product
    block_i: int  # K tile of the fused input product
    w_resident: bool  # W_hh slice loaded once and kept for every step
    num_warps: int = NUM_WARPS

    def grid(self, B: int, H: int) -> tuple[int, int]:
        return triton.cdiv(B, self.block_b), triton.cdiv(H, self.block_h)

    def needs_sync(self, H: int) -> bool:
        """Several programs share a batch tile inside one launch: they wait for each other every step."""
        return self.schedule == "persistent" and triton.cdiv(H, self.block_h) > 1


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    # tl.dot needs every tile dimension to be a power of two and at least 16.
    p = max(lo, triton.next_power_of_2(max(n, 1)))
    return min(p, hi) if hi is not None else p


def _resident_program_limit(device: torch.device) -> int | None:
    """How many programs of the persistent schedule can be resident at once (None: no limit, the interpreter)."""
    if device.type != "cuda":
        return None
    # One program per multiprocessor is always resident whatever the kernel's registers and shared memory.
    return torch.cuda.get_device_properties(device).multi_processor_count


def make_plan(cell: str, device: torch.device, B: int, I: int, H: int, *, schedule: str | None = None,
              block_b: int | None = None, block_h: int | None = None, block_k: int | None = None,
              block_i: int | None = None, sm_count: int | None = None) -> Plan:
    """Choose tiles and schedule; explicit arguments are honoured or refused with the reason.

    ``sm_count`` stands in for the device's multiprocessor count (to plan for a GPU from a machine without one).
    """
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    block_b = _pow2(B, hi=64) if block_b is None else block_b
    n_bt = triton.cdiv(B, block_b)
    limit = sm_count if sm_count is not None else _resident_program_limit(device)
    if block_h is None:
        if limit is None:
            block_h = _pow2(H)  # one program per batch tile: the interpreter runs it without a grid barrier
        else:
            # The most programs (smallest slice) that can all be resident; else the per-step schedule, whose
            # programs need not be resident together.
            fitting = [bh for bh in (16, 32, 64, 128) if n_bt * triton.cdiv(H, bh) <= limit]
            if fitting and schedule != "step":
                block_h, schedule = fitting[0], schedule or "persistent"
            else:
                block_h, schedule = 16, schedule or "step"
    schedule = schedule or "persistent"
    K_full = _pow2(H)
    w_resident = (block_k in (None, K_full) and K_full <= RESIDENT_MAX_K and block_b <= RESIDENT_MAX_BLOCK_B
                  and block_h <= 16)
    block_k = K_full if w_resident else (block_k or min(K_full, STREAM_BLOCK_K))
    block_i = block_i or _pow2(I, hi=64)
    for name, v in (("block_b", block_b), ("block_h", block_h), ("block_k", block_k), ("block_i", block_i)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    n_programs = n_bt * triton.cdiv(H, block_h)
    if schedule == "persistent" and triton.cdiv(H, block_h) > 1:
        if limit is None:
            raise ValueError("the persistent schedule with several programs per batch tile waits on an in-kernel "
                             "barrier, which the Triton interpreter (programs run one after another) cannot run; "
                             "use schedule='step' or block_h >= hidden size")
        if n_programs > limit:
            raise ValueError(f"the persistent schedule needs all {n_programs} programs resident at once, but this "
                             f"GPU holds {limit}; use schedule='step' or larger tiles")
    return Plan(schedule, block_b, block_h, block_k, block_i, w_resident)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    # float32 is exact IEEE unless the user allowed TF32 for matmuls the way torch does.
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def launch_options(plan: Plan, H: int) -> dict:
    """The launch options of a plan: ``num_warps``, and a cooperative launch wherever programs wait for each other
    (the driver then refuses a grid that cannot be co-resident, loudly, where a plain launch could hang)."""
    return dict(num_warps=plan.num_warps, **({"launch_cooperative_grid": True} if plan.needs_sync(H) else {}))


def forward_meta(cell: str, plan: Plan, H: int, *, fused: bool, reverse: bool, has_len: bool, has_bias: bool,
                 precision: str) -> dict:
    """The compile-time arguments of :func:`~rnnfast.kernels.layer.layer_forward_kernel` and its launch options."""
    return dict(CELL=layer.CELL_IDS[cell], NG=GATES[cell], GW=gate_planes(cell), FUSED=bool(fused),
                REVERSE=bool(reverse), HAS_LEN=bool(has_len), HAS_BIAS=bool(has_bias), BLOCK_B=plan.block_b,
                BLOCK_H=plan.block_h, BLOCK_K=plan.block_k, BLOCK_I=plan.block_i, W_RESIDENT=plan.w_resident,
                PERSISTENT=plan.schedule == "persistent", SYNC=plan.needs_sync(H), PRECISION=precision,
                **launch_options(plan, H))


def backward_meta(cell: str, plan: Plan, H: int, *, reverse: bool, has_len: bool, precision: str) -> dict:
    """The compile-time arguments of :func:`~rnnfast.kernels.layer.layer_backward_kernel` and its launch options."""
    return dict(CELL=layer.CELL_IDS[cell], NG=GATES[cell], GW=gate_planes(cell), REVERSE=bool(reverse),
                HAS_LEN=bool(has_len), BLOCK_B=plan.block_b, BLOCK_H=plan.block_h, BLOCK_K=plan.block_k,
                W_RESIDENT=plan.w_resident, PERSISTENT=plan.schedule == "persistent", SYNC=plan.needs_sync(H),
                PRECISION=precision, **launch_options(plan, H))


def _launch(kernel, grid, plan: Plan, T: int, steps_args, args, meta):
    if plan.schedule == "persistent":
        kernel[grid](*args, *steps_args(0, T), **meta)
    else:
        for s in range(T):
            kernel[grid](*args, *steps_args(s, 1), **meta)


def forward(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, *, fused: bool, plan: Plan | None = None):
    """Run the layer. Returns ``(y, h_n, c_n, workspace)`` as :meth:`rnnfast.backends.Backend.forward`."""
    T, B, I = x.shape
    H = w_hh.shape[1]
    dt, ct, dev = x.dtype, compute_dtype(x.dtype), x.device
    plan = plan or make_plan(cell, dev, B, I, H)
    precision = _precision(dt, dev)
    y = torch.empty(T, B, H, dtype=dt, device=dev)
    h_n = torch.empty(B, H, dtype=dt, device=dev)
    c_n = torch.empty(B, H, dtype=dt, device=dev) if cell == "lstm" else None
    ws = torch.empty(workspace_numel(cell, T, B, H), dtype=ct, device=dev)
    if B == 0:
        return y, h_n, c_n, ws
    gates, hs, cs = split_workspace(cell, ws, T, B, H)
    t0 = T - 1 if reverse else 0
    hs[t0].copy_(h0)
    if cs is not None:
        cs[t0].copy_(c0)
    x, w_ih, w_hh = x.contiguous(), w_ih.contiguous(), w_hh.contiguous()
    b, b_hn = fold_biases(cell, b_ih, b_hh, H, ct)
    gx = ws  # placeholder pointer when unused
    if not fused:
        gx = hoisted_input(x, w_ih, b, ct)
    sync = torch.zeros(plan.grid(B, H)[0], dtype=torch.int32, device=dev)
    args = (x, gx, w_ih, w_hh, ws if b is None else b, ws if b_hn is None else b_hn,
            ws if lengths is None else lengths, hs, ws if cs is None else cs, gates, y, h_n,
            ws if c_n is None else c_n, sync)
    meta = forward_meta(cell, plan, H, fused=fused, reverse=reverse, has_len=lengths is not None,
                        has_bias=b is not None, precision=precision)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _launch(layer.layer_forward_kernel, plan.grid(B, H), plan, T,
                lambda s, n: (T, B, I, H, s, n), args, meta)
    return y, h_n, c_n, ws


def backward(cell, grad_y, grad_h_n, grad_c_n, x, w_ih, w_hh, b_ih, lengths, reverse, ws, *,
             plan: Plan | None = None):
    """Gradients ``(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh)`` from the forward's workspace."""
    T, B, I = x.shape
    H = w_hh.shape[1]
    NG = GATES[cell]
    dt, ct, dev = x.dtype, compute_dtype(x.dtype), x.device
    plan = plan or make_plan(cell, dev, B, I, H)
    gates, hs, cs = split_workspace(cell, ws, T, B, H)
    d_in = torch.empty(T, B, NG * H, dtype=ct, device=dev)
    d_hid = torch.empty_like(d_in) if cell == "gru" else d_in
    dh = grad_h_n.to(ct).contiguous().clone()
    dc = grad_c_n.to(ct).contiguous().clone() if cell == "lstm" else None
    if B > 0:
        sync = torch.zeros(plan.grid(B, H)[0], dtype=torch.int32, device=dev)
        args = (grad_y.contiguous(), w_hh.contiguous(), ws if lengths is None else lengths, hs,
                ws if cs is None else cs, gates, d_in, d_hid, dh, ws if dc is None else dc, sync)
        meta = backward_meta(cell, plan, H, reverse=reverse, has_len=lengths is not None,
                             precision=_precision(dt, dev))
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            _launch(layer.layer_backward_kernel, plan.grid(B, H), plan, T, lambda r, n: (T, B, H, r, n), args, meta)
    # The last forward step's gate gradients still have to pass through W_hh to reach h0.
    t_first = T - 1 if reverse else 0
    dh0 = dh + d_hid[t_first] @ w_hh.to(ct)
    dx, dw_ih, dw_hh, db_ih, db_hh = input_and_weight_grads(d_in, d_hid, x, w_ih, hs, b_ih is not None)
    return dx, dh0.to(dt), (dc.to(dt) if dc is not None else None), dw_ih, dw_hh, db_ih, db_hh


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
