"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/``, a library with a C ABI (``csrc/capi.h``) that is free of
torch, built with ninja on first use (:mod:`rnnfast.build`) and called here with ctypes on torch's current stream.

Modes (``backend="cuda:<mode>"``): ``hoisted`` (default) computes ``x @ W_ih^T`` plus the biases for all steps as
one GEMM before the recurrent kernel; ``fused`` multiplies ``x_t`` by each unit's ``W_ih`` rows inside the step.

Per layer call: one persistent cooperative kernel runs the whole forward sequence (``rnnfast_<cell>_forward_<dt>``),
one runs the backward recurrence in reverse time (``rnnfast_<cell>_backward_<dt>``), and the input, weight and bias
gradients are GEMMs over all steps here. Each block owns ``block_h`` hidden units with all their gates and keeps that
slice of ``W_hh`` in shared memory; :func:`plan` picks ``block_h`` so that every block is resident at once (one per
multiprocessor), or refuses the layer when the slice does not fit; the library checks co-residency again at launch
and refuses with the reason. Steps are separated by a split-phase barrier (:data:`STEP_BARRIER`).
:func:`forward_directions` / :func:`backward_directions` run both directions of a bidirectional layer in one launch
each, every direction on half the multiprocessors. Allocation, the GEMMs, validation and dispatch stay here, in
Python.

float16/bfloat16/float32 layers run the recurrent products of the forward (``h_{t-1} W_hh^T``) and of the backward
(``d_hid W_hh``) on tensor cores (mma.sync, K split over the warps, the batch in tiles of up to ``m_tile`` rows so
that the operands fit shared memory; :data:`TENSOR_CORES`): float32 in TF32 under ``torch.backends.cudnn.allow_tf32``,
the switch torch.nn's RNNs obey (on by default), else in 3xTF32, about float32's accuracy. float64, and whatever does
not fit, is FMA arithmetic with fp32 (float64: fp64) accumulation and state.

``RNNFAST_CUDA_EMULATE=1`` (read at import) runs the same kernel source on CPU tensors instead: the library built by
the host compiler against ``csrc/emulate.h``, every CUDA thread a fiber, for an emulated H100/H200 (132
multiprocessors, 227 KiB of shared memory per block). Correct, slow, and never chosen by ``auto``.

Importing this module never compiles anything and never fails for want of nvcc or a GPU: :meth:`unavailable`
reports the reason instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading

import torch

from ..reference import GATES, compute_dtype
from ..workspace import (fold_biases, hoisted_input, input_and_weight_grads, split_workspace, workspace_bytes,
                         zero_gaps)
from . import (BackendUnavailableError, KernelBackend, LayerGrads, LayerOutputs, constant_under_compile,
               kernel_layer_problem, register)

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The recurrent products run on tensor cores (mma.sync) for these when their tiles fit shared memory; their A operand
# (h_{t-1}, or the step's gate gradients) is then rounded to the layer's dtype for the product, as cuDNN does. Set to
# False to use the FMA path, which keeps it in fp32 like the reference.
TENSOR_CORES = True
MMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# At most this many batch rows per tensor-core product (a multiple of 16), or None: as many as shared memory holds.
# Tests lower it to exercise the batch tiling on small layers.
M_TILE_LIMIT: int | None = None
TF32, TF32X3 = 1, 3  # csrc/capi.h, tensor_cores: one TF32 pass, or three (3xTF32)
# TF32 on the emulation's CPU tensors too (under cudnn.allow_tf32): for the tests of the TF32 path only, since torch
# computes nothing on the CPU in TF32 and so the same-precision baseline there is IEEE float32.
EMULATE_TF32 = False
# The barrier between steps: "counter", split-phase on one counter (each block arrives with a release add once its
# stores are done, and waits by polling it with acquire loads); "flags", split-phase on one flag a block (a release
# store each, no atomic; the wait polls every flag, a thread each); "grid", the cooperative grid barrier
# (cooperative_groups grid.sync). All keep the cooperative launch, which is what guarantees co-residency. Not yet
# measured on a GPU against each other: python -m bench.barrier --cuda / --cuda-counter / --cuda-flags.
STEP_BARRIERS = ("counter", "flags", "grid")
STEP_BARRIER = "counter"
# Thread-block clusters (sm_90) of this many blocks share the tensor-core A operand's reads: each block loads its
# share of the tile from L2 once and stores it into every block of the cluster (distributed shared memory), cutting
# the L2 traffic of h (backward: of the gate gradients) by this factor. 1: no clusters. A plan switch, off until a GPU
# has measured it; needs a split-phase STEP_BARRIER (a cluster launch is not cooperative).
CLUSTER = 1
MIN_CAPABILITY = (8, 0)
ENV_EMULATE = "RNNFAST_CUDA_EMULATE"
EMULATED = os.environ.get(ENV_EMULATE, "0") not in ("", "0")
# The GPU the emulation stands for (csrc/primitives.cuh: kEmulatedSMs, kEmulatedSmemOptin).
EMULATED_DEVICE = (132, 232448, 9, 0, "CPU emulation of an sm_90 GPU")
ABI_VERSION = 4  # csrc/capi.h, RNNFAST_ABI_VERSION
_DTYPE_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
_STATUS = {1: "invalid argument", 2: "refused", 3: "CUDA error", 4: "emulation error"}
REFUSED = 2


class ForwardParams(ctypes.Structure):
    """``rnnfast_forward_params`` of csrc/capi.h, field for field."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("x", "gx", "w_ih", "w_hh", "bias", "b_hn", "lengths", "y", "h_n",
                                               "c_n", "gates", "hs", "cs", "hc", "cc", "sync")] + \
               [(n, ctypes.c_int64) for n in ("T", "B", "I", "H", "block_h", "m_tile")] + \
               [("reverse", ctypes.c_int32), ("tensor_cores", ctypes.c_int32), ("directions", ctypes.c_int32),
                ("sync_flags", ctypes.c_int32), ("cluster", ctypes.c_int32)]


class BackwardParams(ctypes.Structure):
    """``rnnfast_backward_params`` of csrc/capi.h, field for field."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("grad_y", "w_hh", "lengths", "gates", "hs", "cs", "d_in", "d_hid",
                                               "dh", "dc", "direct", "sync")] + \
               [(n, ctypes.c_int64) for n in ("T", "B", "H", "block_h", "m_tile")] + \
               [("reverse", ctypes.c_int32), ("tensor_cores", ctypes.c_int32), ("directions", ctypes.c_int32),
                ("sync_flags", ctypes.c_int32), ("cluster", ctypes.c_int32)]


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
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
    """``(multiprocessors, shared memory bytes per block, major, minor, name)`` of CUDA device ``index`` (of the
    emulated GPU under RNNFAST_CUDA_EMULATE). torch.compile calls this once, eagerly, and keeps the result."""
    if EMULATED:
        return EMULATED_DEVICE
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


def plan(cell: str, H: int, dtype: torch.dtype, device: torch.device, dirs: int = 1) -> tuple[int, str | None]:
    """``(block_h, reason)``: hidden units per block so that there is at most one block per multiprocessor (all
    co-resident for the grid barrier) for ``dirs`` directions in one launch (each on its share of the
    multiprocessors), and None, or the reason the ``W_hh`` slice does not fit shared memory."""
    sms, limit, _, _, gpu = _device_facts(device.index)
    return _plan(cell, H, dtype, sms, limit, gpu, dirs)


def _plan(cell: str, H: int, dtype: torch.dtype, sms: int, limit: int, gpu: str,
          dirs: int = 1) -> tuple[int, str | None]:
    blocks = sms // dirs // CLUSTER * CLUSTER  # a whole number of clusters a direction
    block_h = max(1, -(-H // blocks))
    need = GATES[cell] * block_h * H * _ITEMSIZE[dtype]
    if need > limit:
        return block_h, (f"hidden size {H} is too large: each of the {blocks} blocks{' a direction' * (dirs > 1)}, "
                         f"which must all be resident for the grid barrier, would keep a W_hh slice of {need} bytes "
                         f"in shared memory, more than the {limit} bytes {gpu} allows per block")
    return block_h, None


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


_WARPS = 8  # csrc/rnnfast.h: kThreads / 32


def mma_smem_bytes(itemsize: int, M: int, N: int, K: int) -> int:
    """csrc/layer.cuh, mma_smem_bytes: shared memory of the tensor-core product of an M-row batch tile by K x N, its
    K split across the warps (mma_splits), rows padded by 16 bytes. tests/test_cuda.py checks this against the
    library's own."""
    width = depth = 8 if itemsize == 4 else 16  # TF32 mma tiles are 16 x 8 x 8, the 16-bit types' 16 x 16 x 16
    m, n, k = _pad16(M), -(-N // width) * width, _pad16(K)
    tiles = (m // 16) * (n // width)
    splits = min(1 if tiles >= _WARPS else _WARPS // tiles, k // depth)
    return itemsize * (n + m) * (k + 16 // itemsize) + 4 * m * n * splits


def tensor_core_smem_bytes(kind: str, cell: str, B: int, H: int, block_h: int, itemsize: int = 2,
                           m_tile: int | None = None) -> int:
    """csrc/layer.cuh, forward_smem_bytes / backward_smem_bytes on tensor cores, for batch tiles of ``m_tile`` rows
    (default: the whole batch): the product's operands and partial sums, plus, forward, the two buffers of the
    prefetched input part, [2][B][G*block_h] fp32, and the units' own state, [planes][B][block_h] fp32 (h, and
    LSTM's c)."""
    G = GATES[cell]
    m_tile = min(m_tile or _pad16(B), _pad16(B))
    if kind == "forward":
        planes = 2 if cell == "lstm" else 1
        return mma_smem_bytes(itemsize, m_tile, G * block_h, H) + 8 * B * G * block_h + 4 * planes * B * block_h
    return mma_smem_bytes(itemsize, m_tile, block_h, G * H)


def tensor_core_mode(dtype: torch.dtype, device: torch.device) -> int:
    """csrc/capi.h's ``tensor_cores`` for a layer: 1 for the 16-bit types; float32 TF32 (1) on CUDA tensors under
    ``torch.backends.cudnn.allow_tf32``, the switch torch.nn's RNNs obey, else 3xTF32 (3); 0 (FMA) otherwise. The
    emulation's CPU tensors are never TF32, as torch computes none on the CPU (:data:`EMULATE_TF32` overrides)."""
    if not TENSOR_CORES or dtype not in MMA_DTYPES:
        return 0
    if dtype == torch.float32:
        tf32 = torch.backends.cudnn.allow_tf32 and (device.type == "cuda" or EMULATE_TF32)
        return TF32 if tf32 else TF32X3
    return 1


def _tensor_core_rows(kind: str, cell: str, B: int, H: int, itemsize: int, block_h: int, limit: int) -> int:
    top = _pad16(B) if M_TILE_LIMIT is None else min(_pad16(B), max(16, M_TILE_LIMIT // 16 * 16))
    for m_tile in range(top, 0, -16):
        if tensor_core_smem_bytes(kind, cell, B, H, block_h, itemsize, m_tile) <= limit:
            return m_tile
    return 0


def tensor_core_rows(cell: str, B: int, H: int, dtype: torch.dtype, device: torch.device, block_h: int,
                     kind: str = "forward") -> int:
    """Batch rows per tensor-core product of the ``kind`` kernel ("forward": h_{t-1} W_hh^T; "backward": d_hid W_hh):
    the largest multiple of 16 (up to the padded batch and :data:`M_TILE_LIMIT`) whose tiles fit shared memory, or 0
    when the product stays on FMA (float64, :data:`TENSOR_CORES` off, or not even 16 rows fit)."""
    if tensor_core_mode(dtype, device) == 0:
        return 0
    return _tensor_core_rows(kind, cell, B, H, _ITEMSIZE[dtype], block_h, _device_facts(device.index)[1])


def use_tensor_cores(cell: str, B: int, H: int, dtype: torch.dtype, device: torch.device, block_h: int,
                     kind: str = "forward") -> bool:
    """Whether the recurrent product of the ``kind`` kernel goes to tensor cores (:func:`tensor_core_rows`)."""
    return tensor_core_rows(cell, B, H, dtype, device, block_h, kind) > 0


# The anchors (cell, dtype, B, H): (a) LSTM bf16 B=16 H=768, (b) LSTM fp32 B=64 H=512, (c) GRU bf16 B=256
# H=1024.
ANCHORS = {"a": ("lstm", torch.bfloat16, 16, 768), "b": ("lstm", torch.float32, 64, 512),
           "c": ("gru", torch.bfloat16, 256, 1024)}
H100 = (132, 232448)  # multiprocessors, shared memory bytes a block (opt-in)


def anchor_plan(cell: str, dtype: torch.dtype, B: int, H: int, device=H100, cluster: int = 1) -> tuple[str, dict]:
    """What the backend does with a layer on a GPU of ``device = (multiprocessors, shared bytes a block)``: a line
    naming the blocks, units a block, and which recurrent products run on tensor cores (or the refusal), and the
    per-step cost model's prediction for it (:func:`rnnfast.kernels.cost.cuda_kernel_step`), ``{kind: {us, load,
    mma, epilogue, sync}}``, empty when the layer is refused; ``cluster``: with :data:`CLUSTER` that large (the
    plan's units a block as without; its blocks rounded up to whole clusters)."""
    from ..kernels import cost

    sms, limit = device
    block_h, reason = _plan(cell, H, dtype, sms, limit, "this GPU")
    if reason is not None:
        return f"refused: {reason}", {}
    line, predicted = [f"{-(-H // block_h)} blocks x {block_h} units"], {}
    # As a layer under torch's defaults runs: float32 in TF32 (cudnn.allow_tf32 is on by default).
    passes = 0 if dtype not in MMA_DTYPES else 1
    name = "TF32 mma.sync" if dtype == torch.float32 else "mma.sync"
    for kind in ("forward", "backward"):
        m_tile = _tensor_core_rows(kind, cell, B, H, _ITEMSIZE[dtype], block_h, limit) if passes else 0
        if m_tile:
            need = tensor_core_smem_bytes(kind, cell, B, H, block_h, _ITEMSIZE[dtype], m_tile)
            tiles = -(-_pad16(B) // m_tile)
            line.append(f"{kind} {name} ({need} B of shared memory"
                        + (f", {tiles} batch tiles of {m_tile} rows)" if tiles > 1 else ")"))
        else:
            line.append(f"{kind} FMA")
        predicted[kind] = cost.cuda_kernel_step(kind, cell, dtype, B, H, block_h, bool(m_tile), sms, m_tile=m_tile,
                                                cluster=cluster)
    return ", ".join(line), predicted


def _declare(lib: ctypes.CDLL) -> None:
    lib.rnnfast_abi_version.restype = ctypes.c_int
    lib.rnnfast_emulated.restype = ctypes.c_int
    lib.rnnfast_last_error.restype = ctypes.c_char_p
    lib.rnnfast_grid_barrier.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_int32, ctypes.c_void_p]
    lib.rnnfast_grid_barrier.restype = ctypes.c_int
    lib.rnnfast_forward_smem_bytes.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_int64] * 4
    lib.rnnfast_backward_smem_bytes.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_int64] * 4
    lib.rnnfast_forward_smem_bytes.restype = lib.rnnfast_backward_smem_bytes.restype = ctypes.c_size_t
    for cell in GATES:
        for suffix in _DTYPE_SUFFIX.values():
            fwd, bwd = getattr(lib, f"rnnfast_{cell}_forward_{suffix}"), getattr(lib, f"rnnfast_{cell}_backward_{suffix}")
            fwd.argtypes = [ctypes.POINTER(ForwardParams), ctypes.c_void_p]
            bwd.argtypes = [ctypes.POINTER(BackwardParams), ctypes.c_void_p]
            fwd.restype = bwd.restype = ctypes.c_int


def load_library() -> ctypes.CDLL:
    """Build on first use and load the library (the emulation's under RNNFAST_CUDA_EMULATE). Raises
    BackendUnavailableError with the reason when it cannot be built or loaded, and remembers it, so that
    :meth:`CudaBackend.unavailable` says so."""
    global _library, _loaded, _load_error
    with _lock:
        if _library is not None:
            return _library
        if _load_error is not None:
            raise BackendUnavailableError(f"rnnfast backend 'cuda' is not available: {_load_error}")
        try:
            path = _build().build(emulate=EMULATED)
            lib = ctypes.CDLL(path)
            _declare(lib)
            if lib.rnnfast_abi_version() != ABI_VERSION or lib.rnnfast_emulated() != int(EMULATED):
                raise RuntimeError(f"{path} has ABI {lib.rnnfast_abi_version()} (emulated: {lib.rnnfast_emulated()}),"
                                   f" expected {ABI_VERSION} (emulated: {int(EMULATED)})")
        except Exception as exc:  # noqa: BLE001  (a compiler error, a missing library: the reason is the message)
            _load_error = f"building or loading the CUDA library failed: {type(exc).__name__}: {exc}"
            raise BackendUnavailableError(f"rnnfast backend 'cuda' is not available: {_load_error}") from exc
        _library, _loaded = lib, path
        return lib


@constant_under_compile
def _library_problem() -> str | None:
    """None once the library is loaded; else builds and loads it (built on first use: the first layer that could
    run here builds it) and returns why that failed. torch.compile calls this eagerly instead of tracing it."""
    if _library is not None:
        return None
    build = _build()
    problem = build.emulation_problem() if EMULATED else build.toolchain_problem()
    if problem is not None:
        return problem
    try:
        load_library()
    except BackendUnavailableError:
        return _load_error
    return None


def _check(rc: int, what: str) -> None:
    """Raise the library's error: a refusal as BackendUnavailableError, anything else as RuntimeError."""
    if rc == 0:
        return
    message = (_library.rnnfast_last_error() or b"").decode(errors="replace")
    text = f"rnnfast backend 'cuda': {what}: {_STATUS.get(rc, f'status {rc}')}: {message}"
    raise (BackendUnavailableError if rc == REFUSED else RuntimeError)(text)


def _require_device(x: torch.Tensor) -> None:
    want = "cpu" if EMULATED else "cuda"
    if x.device.type != want:
        raise BackendUnavailableError(f"rnnfast backend 'cuda' needs {'CPU' if EMULATED else 'CUDA'} tensors"
                                      f"{' under RNNFAST_CUDA_EMULATE' if EMULATED else ''}, got {x.device}")


def _block_h(cell: str, H: int, x: torch.Tensor, dirs: int = 1) -> int:
    block_h, reason = plan(cell, H, x.dtype, x.device, dirs)
    if reason is not None:
        raise BackendUnavailableError(f"rnnfast backend 'cuda' cannot run this {cell} layer: {reason}")
    return block_h


def _tensor_core_fields(kind: str, cell: str, B: int, H: int, x: torch.Tensor, block_h: int) -> dict:
    m_tile = tensor_core_rows(cell, B, H, x.dtype, x.device, block_h, kind)
    return {"tensor_cores": tensor_core_mode(x.dtype, x.device) if m_tile else 0, "m_tile": m_tile}


def _launch_blocks(H: int, block_h: int) -> int:
    """Blocks a direction launches: one a block_h units, rounded up to whole clusters (:data:`CLUSTER`)."""
    return -(-(-(-H // block_h)) // CLUSTER) * CLUSTER


def _check_switches() -> None:
    """:data:`STEP_BARRIER` and :data:`CLUSTER` hold values the library takes, or ValueError says which they must."""
    if STEP_BARRIER not in STEP_BARRIERS:
        raise ValueError(f"rnnfast.backends.cuda.STEP_BARRIER must be one of {STEP_BARRIERS}, got {STEP_BARRIER!r}")
    if not isinstance(CLUSTER, int) or not 1 <= CLUSTER <= 16 or (CLUSTER > 1 and STEP_BARRIER == "grid"):
        raise ValueError(f"rnnfast.backends.cuda.CLUSTER must be 1 to 16 blocks, and clusters need a split-phase "
                         f"STEP_BARRIER (a cluster launch is not cooperative); got {CLUSTER!r} with {STEP_BARRIER!r}")


def _barrier_counter(device: torch.device, blocks: int) -> torch.Tensor | None:
    """The split-phase barrier's counter, or its flags, one for each of a direction's ``blocks`` blocks, zeroed for
    one launch (it counts from 0), or None for the cooperative grid barrier (:data:`STEP_BARRIER`)."""
    if STEP_BARRIER == "grid":
        return None
    return torch.zeros(blocks if STEP_BARRIER == "flags" else 1, dtype=torch.int32, device=device)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _stream(device: torch.device) -> int | None:
    return None if EMULATED else torch.cuda.current_stream(device).cuda_stream


def _lengths(lengths, x):
    return None if lengths is None else lengths.to(device=x.device, dtype=torch.int64).contiguous()


def measure_grid_barrier(blocks: int | None = None, iters: int = 10000, repeats: int = 5,
                         device: torch.device | str = "cuda", kind: str = "grid") -> float:
    """Microseconds one step barrier of ``kind`` (:data:`STEP_BARRIERS`; default the cooperative grid barrier)
    costs with ``blocks`` blocks of 256 threads (default: one per multiprocessor, as the layer kernels launch): the
    median over ``repeats`` launches of ``iters`` barriers, timed with CUDA events after a warm-up launch."""
    if kind not in STEP_BARRIERS:
        raise ValueError(f"kind must be one of {STEP_BARRIERS}, got {kind!r}")
    lib = load_library()
    device = torch.device(device)
    blocks = blocks or torch.cuda.get_device_properties(device).multi_processor_count
    passed = torch.zeros((), dtype=torch.int32, device=device)
    counter = torch.zeros(blocks, dtype=torch.int32, device=device)
    flag = kind != "grid"
    times = []

    def launch(n, stream):
        return lib.rnnfast_grid_barrier(blocks, n, passed.data_ptr(), counter.data_ptr() if flag else None,
                                        int(kind == "flags"), stream)

    with torch.cuda.device(device):  # the events must record on the stream the library launches on
        stream = _stream(device)
        counter.zero_()
        _check(launch(10, stream), "grid_barrier")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            counter.zero_()  # the split-phase barrier counts every arrival from 0
            start.record()
            _check(launch(iters, stream), "grid_barrier")
            end.record()
            end.synchronize()
            arrived = int(counter.sum()) if kind == "flags" else int(counter[0])
            want = {"grid": 0, "counter": blocks * iters, "flags": blocks * iters}[kind]
            if int(passed) != iters or arrived != want:
                raise RuntimeError(f"grid_barrier passed {int(passed)} barriers ({arrived} arrivals), expected "
                                   f"{iters} ({want})")
            times.append(start.elapsed_time(end) * 1000.0 / max(iters, 1))
    return sorted(times)[len(times) // 2]


class CudaBackend(KernelBackend):
    """Persistent CUDA C++ kernels; see the module docstring and ``csrc/layer.cuh`` for the work split."""

    name = "cuda"
    cpu_mode = EMULATED
    cpu_mode_name = "the CPU emulation (RNNFAST_CUDA_EMULATE)"

    def unavailable(self, spec):
        reason = kernel_layer_problem(spec, SUPPORTED_DTYPES, "block")
        if reason is not None:
            return reason
        if EMULATED:
            if spec.device.type != "cpu":
                return (f"RNNFAST_CUDA_EMULATE is set, so the kernels run emulated on CPU tensors only (got "
                        f"{spec.device}); unset it before importing rnnfast to run them on the GPU")
        elif spec.device.type != "cuda":
            return (f"the CUDA kernels need CUDA tensors, got {spec.device} (set RNNFAST_CUDA_EMULATE=1 before "
                    "importing rnnfast to run them on the CPU, slowly, for testing)")
        else:
            reason = _gpu_problem(spec.device.index)
            if reason is not None:
                return reason
        _, reason = plan(spec.cell, spec.hidden_size, spec.dtype, spec.device)
        if reason is not None:
            return reason
        return _library_problem()

    def forward(self, inputs):
        a = inputs
        _require_device(a.x)
        if a.w_hr is not None:
            raise BackendUnavailableError("rnnfast backend 'cuda' does not run LSTM with proj_size")
        bias = None if a.b_ih is None else ([a.b_ih], [a.b_hh])
        y, h_n, c_n, ws = forward_directions(a.cell, a.x, a.h0[None], None if a.c0 is None else a.c0[None], [a.w_ih],
                                             [a.w_hh], *(bias or (None, None)), a.lengths, a.reverse,
                                             fused=self.mode == "fused")
        return LayerOutputs(y, h_n[0], c_n[0] if c_n is not None else None, ws)

    def backward(self, inputs, outputs, grads):
        a = inputs
        _require_device(a.x)
        dx, dh0, dc0, [(dw_ih, dw_hh, db_ih, db_hh)] = backward_directions(
            a.cell, grads.y, grads.h_n[None], None if grads.c_n is None else grads.c_n[None], a.x, [a.w_ih],
            [a.w_hh], a.b_ih is not None, a.lengths, a.reverse, outputs.workspace)
        return LayerGrads(dx, dh0[0], dc0[0] if dc0 is not None else None, dw_ih, dw_hh, db_ih, db_hh, None)


def _on(dev: torch.device):
    return torch.cuda.device(dev) if not EMULATED else contextlib.nullcontext()


def forward_directions(cell, x, h0, c0, w_ihs, w_hhs, b_ihs, b_hhs, lengths, reverse, *, fused: bool, plan=None):
    """The forward of ``D = len(w_hhs)`` directions of a layer (D = 2: a bidirectional layer's, the second in
    reverse) in one launch of the library, each on its share of the multiprocessors. ``h0, c0``: ``(D, B, H)``;
    biases: lists or None. Returns ``(y (T, B, D*H), h_n, c_n (D, B, H) or None, workspace)``. ``plan`` is unused
    (the Triton backend's signature)."""
    del plan
    _require_device(x)
    _check_switches()
    lib = load_library()
    D = len(w_hhs)
    T, B, I = x.shape
    H = w_hhs[0].shape[1]
    dt, ct, dev = x.dtype, compute_dtype(x.dtype), x.device
    x = x.contiguous()
    block_h = _block_h(cell, H, x, D)
    ys = [torch.empty(T, B, H, dtype=dt, device=dev) for _ in range(D)]
    h_n = torch.empty(D, B, H, dtype=dt, device=dev)
    c_n = torch.empty(D, B, H, dtype=dt, device=dev) if cell == "lstm" else None
    ws = torch.empty(workspace_bytes(cell, D, T, B, H, dt), dtype=torch.uint8, device=dev)
    gates, hs, cs = split_workspace(cell, ws, D, T, B, H, dt)
    zero_gaps(cell, ws, D, T, B, H, dt)
    hc = h0.to(ct, copy=True).contiguous()  # each unit's own state, unrounded
    cc = c0.to(ct, copy=True).contiguous() if cell == "lstm" else None
    lengths = _lengths(lengths, x)
    fields = _tensor_core_fields("forward", cell, B, H, x, block_h)
    keep, params = [], (ForwardParams * D)()
    for d in range(D):
        rev = bool(reverse) if D == 1 else d == 1
        t0 = T - 1 if rev else 0
        hs[d, t0].copy_(h0[d])
        if cs is not None:
            cs[d, t0].copy_(c0[d])
        w_ih, w_hh = w_ihs[d].contiguous(), w_hhs[d].contiguous()
        bias, b_hn = fold_biases(cell, b_ihs[d] if b_ihs is not None else None,
                                 b_hhs[d] if b_hhs is not None else None, H, ct)
        gx = None
        if not fused:
            gx = hoisted_input(x, w_ih, bias, ct).contiguous()
            bias = None
        counter = _barrier_counter(dev, _launch_blocks(H, block_h))
        keep += [w_ih, w_hh, bias, b_hn, gx, counter]
        params[d] = ForwardParams(
            x=_ptr(x), gx=_ptr(gx), w_ih=_ptr(w_ih), w_hh=_ptr(w_hh), bias=_ptr(bias), b_hn=_ptr(b_hn),
            lengths=_ptr(lengths), y=_ptr(ys[d]), h_n=_ptr(h_n[d]), c_n=_ptr(c_n[d] if c_n is not None else None),
            gates=_ptr(gates[d]), hs=_ptr(hs[d]), cs=_ptr(cs[d] if cs is not None else None), hc=_ptr(hc[d]),
            cc=_ptr(cc[d] if cc is not None else None),
            sync=_ptr(counter), sync_flags=int(STEP_BARRIER == "flags"), cluster=CLUSTER, T=T, B=B, I=I, H=H,
            block_h=block_h, reverse=int(rev), directions=D, **fields)
    fn = getattr(lib, f"rnnfast_{cell}_forward_{_DTYPE_SUFFIX[dt]}")
    with _on(dev):
        _check(fn(params, _stream(dev)), f"{cell} forward")
    del keep
    return (ys[0] if D == 1 else torch.cat(ys, 2)), h_n, c_n, ws


def backward_directions(cell, grad_y, grad_h_n, grad_c_n, x, w_ihs, w_hhs, has_bias, lengths, reverse, ws, *,
                        plan=None):
    """The backward of :func:`forward_directions`' ``D`` directions, their recurrences in one launch, then the
    input, weight and bias gradients as GEMMs. ``grad_y (T, B, D*H)``, ``grad_h_n, grad_c_n (D, B, H)``. Returns
    ``(dx, dh0, dc0 (D, B, H) or None, [(dw_ih, dw_hh, db_ih, db_hh)] per direction)``."""
    del plan
    _require_device(x)
    _check_switches()
    lib = load_library()
    D = len(w_hhs)
    T, B = x.shape[0], x.shape[1]
    H = w_hhs[0].shape[1]
    G = GATES[cell]
    dt, ct, dev = x.dtype, compute_dtype(x.dtype), x.device
    gates, hs, cs = split_workspace(cell, ws, D, T, B, H, dt)
    d_in = torch.empty(D, T, B, G * H, dtype=dt, device=dev)
    d_hid = torch.empty_like(d_in) if cell == "gru" else d_in
    dh = grad_h_n.to(ct).contiguous().clone()
    dc = grad_c_n.to(ct).contiguous().clone() if cell == "lstm" else None
    direct = torch.empty(D, B, H, dtype=ct, device=dev)
    grad_y = grad_y.to(dt)
    lengths = _lengths(lengths, x)
    block_h = _block_h(cell, H, x, D)
    fields = _tensor_core_fields("backward", cell, B, H, x, block_h)
    keep, params = [], (BackwardParams * D)()
    for d in range(D):
        rev = bool(reverse) if D == 1 else d == 1
        gy = grad_y[:, :, d * H:(d + 1) * H].contiguous()
        w_hh = w_hhs[d].contiguous()
        counter = _barrier_counter(dev, _launch_blocks(H, block_h))
        keep += [gy, w_hh, counter]
        params[d] = BackwardParams(
            grad_y=_ptr(gy), w_hh=_ptr(w_hh), lengths=_ptr(lengths), gates=_ptr(gates[d]), hs=_ptr(hs[d]),
            cs=_ptr(cs[d] if cs is not None else None), d_in=_ptr(d_in[d]), d_hid=_ptr(d_hid[d]), dh=_ptr(dh[d]),
            dc=_ptr(dc[d] if dc is not None else None), direct=_ptr(direct[d]), sync=_ptr(counter),
            sync_flags=int(STEP_BARRIER == "flags"), cluster=CLUSTER, T=T, B=B, H=H, block_h=block_h,
            reverse=int(rev), directions=D, **fields)
    fn = getattr(lib, f"rnnfast_{cell}_backward_{_DTYPE_SUFFIX[dt]}")
    with _on(dev):
        _check(fn(params, _stream(dev)), f"{cell} backward")
    del keep
    # dh is dh0 now: the kernel's last phase B passes the first step's gate gradients through W_hh too.
    dx, weights = None, []
    for d in range(D):
        hid = d_in[d] if d_hid is d_in else d_hid[d]  # one tensor except for GRU, as input_and_weight_grads tells
        dx_d, dw_ih, dw_hh, db_ih, db_hh = input_and_weight_grads(d_in[d], hid, x, w_ihs[d], hs[d], has_bias)
        dx = dx_d if dx is None else dx + dx_d
        weights.append((dw_ih, dw_hh, db_ih, db_hh))
    return dx, dh.to(dt), (dc.to(dt) if dc is not None else None), weights


register(CudaBackend())
