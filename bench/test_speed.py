"""Speed of each provider on a subset of the registry, through pytest-benchmark (``pytest bench/``).

Each case is checked against the float64 oracle before it is timed (no time for a wrong answer); every timed
call ends with ``torch.cuda.synchronize()`` so the wall clock sees the GPU's work. The small CPU cases run
anywhere; the GPU cases (the anchors and a bfloat16 slice of the quick grid) skip without CUDA.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bench import measure, providers as P
from bench.configs import GROUPS, REGISTRY

pytest.importorskip("pytest_benchmark")

CPU_CONFIGS = [REGISTRY["lstm-B8-T32-H64-fp32"], REGISTRY["gru-B8-T32-H64-fp32"]]
GPU_CONFIGS = GROUPS["anchors"] + [REGISTRY["lstm-B16-T256-H256-bf16"], REGISTRY["gru-B16-T256-H256-bf16"]]


def _cases():
    cases = []
    for device, cfgs in (("cpu", CPU_CONFIGS), ("cuda", GPU_CONFIGS)):
        marks = [pytest.mark.gpu] if device == "cuda" else []
        names = [p.name for p in P.discover(device)[0]]
        for cfg, name, mode in itertools.product(cfgs, names, measure.MODES):
            cases.append(pytest.param(device, cfg, name, mode, marks=marks, id=f"{cfg.id}-{name}-{mode}"))
    return cases


@pytest.mark.parametrize("device,cfg,provider_name,mode", _cases())
def test_speed(benchmark, device, cfg, provider_name, mode):
    prov = next(p for p in P.discover(device)[0] if p.name == provider_name)
    backend, reason = prov.resolve(cfg, device)
    if backend is None:
        pytest.skip(f"{provider_name} cannot run {cfg.id}: {reason}")
    ref = P.torch_module(cfg, device)
    xs, g = measure.make_inputs(cfg, device)
    w = measure.Workload(ref if prov.is_baseline else prov.build(ref, cfg), xs, g, mode)
    if not prov.is_baseline:
        oracle = measure.Workload(P.torch_module(cfg, device, dtype=torch.float64), [x.double() for x in xs[:1]],
                                  g.double(), mode).results()
        baseline = measure.Workload(ref, xs[:1], g, mode).results()
        verdict = measure.check(w.results(), oracle, baseline, cfg.dtype)
        assert verdict["ok"], f"{provider_name} is wrong on {cfg.id} ({mode}): {verdict}"
    counter = itertools.count()

    def once():
        w.reset()
        w.run(next(counter))
        measure.synchronize(device)

    benchmark.extra_info.update(config=cfg.id, provider=provider_name, backend=backend, mode=mode,
                                seq_len=cfg.seq_len)
    benchmark.pedantic(once, rounds=20 if device == "cuda" else 5, warmup_rounds=2, iterations=1)
