"""The GPU smoke tests of one lease (``bench/gpu_run.sh`` runs them under ``bench.watchdog``, a time limit a test).

- every cell x {bfloat16, float32} x every mode of every kernel backend: forward and backward of a small layer of
  odd sizes (``bench.sanitize``'s) through the ``rnnfast.nn`` module, checked as the benchmark checks
  (:func:`bench.measure.check`: error against float64 torch.nn at most twice torch.nn's in the same dtype, cuDNN
  on a GPU, plus the dtype's atol) for the outputs and the gradients of the input and of every weight;
- the Triton backend's multi-program barrier path: two batch tiles of thirteen programs each that wait for each
  other every step, for every cell and each mode;
- two persistent layers of GPU-filling size launched on two CUDA streams at once, in a child process under a timeout:
  a barrier that assumes all its programs resident could wait forever on programs the other kernel keeps off the GPU;
- ``compute-sanitizer --tool memcheck`` of a small layer on each kernel backend, skipped with the tool's words
  where it refuses the device.

Without a GPU the cases a CPU can run do (the Triton kernels under ``TRITON_INTERPRET=1``, in float32: the
interpreter's bfloat16 dot is wrong); the others skip, saying why. On a GPU a backend that cannot run a case fails
it. ``RNNFAST_SMOKE_BACKENDS`` (comma-separated base names) keeps only those kernel backends, e.g. to leave out one
whose build failed. ``python -m bench.test_smoke streams BACKEND`` is the two-stream child.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from rnnfast import backends

from bench import measure, providers as P
from bench.configs import CELLS, Config

REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ENV_BACKENDS = "RNNFAST_SMOKE_BACKENDS"


def kernel_backends() -> list[str]:
    """The kernel backends to smoke-test: every one rnnfast knows, less those ``RNNFAST_SMOKE_BACKENDS`` leaves out."""
    names = list(getattr(backends, "KERNEL_BACKENDS", ("triton", "cuda")))
    keep = os.environ.get(ENV_BACKENDS)
    if keep is not None:
        names = [n for n in names if n in {k.strip() for k in keep.split(",")}]
    return names


def backend_modes(base: str) -> list[str]:
    """``base:mode`` for every mode of a backend (just ``base`` when it has none or did not load)."""
    try:
        modes = backends.get(base).modes
    except (backends.BackendUnavailableError, ValueError):
        modes = ()
    return [f"{base}:{m}" for m in modes] or [base]


BASES = kernel_backends()
MODES = [name for base in BASES for name in backend_modes(base)]
TRITON_MODES = [name for name in MODES if backends.split_name(name)[0] == "triton"]


def small(cell: str, dtype: str) -> Config:
    return Config(cell, batch=3, hidden=37, input=19, seq_len=5, dtype=dtype)


def require(backend: str, cfg: Config) -> None:
    """Skip (CPU) or fail (GPU) with the reason when ``backend`` cannot run every layer of ``cfg`` here."""
    for spec in P.layer_specs(cfg, DEVICE):
        reason = backends.why_unavailable(backend, spec)
        if reason is not None:
            if DEVICE.type == "cuda":
                pytest.fail(f"{backend} cannot run {cfg.id} on this GPU: {reason}")
            pytest.skip(f"{backend} on {DEVICE.type}: {reason}")


def check_against_torch(backend: str, cfg: Config) -> None:
    """Outputs and gradients of ``backend`` on ``cfg`` pass the benchmark's check, in both modes."""
    require(backend, cfg)
    ref = P.torch_module(cfg, DEVICE)
    oracle_module = P.torch_module(cfg, DEVICE, dtype=torch.float64)
    xs, g = measure.make_inputs(cfg, DEVICE, copies=1)
    module = P.Provider(backend, backend).build(ref, cfg)
    for mode in measure.MODES:
        oracle = measure.Workload(oracle_module, [x.double() for x in xs], g.double(), mode).results()
        baseline = measure.Workload(ref, xs, g, mode).results()
        got = measure.Workload(module, xs, g, mode).results()
        verdict = measure.check(got, oracle, baseline, cfg.dtype)
        assert verdict["ok"], f"{backend} on {cfg.id}, {mode}: {verdict}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", MODES)
def test_layer(backend, cell, dtype):
    check_against_torch(backend, small(cell, dtype))


def _triton_planner():
    for name in ("rnnfast.backends.triton", "rnnfast.kernels.backend"):  # after and before the backends package
        try:
            fn = getattr(importlib.import_module(name), "make_plan", None)
        except ImportError:
            continue
        if fn is not None:
            return fn
    return None


# Every cell and every mode once: the barrier is the same code in all of them, and each pair costs a compile.
BARRIER_CASES = [(TRITON_MODES[i % len(TRITON_MODES)], cell) for i, cell in enumerate(CELLS)] if TRITON_MODES else []


@pytest.mark.gpu
@pytest.mark.parametrize("backend,cell", BARRIER_CASES)
def test_gpu_multi_program_barrier(backend, cell):
    # B=80: two batch tiles of 64; H=200: thirteen 16-unit slices per tile, whose programs wait for each other.
    cfg = Config(cell, batch=80, hidden=200, input=33, seq_len=50, dtype="float32")
    make_plan = _triton_planner()
    if make_plan is None:
        warnings.warn("the Triton planner was not found: the barrier path is assumed, not confirmed")
    else:
        plan = make_plan(cell, DEVICE, cfg.batch, cfg.input, cfg.hidden)
        assert plan.needs_sync(cfg.hidden), f"the default plan {plan} does not take the barrier path"
    check_against_torch(backend, cfg)


# Each layer fills the GPU with persistent programs that wait for each other: the Triton plan's grid is sized from
# its kernels' occupancy (rnnfast.backends.triton.make_plan), the CUDA one is 128 blocks of 8 units, on a 132-SM H200.
STREAMS_CONFIG = Config("lstm", batch=256, hidden=1024, input=1024, seq_len=16, dtype="bfloat16")
STREAMS_TIMEOUT_S = 90


def two_streams(backend: str) -> None:
    """Two layers of ``STREAMS_CONFIG`` run forward and backward on two streams at once must give what each gives
    alone."""
    cfg = STREAMS_CONFIG
    ref = P.torch_module(cfg, "cuda")
    layers = [P.Provider(backend, backend).build(ref, cfg) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(cfg.seq_len, cfg.batch, cfg.input, generator=g).to("cuda", torch.bfloat16) for _ in range(2)]

    def step(layer, x):
        y = layer(x)[0]
        y.float().square().mean().backward()
        return y.detach(), layer.weight_hh_l0.grad.clone()

    alone = [step(m, x) for m, x in zip(layers, xs)]
    torch.cuda.synchronize()
    for m in layers:
        m.zero_grad(set_to_none=True)
    streams = [torch.cuda.Stream() for _ in layers]
    together = []
    for s, m, x in zip(streams, layers, xs):
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            together.append(step(m, x))
    torch.cuda.synchronize()
    for (y0, dw0), (y1, dw1) in zip(alone, together):
        torch.testing.assert_close(y1, y0, atol=measure.ATOL[cfg.dtype], rtol=2e-2)
        torch.testing.assert_close(dw1, dw0, atol=measure.ATOL[cfg.dtype], rtol=2e-2)
    print("ok")


@pytest.mark.gpu
@pytest.mark.case_timeout(STREAMS_TIMEOUT_S + 30)
@pytest.mark.parametrize("backend", BASES)
def test_gpu_two_persistent_layers_on_two_streams(backend):
    require(backend, STREAMS_CONFIG)
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.test_smoke", "streams", backend], cwd=REPO,
                              capture_output=True, text=True, timeout=STREAMS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"two {backend} layers on two streams did not finish within {STREAMS_TIMEOUT_S} s: a persistent "
                    "kernel waits on programs that cannot be resident while the other one runs")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.stdout + proc.stderr)[-3000:]


SANITIZER_TIMEOUT_S = 150
PROBE = "import torch; x = torch.ones(8, device='cuda'); print(float((x + 1).sum()))"


def _sanitizer() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    found = shutil.which("compute-sanitizer") or str(Path(home) / "bin" / "compute-sanitizer")
    return found if Path(found).exists() else None


@pytest.mark.gpu
@pytest.mark.case_timeout(2 * SANITIZER_TIMEOUT_S + 30)
def test_gpu_memcheck_small_layer():
    tool = _sanitizer()
    if tool is None:
        pytest.skip("compute-sanitizer not found")
    names = [b for b in BASES if backends.why_unavailable(b, P.layer_specs(small("lstm", "float32"), DEVICE)[0])
             is None]
    if not names:
        pytest.fail(f"no kernel backend of {BASES} can run a small LSTM here")
    cmd = [tool, "--tool", "memcheck", "--error-exitcode", "2", sys.executable, "-m", "bench.sanitize",
           "--backends", ",".join(names), "--cells", "lstm", "--dtypes", "float32"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=SANITIZER_TIMEOUT_S)
    if proc.returncode != 0:
        # Clean code failing too means the tool, not rnnfast, is the problem (it refuses some sandboxes' devices).
        probe = subprocess.run([tool, "--tool", "memcheck", sys.executable, "-c", PROBE], capture_output=True,
                               text=True, timeout=SANITIZER_TIMEOUT_S)
        if probe.returncode != 0:
            words = (probe.stdout + probe.stderr).strip().splitlines()
            pytest.skip(f"compute-sanitizer refuses this device: {words[-1] if words else probe.returncode}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and proc.stdout.count(": ok") == len(names), out[-4000:]


if __name__ == "__main__":
    if sys.argv[1:2] != ["streams"] or len(sys.argv) != 3:
        sys.exit("usage: python -m bench.test_smoke streams BACKEND")
    two_streams(sys.argv[2])
