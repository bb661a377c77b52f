"""The per-step floor: how fast one time step could possibly run on this GPU.

An RNN layer is a chain of T dependent steps, so its time is at least T times the time of one step, and one step
can be no faster than the largest of what it must compute and what it must move, plus the handoff between steps.
For one layer and direction with input size I, hidden size H, G gates (RNN 1, GRU 3, LSTM 4), batch B and an
element size of s bytes:

- compute: ``2*B*(I+H)*G*H`` FLOPs over the dense tensor-core peak of the dtype (TF32 for float32). A hoisted
  input product moves work out of the chain but not off the GPU, so the same total is charged per step;
- memory: ``s*B*(I+H)`` bytes (read x_t, write h_t), plus ``s*G*H*H`` (W_hh) when the recurrent weights of all
  layers do not fit in the GPU's on-chip memory (registers + shared memory of every SM), over the HBM bandwidth;
- sync: the cost of one step boundary, measured on the same GPU as the cheaper of two handoffs: one 1-element
  kernel in a chain of dependent kernels replayed from a CUDA graph (a launch per step), and one grid-wide
  barrier of a persistent Triton kernel with one program per SM spinning on an atomic counter (``bench.barrier``).

``floor(inference) = max(compute, memory) + sync`` per step. Training adds the backward chain: twice the FLOPs
(the products for dh and dW), bytes ``s*B*(G*H + H + I)`` (read the saved gates and dy_t, write dx_t) plus the
``s*B*G*H`` the forward writes for it, and a second sync: ``floor(training) = floor(forward) + floor(backward)``.
Layers and directions are summed into one step with one sync (a wavefront schedule runs them together), which
keeps the floor a lower bound. Peaks and bandwidth are measured on the spot (a large matmul, a large copy); the
data-sheet table in ``bench/floor.py`` is the documented fallback.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .configs import Config

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# Dense (not sparse) peaks from the vendors' data sheets, FLOP/s; "float32" is the TF32 tensor-core rate.
# Matched by substring of torch.cuda.get_device_name(), first match wins, so the specific names come first.
KNOWN_GPUS = [
    ("H200", {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12, "float64": 66.9e12}, 4.8e12),
    ("H100 NVL", {"bfloat16": 835.5e12, "float16": 835.5e12, "float32": 417.5e12, "float64": 60.0e12}, 3.9e12),
    ("H100 PCIe", {"bfloat16": 756.0e12, "float16": 756.0e12, "float32": 378.0e12, "float64": 51.2e12}, 2.0e12),
    ("H100", {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12, "float64": 66.9e12}, 3.35e12),
    ("A100", {"bfloat16": 312.0e12, "float16": 312.0e12, "float32": 156.0e12, "float64": 19.5e12}, 2.0e12),
]


@dataclass
class Machine:
    """What the floor model needs to know about a GPU."""

    name: str
    peak_flops: dict[str, float]  # dtype name -> FLOP/s
    bandwidth: float  # bytes/s
    sync_s: float  # seconds per step boundary
    onchip_bytes: int  # registers + shared memory, all SMs together
    source: dict = field(default_factory=dict)  # how each number was obtained

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Floor:
    """Seconds per time step: the parts and the floor itself."""

    compute_s: float
    memory_s: float
    sync_s: float
    floor_s: float
    weights_on_chip: bool


def step_floor(cfg: Config, mode: str, m: Machine) -> Floor:
    """The per-step floor of ``cfg`` in ``mode`` ("inference" or "training") on machine ``m``."""
    if mode not in ("inference", "training"):
        raise ValueError(f"mode must be 'inference' or 'training', got {mode!r}")
    s, B, H, G = ELEMENT_BYTES[cfg.dtype], cfg.batch, cfg.hidden, cfg.gates
    layer_dirs = [I for I in cfg.layer_inputs() for _ in range(cfg.directions)]
    flops = sum(2 * B * (I + H) * G * H for I in layer_dirs)
    w_hh = s * G * H * H * len(layer_dirs)
    on_chip = w_hh <= m.onchip_bytes
    weights = 0 if on_chip else w_hh
    fwd_bytes = sum(s * B * (I + H) for I in layer_dirs) + weights
    peak = m.peak_flops[cfg.dtype]
    compute, memory = flops / peak, fwd_bytes / m.bandwidth
    if mode == "inference":
        return Floor(compute, memory, m.sync_s, max(compute, memory) + m.sync_s, on_chip)
    saved = sum(s * B * G * H for _ in layer_dirs)  # the gates the forward keeps for the backward
    fwd_memory = (fwd_bytes + saved) / m.bandwidth
    bwd_compute = 2 * flops / peak
    bwd_memory = (sum(s * B * (G * H + H + I) for I in layer_dirs) + weights) / m.bandwidth
    total = max(compute, fwd_memory) + max(bwd_compute, bwd_memory) + 2 * m.sync_s
    return Floor(compute + bwd_compute, fwd_memory + bwd_memory, 2 * m.sync_s, total, on_chip)


def known(name: str) -> tuple[dict[str, float], float] | None:
    """The table's (peaks, bandwidth) for a GPU name, or None when the GPU is not in the table."""
    for key, peaks, bw in KNOWN_GPUS:
        if key in name:
            return dict(peaks), bw
    return None


# -- measuring on the GPU -----------------------------------------------------------------------------------------

def _time_cuda(fn, reps: int) -> float:
    """Best seconds of one ``fn()`` over ``reps`` runs, timed with CUDA events (after one warm-up run)."""
    import torch

    fn()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def measure_peak_flops(dtype: str, n: int = 8192) -> float:
    """FLOP/s of a large square matmul in ``dtype`` (TF32 allowed for float32, as the floor assumes)."""
    import torch

    tdt = getattr(torch, dtype)
    a = torch.randn(n, n, device="cuda", dtype=tdt)
    b = torch.randn(n, n, device="cuda", dtype=tdt)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        sec = _time_cuda(lambda: torch.mm(a, b), reps=5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return 2 * n ** 3 / sec


def measure_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes`` (read plus write counted)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    sec = _time_cuda(lambda: dst.copy_(src), reps=5)
    return 2 * nbytes / sec


def measure_sync(chain: int = 200, replays: int = 20) -> float:
    """Seconds per kernel of a chain of dependent 1-element kernels replayed from a CUDA graph."""
    import torch

    t = torch.zeros(1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture stream, as CUDA graph capture requires
        for _ in range(3):
            t.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(chain):
            t.add_(1)

    def replay():
        for _ in range(replays):
            graph.replay()

    return _time_cuda(replay, reps=5) / (chain * replays)


def measure_grid_barrier(timeout: float = 45.0) -> float:
    """Seconds per grid-wide barrier of a persistent Triton kernel (:mod:`bench.barrier`, in a child process)."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "bench.barrier"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(tail[-1] if tail else f"exit status {proc.returncode}")
    return float(proc.stdout.strip().splitlines()[-1])


def onchip_bytes() -> int:
    """Registers plus shared memory of every SM of the current GPU."""
    import torch

    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    regs = getattr(p, "regs_per_multiprocessor", 65536) * 4
    smem = getattr(p, "shared_memory_per_multiprocessor", 228 * 1024)
    return p.multi_processor_count * (regs + smem)


def gpu_machine(dtypes, measure: bool = True, log=print) -> Machine | None:
    """The floor model's machine for the current GPU: measured (default) or from the table; None if neither."""
    import torch

    name = torch.cuda.get_device_name(torch.cuda.current_device())
    table = known(name)
    peaks, bw, sync, source = {}, None, None, {}
    if table is not None:
        source["table"] = {"peak_flops": table[0], "bandwidth": table[1]}
    if measure:
        t0 = time.perf_counter()
        try:
            for d in dtypes:
                peaks[d] = measure_peak_flops(d, n=8192 if ELEMENT_BYTES[d] <= 2 else 4096)
            bw = measure_bandwidth()
            source["peak_flops"] = source["bandwidth"] = "measured: large matmul / 1 GiB copy"
        except Exception as exc:  # a floor is context, not the benchmark: fall back to the table
            log(f"measuring the floor model failed ({type(exc).__name__}: {exc}); using the table")
            peaks, bw = {}, None
        log(f"floor model: measured peaks and bandwidth in {time.perf_counter() - t0:.1f} s")
    if not peaks or bw is None:
        if table is None:
            log(f"floor model: {name!r} is not in the table and was not measured: no floor")
            return None
        peaks, bw = {d: table[0][d] for d in dtypes}, table[1]
        source["peak_flops"] = source["bandwidth"] = "table (data sheet, dense)"
    handoffs = {}
    for what, fn in (("kernel launch in a CUDA graph", measure_sync), ("grid barrier", measure_grid_barrier)):
        try:
            handoffs[what] = fn()
        except Exception as exc:  # the other measurement still gives a sync
            log(f"measuring the {what} failed ({type(exc).__name__}: {exc})")
    if handoffs:
        what = min(handoffs, key=handoffs.get)
        sync = handoffs[what]
        source["sync_s"] = f"measured: the cheaper of {handoffs} s: {what}"
        source["handoffs_s"] = handoffs
    else:
        log("no sync latency could be measured: counting none")
        sync, source["sync_s"] = 0.0, "not measured"
    return Machine(name=name, peak_flops=peaks, bandwidth=bw, sync_s=sync, onchip_bytes=onchip_bytes(),
                   source=source)
