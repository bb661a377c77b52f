"""``rnnfast.tune``: measure every backend on the user's own GPU for one module and input, and let ``auto`` use it.

Opt-in. For each backend (and mode) that ``auto`` may run for the module, it checks the outputs (and, in training,
the gradients) against a float64 reference of the same module under the flash-attention rule of
:mod:`rnnfast.testing` (error at most twice torch's own error plus the dtype's atol), exactly as the benchmark
gates its providers; a wrong backend gets no time. The correct ones are timed (CUDA events on a GPU, after warm-up,
median), and the fastest is written to the tuning cache of this device (:func:`rnnfast.dispatch.cache_path`), which
``auto`` reads before the shipped table. ``torch`` is always a candidate, so a tuned choice is never slower than
torch.nn on the example it was measured on.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import PackedSequence

from . import backends, dispatch, testing


@dataclass
class TuneResult:
    """What :func:`tune` measured: µs per step of each correct candidate, the reason each other one was left out,
    the winner, and the cache file it was written to."""

    backend: str
    us_per_step: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    cache_file: str = ""

    def __str__(self) -> str:
        lines = [f"tuned: {self.backend!r} (cached in {self.cache_file})"]
        lines += [f"  {n}: {t:.4g} us/step" for n, t in sorted(self.us_per_step.items(), key=lambda kv: kv[1])]
        lines += [f"  {n}: not timed: {why}" for n, why in self.rejected.items()]
        return "\n".join(lines)


def candidates_for(spec: dispatch.ModuleSpec) -> list[str]:
    """``torch`` and every registered kernel backend and mode that ``auto`` may run for ``spec``."""
    names = [dispatch.FALLBACK]
    for base in backends.KERNEL_BACKENDS:
        try:
            be = backends.get(base)
        except backends.BackendUnavailableError:
            continue
        names += [f"{base}:{m}" for m in be.modes] or [base]
    return names


def _outputs(result) -> list[torch.Tensor]:
    out, hidden = (result, None) if isinstance(result, torch.Tensor) else result
    if isinstance(out, tuple):  # LSTMCell: (h, c)
        out, hidden = out[0], out[1]
    if isinstance(out, PackedSequence):
        out = out.data
    hs = [] if hidden is None else (list(hidden) if isinstance(hidden, tuple) else [hidden])
    return [out] + hs


def _to(input, **kw):
    if isinstance(input, PackedSequence):
        return PackedSequence(input.data.to(**kw), input.batch_sizes, input.sorted_indices, input.unsorted_indices)
    return input.to(**kw)


def _run(module, input, training: bool):
    """Outputs and, in training, the parameter gradients of a fixed projection of every output."""
    module.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(training):
        outs = _outputs(module(input))
        grads = []
        if training:
            loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum()
                       for o in outs)
            loss.backward()
            grads = [p.grad for p in module.parameters()]
    return [o.detach() for o in outs] + grads


def _with_backend(module, name: str):
    m = copy.deepcopy(module)
    m.backend = name
    return m


def _time(module, input, training: bool, warmup: int, repeats: int) -> float:
    """Median seconds of one call (forward, plus backward in training)."""
    cuda = next(module.parameters()).device.type == "cuda"

    def once():
        with torch.set_grad_enabled(training):
            outs = _outputs(module(input))
            if training:
                sum(o.float().sum() for o in outs).backward()

    for _ in range(warmup):
        once()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tune(module: torch.nn.Module, example_input, *, training: bool | None = None,
         candidates: list[str] | None = None, warmup: int = 3, repeats: int = 10) -> TuneResult:
    """Time every backend that can run ``module(example_input)``, keep the fastest correct one in this device's
    tuning cache, and return what was measured. ``module`` is an rnnfast.nn module (its ``backend`` stays as it
    is; ``auto`` then prefers the cached measurement for calls of the same shapes). ``training`` (default: whether
    the module's parameters require grad) times forward and backward."""
    spec = dispatch.module_spec(module, example_input, training=training if training is not None else any(
        p.requires_grad for p in module.parameters()))
    names = candidates if candidates is not None else candidates_for(spec)
    if dispatch.FALLBACK not in names:
        names = [dispatch.FALLBACK, *names]  # torch is the baseline of the correctness rule and always a candidate
    oracle_module = _with_backend(module, "reference").to(torch.float64)
    oracle = _run(oracle_module, _to(example_input, dtype=torch.float64), spec.training)
    baseline = None
    result = TuneResult(backend=dispatch.FALLBACK)
    for name in names:
        backends.check_name(name)
        why = None if name == dispatch.FALLBACK else dispatch.refusal(name, spec)
        if why is not None:
            result.rejected[name] = why
            continue
        m = _with_backend(module, name)
        got = _run(m, example_input, spec.training)
        if baseline is None:
            baseline = got  # torch's own result: the same-precision computation of the rule
        bad = [i for i, (g, o, b) in enumerate(zip(got, oracle, baseline))
               if g is None or not testing.within_baseline(g, o, b)]
        if bad or len(got) != len(oracle):
            result.rejected[name] = f"wrong: tensors {bad} outside the tolerance rule against the float64 reference"
            continue
        result.us_per_step[name] = _time(m, example_input, spec.training, warmup, repeats) * 1e6 / spec.seq_len
    result.backend = min(result.us_per_step, key=result.us_per_step.get)
    entry = {"backend": result.backend, "us_per_step": round(result.us_per_step[result.backend], 4),
             "torch_us_per_step": round(result.us_per_step[dispatch.FALLBACK], 4),
             "measured": {n: round(t, 4) for n, t in result.us_per_step.items()}}
    result.cache_file = str(dispatch.write_cache_entry(spec.device, dispatch.tune_key(spec), entry))
    return result
