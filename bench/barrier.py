"""``python -m bench.barrier``: seconds per grid-wide barrier of a persistent Triton kernel on this GPU.

One program per SM, one warp each (Triton issues a scalar atomic from lane 0 of each warp, so one warp makes it one
arrival per program), all spinning on one counter: the cheapest step handoff a persistent RNN kernel can have. Run
in its own process by :func:`bench.floor.measure_grid_barrier`, with a timeout, because a barrier that never
completes cannot be stopped from inside the process that launched it. Prints the seconds on the last line.
"""

from __future__ import annotations

import sys

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


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench.barrier: needs a CUDA GPU")
    print(repr(measure()))
