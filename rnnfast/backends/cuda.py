"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/``, built with ninja on first use (:mod:`rnnfast.build`).

Modes (``backend="cuda:<mode>"``): ``hoisted`` (default) computes ``x @ W_ih^T`` plus the biases for all steps as
one GEMM before the recurrent kernel; ``fused`` multiplies ``x_t`` by each unit's ``W_ih`` rows inside the step.

Per layer call: one persistent cooperative kernel runs the whole forward sequence (``<cell>_forward``), one runs
the backward recurrence in reverse time (``<cell>_backward_recurrent``), and the input, weight and bias gradients
are GEMMs over all steps here. Each block owns ``block_h`` hidden units with all their gates and keeps that slice
of ``W_hh`` in shared memory; the plan below picks ``block_h`` so that every block is resident at once (one per
multiprocessor), or refuses the layer when the slice does not fit.

float16/bfloat16 layers run the forward's recurrent product on tensor cores (WMMA) when the tiles fit shared memory
(:data:`TENSOR_CORES`); everything else is FMA arithmetic with fp32 (float64: fp64) accumulation and state.

Importing this module never compiles anything and never fails for want of nvcc or a GPU: :meth:`unavailable`
reports the reason instead.
"""

from __future__ import annotations

import threading

import torch

from ..reference import CELLS, GATES, compute_dtype
from ..workspace import fold_biases, hoisted_input, input_and_weight_grads, split_workspace, workspace_numel
from . import (BackendUnavailableError, KernelBackend, LayerGrads, LayerOutputs, constant_under_compile,
               kernel_layer_problem, register)

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The forward's recurrent product runs on tensor cores (WMMA) for these when its tiles fit shared memory; h_{t-1}
# is then rounded to the layer's dtype for the product, as cuDNN does. Set to False to use the FMA path, which
# keeps h in fp32 like the reference.
TENSOR_CORES = True
MMA_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
NAMESPACE = "rnnfast_cuda"  # the C++ ops' library (csrc/ops.cpp)

_lock = threading.Lock()
_loaded: str | None = None  # path of the loaded library
_load_error: str | None = None  # why building or loading failed, once it has


def _build():
    # Imported on use, not at import: `python -m rnnfast.build` must find rnnfast.build not yet imported.
    from .. import build

    return build


def _shared_memory_limit(props) -> int:
    # Per-block opt-in maximum; older torch does not expose it, and the SM's total less 1 KiB reserved per block
    # is the same number on Ampere and Hopper.
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    return limit or props.shared_memory_per_multiprocessor - 1024


@constant_under_compile
def _device_facts(index: int | None) -> tuple[int, int, int, int, str]:
    """``(multiprocessors, shared memory bytes per block, major, minor, name)`` of CUDA device ``index``.
    torch.compile calls this once, eagerly, and keeps the result instead of tracing into the CUDA runtime."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, _shared_memory_limit(props), props.major, props.minor, props.name


@constant_under_compile
def _gpu_problem(index: int | None) -> str | None:
    """None when CUDA device ``index`` can run the kernels, else why not (evaluated eagerly under torch.compile)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"
    _, _, major, minor, gpu = _device_facts(index)
    if (major, minor) < MIN_CAPABILITY:
        return (f"the kernels need a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer, "
                f"got {gpu} ({major}.{minor})")
    return None


_ITEMSIZE = {torch.float64: 8, torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def plan(cell: str, H: int, dtype: torch.dtype, device: torch.device) -> tuple[int, str | None]:
    """``(block_h, reason)``: hidden units per block so that there is at most one block per multiprocessor (all
    co-resident for the grid barrier), and None, or the reason the ``W_hh`` slice does not fit shared memory."""
    sms, limit, _, _, gpu = _device_facts(device.index)
    block_h = max(1, -(-H // sms))
    need = GATES[cell] * block_h * H * _ITEMSIZE[dtype]
    if need > limit:
        return block_h, (f"hidden size {H} is too large: each of the {sms} blocks, which must all be resident for "
                         f"the grid barrier, would keep a W_hh slice of {need} bytes in shared memory, more than the "
                         f"{limit} bytes {gpu} allows per block")
    return block_h, None


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


def use_tensor_cores(cell: str, B: int, H: int, dtype: torch.dtype, device: torch.device, block_h: int) -> bool:
    """Whether the forward's recurrent product goes to tensor cores: a half dtype, :data:`TENSOR_CORES`, and the
    padded W slice, h_{t-1} and fp32 product fitting shared memory (csrc/layer.cuh, forward_smem_bytes)."""
    if not TENSOR_CORES or dtype not in MMA_DTYPES:
        return False
    m, n, k_ld = _pad16(B), _pad16(GATES[cell] * block_h), _pad16(H) + 8
    need = _ITEMSIZE[dtype] * (n + m) * k_ld + 4 * m * n
    return need <= _device_facts(device.index)[1]


def _fakes(cell: str):
    """Fake (meta) kernels of one cell's C++ ops: shapes and dtypes only, for torch.compile and FakeTensor."""
    G = GATES[cell]

    def forward_fake(x, h0, c0, w_ih, w_hh, gx, bias, b_hn, lengths, reverse, block_h, tensor_cores):
        T, B = x.shape[0], x.shape[1]
        H = w_hh.shape[1]
        c_n = x.new_empty(B, H) if cell == "lstm" else x.new_empty(0)
        return (x.new_empty(T, B, H), x.new_empty(B, H), c_n,
                x.new_empty(workspace_numel(cell, T, B, H), dtype=compute_dtype(x.dtype)))

    def backward_fake(grad_y, grad_h_n, grad_c_n, w_hh, workspace, lengths, reverse, block_h):
        T, B, H = grad_y.shape
        ct = compute_dtype(grad_y.dtype)
        d_hid = grad_y.new_empty(T, B, G * H, dtype=ct) if cell == "gru" else grad_y.new_empty(0, dtype=ct)
        dc0 = grad_y.new_empty(B, H, dtype=ct) if cell == "lstm" else grad_y.new_empty(0, dtype=ct)
        return grad_y.new_empty(T, B, G * H, dtype=ct), d_hid, grad_y.new_empty(B, H, dtype=ct), dc0

    return forward_fake, backward_fake


def _register_fakes() -> None:
    for cell in CELLS:
        forward_fake, backward_fake = _fakes(cell)
        torch.library.register_fake(f"{NAMESPACE}::{cell}_forward", forward_fake)
        torch.library.register_fake(f"{NAMESPACE}::{cell}_backward_recurrent", backward_fake)

    def grid_barrier_fake(device_like, blocks, iters):
        return device_like.new_empty((), dtype=torch.int32)

    torch.library.register_fake(f"{NAMESPACE}::grid_barrier", grid_barrier_fake)


def load_library() -> str:
    """Build on first use and load the extension; the path of the library. Raises BackendUnavailableError with the
    reason when it cannot be built or loaded (and remembers it, so that :meth:`CudaBackend.unavailable` says so)."""
    global _loaded, _load_error
    with _lock:
        if _loaded is not None:
            return _loaded
        if _load_error is not None:
            raise BackendUnavailableError(f"rnnfast backend 'cuda' is not available: {_load_error}")
        try:
            path = _build().load()
            if not hasattr(torch.ops, NAMESPACE) or not hasattr(getattr(torch.ops, NAMESPACE), "lstm_forward"):
                raise RuntimeError(f"{path} loaded but did not register the {NAMESPACE} ops")
            _register_fakes()
        except Exception as exc:  # noqa: BLE001  (a compiler error, a missing library: the reason is the message)
            _load_error = f"building or loading the CUDA extension failed: {type(exc).__name__}: {exc}"
            raise BackendUnavailableError(f"rnnfast backend 'cuda' is not available: {_load_error}") from exc
        _loaded = path
        return path


@constant_under_compile
def _library_problem() -> str | None:
    """None once the extension is loaded; else builds and loads it (built on first use: the first layer that could
    run here builds it) and returns why that failed. torch.compile calls this eagerly instead of tracing it."""
    if _loaded is not None:
        return None
    problem = _build().toolchain_problem()
    if problem is not None:
        return problem
    try:
        load_library()
    except BackendUnavailableError:
        return _load_error
    return None


def _require_cuda(x: torch.Tensor) -> None:
    if x.device.type != "cuda":
        raise BackendUnavailableError(f"rnnfast backend 'cuda' needs CUDA tensors, got {x.device}")


def _block_h(cell: str, H: int, x: torch.Tensor) -> int:
    block_h, reason = plan(cell, H, x.dtype, x.device)
    if reason is not None:
        raise BackendUnavailableError(f"rnnfast backend 'cuda' cannot run this {cell} layer: {reason}")
    return block_h


def _op(name: str):
    return getattr(getattr(torch.ops, NAMESPACE), name)


def _lengths(lengths, x):
    return None if lengths is None else lengths.to(device=x.device, dtype=torch.int64).contiguous()


def measure_grid_barrier(blocks: int | None = None, iters: int = 10000, repeats: int = 5,
                         device: torch.device | str = "cuda") -> float:
    """Microseconds one cooperative grid barrier costs with ``blocks`` blocks of 256 threads (default: one per
    multiprocessor, as the layer kernels launch): the median over ``repeats`` launches of ``iters`` barriers,
    timed with CUDA events after a warm-up launch."""
    load_library()
    device = torch.device(device)
    blocks = blocks or torch.cuda.get_device_properties(device).multi_processor_count
    like = torch.empty(0, device=device)
    times = []
    with torch.cuda.device(device):  # the events must record on the stream the op launches on
        torch.ops.rnnfast_cuda.grid_barrier(like, blocks, 10)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            passed = torch.ops.rnnfast_cuda.grid_barrier(like, blocks, iters)
            end.record()
            end.synchronize()
            if int(passed) != iters:
                raise RuntimeError(f"grid_barrier passed {int(passed)} barriers, expected {iters}")
            times.append(start.elapsed_time(end) * 1000.0 / max(iters, 1))
    return sorted(times)[len(times) // 2]


class CudaBackend(KernelBackend):
    """Persistent CUDA C++ kernels; see the module docstring and ``csrc/layer.cuh`` for the work split."""

    name = "cuda"
    def unavailable(self, spec):
        reason = kernel_layer_problem(spec, SUPPORTED_DTYPES, "block")
        if reason is not None:
            return reason
        if spec.device.type != "cuda":
            return f"the CUDA kernels need CUDA tensors, got {spec.device}"
        reason = _gpu_problem(spec.device.index)
        if reason is not None:
            return reason
        _, reason = plan(spec.cell, spec.hidden_size, spec.dtype, spec.device)
        if reason is not None:
            return reason
        return _library_problem()

    def forward(self, inputs):
        a = inputs
        cell, x = a.cell, a.x
        _require_cuda(x)
        if a.w_hr is not None:
            raise BackendUnavailableError("rnnfast backend 'cuda' does not run LSTM with proj_size")
        load_library()
        T, B, I = x.shape
        H = a.w_hh.shape[1]
        ct = compute_dtype(x.dtype)
        x, h0, w_ih, w_hh = x.contiguous(), a.h0.contiguous(), a.w_ih.contiguous(), a.w_hh.contiguous()
        c0 = a.c0.contiguous() if cell == "lstm" else None
        bias, b_hn = fold_biases(cell, a.b_ih, a.b_hh, H, ct)
        gx = None
        if self.mode != "fused":
            gx = hoisted_input(x, w_ih, bias, ct)
            bias = None
        block_h = _block_h(cell, H, x)
        op = _op(f"{cell}_forward")
        y, h_n, c_n, ws = op(x, h0, c0, w_ih, w_hh, gx, bias, b_hn, _lengths(a.lengths, x), bool(a.reverse),
                             block_h, use_tensor_cores(cell, B, H, x.dtype, x.device, block_h))
        return LayerOutputs(y, h_n, (c_n if cell == "lstm" else None), ws)

    def backward(self, inputs, outputs, grads):
        a = inputs
        cell, x = a.cell, a.x
        _require_cuda(x)
        load_library()
        T, B = x.shape[0], x.shape[1]
        H = a.w_hh.shape[1]
        dt = x.dtype
        w_hh = a.w_hh.contiguous()
        op = _op(f"{cell}_backward_recurrent")
        d_in, d_hid, dh0, dc0 = op(grads.y.to(dt).contiguous(), grads.h_n.to(dt).contiguous(),
                                   grads.c_n.to(dt).contiguous() if cell == "lstm" else None, w_hh,
                                   outputs.workspace, _lengths(a.lengths, x), bool(a.reverse), _block_h(cell, H, x))
        if cell != "gru":
            d_hid = d_in  # the input and hidden parts of the pre-activation are the same sum
        _, hs, _ = split_workspace(cell, outputs.workspace, T, B, H)
        dx, dw_ih, dw_hh, db_ih, db_hh = input_and_weight_grads(d_in, d_hid, x, a.w_ih, hs, a.b_ih is not None)
        return LayerGrads(dx, dh0.to(dt), (dc0.to(dt) if cell == "lstm" else None), dw_ih, dw_hh, db_ih, db_hh,
                          None)


register(CudaBackend())
