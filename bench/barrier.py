"""``python -m bench.barrier``: seconds per grid-wide barrier of a persistent Triton kernel on this GPU.

One program per SM, one warp each (Triton issues a scalar atomic from lane 0 of each warp, so one warp makes it one
arrival per program), all spinning on one counter: the cheapest step handoff a persistent RNN kernel can have. Run
in its own process by :func:`bench.floor.measure_grid_barrier`, with a timeout, because a barrier that never
completes cannot be stopped from inside the process that launched it. Prints the seconds on the last line.

``python -m bench.barrier --cuda`` prints instead the seconds per cooperative grid barrier of the CUDA backend
(its ``measure_grid_barrier``, one block per SM as its layer kernels launch), ``--cuda-counter`` and
``--cuda-flags`` those of its split-phase barriers on a counter (what its layer kernels use by default) and on one
flag a block; :func:`costs` gathers all four for the benchmark's JSON.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl


@triton.jit
def _barrier_chain(counter, rounds):
    n = tl.num_programs(0)
    for r in range(rounds):
        tl.atomic_add(counter, 1, sem="release", scope="gpu")  # arrive
        target = (r + 1) * n
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        while seen < target:  # wait for every program of this round
            seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")


def measure(rounds: int = 2000) -> float:
    """Seconds per barrier: the time of ``rounds + 1`` barriers less that of one, over ``rounds``."""
    n = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")

    def timed(r: int) -> float:
        best = float("inf")
        for _ in range(4):
            counter.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _barrier_chain[(n,)](counter, r, num_warps=1)
            end.record()
            end.synchronize()
            if counter.item() != r * n:  # one arrival per program per round, or the number means nothing
                raise RuntimeError(f"barrier counter {counter.item()} != {r} rounds x {n} programs")
            best = min(best, start.elapsed_time(end) / 1e3)
        return best

    return max(timed(rounds + 1) - timed(1), 0.0) / rounds


# Where the CUDA backend's host module lives (a list, so a test can point it at stand-ins).
CUDA_MODULES = ("rnnfast.backends.cuda",)


def cuda_measure_function():
    """The CUDA backend's ``measure_grid_barrier`` (microseconds per barrier), wherever this version keeps it."""
    import rnnfast  # noqa: F401  (registers the backends)

    for name in CUDA_MODULES:
        try:
            fn = getattr(importlib.import_module(name), "measure_grid_barrier", None)
        except ImportError:
            continue
        if fn is not None:
            return fn
    raise RuntimeError(f"no measure_grid_barrier in {' or '.join(CUDA_MODULES)}")


def measure_cuda(kind: str = "grid") -> float:
    """Seconds per step barrier of the CUDA backend: the cooperative grid barrier, or ``kind`` "counter" or "flags",
    its split-phase ones."""
    fn = cuda_measure_function()
    return (fn(iters=2000, repeats=5) if kind == "grid" else fn(iters=2000, repeats=5, kind=kind)) * 1e-6


def _child(flag: list[str], timeout: float) -> float:
    proc = subprocess.run([sys.executable, "-m", "bench.barrier", *flag], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(tail[-1] if tail else f"exit status {proc.returncode}")
    return float(proc.stdout.strip().splitlines()[-1])


def costs(machine=None, cuda: bool = True, timeout: float = 90.0, log=print) -> dict:
    """Microseconds per grid barrier: ``triton`` (this module's kernel; taken from the floor model's measurement
    when ``machine`` has one) and ``cuda`` (the CUDA backend's, when ``cuda``), each in a child process with a
    timeout; a measurement that fails or hangs gives None and its reason under ``errors``."""
    out = {"triton_us": None, "cuda_us": None, "cuda_counter_us": None, "cuda_flags_us": None, "errors": {}}
    known = ((machine.source if machine is not None else {}).get("handoffs_s") or {}).get("grid barrier")
    if known is not None:
        out["triton_us"] = known * 1e6
    jobs = [("triton_us", [])] if known is None else []
    if cuda:
        jobs += [("cuda_us", ["--cuda"]), ("cuda_counter_us", ["--cuda-counter"]), ("cuda_flags_us", ["--cuda-flags"])]
    else:
        for key in ("cuda_us", "cuda_counter_us", "cuda_flags_us"):
            out["errors"][key] = "not measured: the cuda backend is not benchmarked in this run"
    for key, flag in jobs:
        try:
            out[key] = _child(flag, timeout) * 1e6
        except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as exc:
            out["errors"][key] = f"{type(exc).__name__}: {exc}"[:300]
            log(f"grid barrier {key[:-3]}: not measured ({out['errors'][key]})")
    done = [f"{k[:-3]} {v:.2f} µs" for k, v in out.items() if k.endswith("_us") and v is not None]
    if done:
        log("grid barrier: " + ", ".join(done))
    return out


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench.barrier: needs a CUDA GPU")
    args = sys.argv[1:]
    kinds = {"--cuda": "grid", "--cuda-counter": "counter", "--cuda-flags": "flags"}
    chosen = [kinds[a] for a in args if a in kinds]
    print(repr(measure_cuda(chosen[0]) if chosen else measure()))
