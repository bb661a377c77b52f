"""Timing, peak memory and the correctness gate, the same code on the CPU and the GPU.

A :class:`Workload` runs one module in one mode: ``inference`` (forward under ``no_grad``) or ``training``
(forward and backward of ``sum(y * g)`` for a fixed random ``g``, inputs requiring grad). It rotates among
several copies of the input, together larger than twice the L2 cache, so a small problem is not timed from a
warm cache. :func:`time_workload` times it with CUDA events on a GPU (``time.perf_counter`` on the CPU) after
warm-up, as many runs as fit in a time budget; :func:`check` compares its outputs and gradients with a float64
oracle under the flash-attention rule (error at most twice the same-precision baseline's error, plus atol).

A packed configuration's inputs are ``PackedSequence`` objects (built before timing, as a caller holds them); its
output ``y`` and the gradient ``g`` are then the packed data, one row per real step of a sequence.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from rnnfast.testing import TOLERANCES, baseline_error

MODES = ("inference", "training")
# The dtype's atol by name, from rnnfast.testing: the one tolerance table the test suite and rnnfast.tune use too.
ATOL = {str(dtype).removeprefix("torch."): atol for dtype, (atol, _) in TOLERANCES.items()}


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rotation_copies(nbytes: int, device, cap: int = 4096) -> int:
    """How many copies of an input of ``nbytes`` together exceed twice the last-level cache."""
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        cache = getattr(props, "L2_cache_size", 0) or (50 << 20)
    else:
        cache = 4 << 20  # a CPU core's share of cache; the CPU numbers are context only
    return max(1, min(cap, math.ceil(2 * cache / max(nbytes, 1))))


def make_inputs(cfg, device, copies: int | None = None, seed: int = 1) -> tuple[list, torch.Tensor]:
    """``copies`` random inputs ``(T, B, I)`` (default: enough to defeat the cache) and a grad ``g`` for ``y``.

    The first input and ``g`` are drawn in float32 on the CPU from ``seed``, so the checked numbers do not depend on
    the device or dtype; the other copies only need to be different memory, and are drawn on the device. For a
    packed ``cfg`` each input is a ``PackedSequence`` of the configuration's lengths (``configs.lengths``) and
    ``g`` has one row per packed step.
    """
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.seq_len, cfg.batch, cfg.input)
    if copies is None:
        copies = rotation_copies(math.prod(shape) * dtype.itemsize, device)
    first = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    # One allocation for the rest: thousands of tiny inputs would otherwise cost thousands of copies.
    rest = torch.randn((copies - 1, *shape), device=device, dtype=dtype).unbind(0) if copies > 1 else ()
    xs = [first, *rest]
    rows = (cfg.seq_len, cfg.batch)
    if cfg.packed:
        from .configs import lengths

        lens = torch.tensor(lengths(cfg))
        xs = [pack_padded_sequence(x, lens, enforce_sorted=False) for x in xs]
        rows = (int(lens.sum()),)
    g = torch.randn(*rows, cfg.hidden * cfg.directions, generator=gen).to(device=device, dtype=dtype)
    return xs, g


def _leaf(x, requires_grad: bool):
    """``x`` (a tensor or a ``PackedSequence``) as a fresh leaf whose data may require grad."""
    if isinstance(x, PackedSequence):
        return PackedSequence(x.data.detach().requires_grad_(requires_grad), x.batch_sizes, x.sorted_indices,
                              x.unsorted_indices)
    return x.detach().requires_grad_(requires_grad)


def _data(x) -> torch.Tensor:
    """The tensor that holds ``x``'s values (a ``PackedSequence``'s packed data)."""
    return x.data if isinstance(x, PackedSequence) else x


def _flatten(out) -> dict[str, torch.Tensor]:
    y, state = out
    y = _data(y)
    if isinstance(state, tuple):  # LSTM
        return {"y": y, "h_n": state[0], "c_n": state[1]}
    return {"y": y, "h_n": state}


class Workload:
    """One module, one mode, a rotation of inputs; ``run(i)`` does one timed unit of work on input ``i``."""

    def __init__(self, module: torch.nn.Module, xs: list[torch.Tensor], g: torch.Tensor, mode: str):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.module, self.g, self.mode = module, g, mode
        self.xs = [_leaf(x, mode == "training") for x in xs]
        self._last = 0

    def reset(self) -> None:
        """Drop the gradients of the previous run (outside what is measured: no kernels, no allocation)."""
        if self.mode == "training":
            self.module.zero_grad(set_to_none=True)
            _data(self.xs[self._last]).grad = None

    def run(self, i: int):
        self._last = i % len(self.xs)
        x = self.xs[self._last]
        if self.mode == "inference":
            with torch.no_grad():
                return self.module(x)
        out = self.module(x)
        _data(out[0]).backward(self.g)
        return out

    def results(self) -> dict[str, torch.Tensor]:
        """Outputs (and, training, gradients of the input and every parameter) of one run on input 0."""
        self.reset()
        res = {k: v.detach() for k, v in _flatten(self.run(0)).items()}
        if self.mode == "training":
            res["dx"] = _data(self.xs[0]).grad
            for name, p in self.module.named_parameters():
                res[f"d{name}"] = p.grad
        self.reset()
        return res


def time_workload(w: Workload, device, warmup: int = 2, budget_s: float = 0.25, min_reps: int = 5,
                  max_reps: int = 200, deadline: float | None = None) -> list[float]:
    """Seconds of each timed run of ``w`` after ``warmup`` runs; as many runs as fit in ``budget_s``.

    Fewer runs (at least one) when ``min_reps`` of them would end past ``deadline`` (a ``perf_counter`` value).
    """
    cuda = torch.device(device).type == "cuda"
    for i in range(max(warmup, 1)):  # the first run compiles and autotunes
        w.reset()
        w.run(i)
    synchronize(device)
    w.reset()
    t0 = time.perf_counter()
    w.run(0)
    synchronize(device)
    estimate = max(time.perf_counter() - t0, 1e-9)
    reps = max(min_reps, min(max_reps, int(budget_s / estimate)))
    if deadline is not None:
        reps = max(1, min(reps, int((deadline - time.perf_counter()) / estimate)))
    times = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (start, end) in enumerate(events):
            w.reset()
            start.record()
            w.run(i)
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for i in range(reps):
            w.reset()
            t0 = time.perf_counter()
            w.run(i)
            times.append(time.perf_counter() - t0)
    w.reset()
    return times


def summarize(times: list[float]) -> dict:
    """Median, quartiles, min and max in ms."""
    ms = sorted(t * 1e3 for t in times)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"median": q[1], "q25": q[0], "q75": q[2], "min": ms[0], "max": ms[-1], "reps": len(ms)}


def peak_memory_mb(w: Workload, device) -> float | None:
    """Peak memory of one run above what was allocated before it (inputs, weights), MiB; None on the CPU."""
    if torch.device(device).type != "cuda":
        return None
    w.reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = w.run(0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    w.reset()
    return peak / 2 ** 20


def check(actual: dict, oracle: dict, baseline: dict, dtype: str) -> dict:
    """The flash-attention rule on every tensor: ``|a - o| <= 2 |b - o| + atol`` in the max norm.

    Returns ``{"ok", "worst", "error", "bound", "baseline_error"}`` for the tensor closest to (or furthest past)
    its bound; a missing tensor, a shape mismatch or a NaN fails.
    """
    worst = {"ok": True, "worst": None, "error": 0.0, "bound": 0.0, "baseline_error": 0.0, "ratio": -1.0}
    for key, ref in oracle.items():
        a, b = actual.get(key), baseline.get(key)
        if a is None or tuple(a.shape) != tuple(ref.shape):
            got = "missing" if a is None else f"shape {list(a.shape)}"
            return {"ok": False, "worst": key, "error": float("nan"), "bound": float("nan"),
                    "baseline_error": float("nan"), "ratio": float("inf"), "note": f"{key} {got}"}
        ref64 = ref.double()
        err, bound, base = baseline_error(a.to(getattr(torch, dtype)), ref64, ref64 if b is None else b)
        ok = err <= bound  # False for NaN
        ratio = float("inf") if math.isnan(err) else err / bound
        if not ok or ratio > worst["ratio"]:
            worst = {"ok": ok and worst["ok"], "worst": key, "error": err, "bound": bound, "baseline_error": base,
                     "ratio": ratio}
        if not ok:
            return worst
    return worst
