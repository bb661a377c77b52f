"""The CUDA C++ backend (csrc/, rnnfast/backends/cuda.py, rnnfast/build.py).

The kernels run everywhere: on a GPU, and without one in the CPU execution mode (``RNNFAST_CUDA_EMULATE=1``,
which conftest sets when there is no GPU: the same kernel source built by the host compiler against
csrc/emulate.h, every CUDA thread a fiber, for an emulated H100/H200 of 132 multiprocessors). Either way: every
cell and dtype against the float64 reference (half types against the same-precision torch.nn with the baseline
rule), both input modes, reverse, unequal lengths 0..T, odd sizes, every gradient, outputs poisoned first, float64
gradcheck, a grid of more than 64 blocks, and the library's own refusals. Without a GPU the GPU library is also
compiled (for sm_90) and its exports checked: a C ABI with no torch and no CUDA runtime to load. On a GPU:
compute-sanitizer, the barrier's cost, modules and torch.compile on CUDA tensors.
"""

import ctypes
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
import torch

import rnnfast
from rnnfast import backends, build, ops, reference
from rnnfast.backends import cuda as rc
from conftest import (CELLS, GRAD_NAMES, assert_close, assert_layer_matches, assert_within_baseline, layer_inputs,
                      make_layer_inputs, reference_layer, torch_nn_layer)
from rnnfast.testing import bidirectional_gradchecks

HAS_GPU = torch.cuda.is_available()
EMULATED = rc.EMULATED
DEVICE = torch.device("cpu" if EMULATED else "cuda")
RUNS = EMULATED or HAS_GPU  # the kernels can execute here
TOOLCHAIN_PROBLEM = build.toolchain_problem()
# The CPU build compiles the GPU library for one architecture only; a GPU run builds for the GPU found.
CI_ARCHS = "90"
MODES = ("hoisted", "fused")
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
needs_kernels = pytest.mark.skipif(not RUNS, reason="no GPU and RNNFAST_CUDA_EMULATE is not set")


def _spec(cell="gru", device=None, dtype=torch.float32, H=8, proj=0):
    return backends.LayerSpec(cell=cell, device=torch.device(device or DEVICE), dtype=dtype, seq_len=5, batch=3,
                              input_size=4, hidden_size=H, proj_size=proj, bias=True, has_lengths=False)


@pytest.fixture(scope="session")
def library():
    """The library the backend runs (the emulation's without a GPU), built once per session (cached across)."""
    if not RUNS:
        pytest.skip("no GPU and RNNFAST_CUDA_EMULATE is not set")
    start = time.perf_counter()
    lib = rc.load_library()
    print(f"\nrnnfast CUDA library ({'emulation' if EMULATED else 'GPU'}) ready in "
          f"{time.perf_counter() - start:.0f} s: {rc._loaded}")
    return lib


@pytest.fixture(scope="session")
def gpu_library(tmp_path_factory):
    """The GPU library, built by two ``python -m rnnfast.build`` processes at once: one compiles while the other
    waits on the build directory's lock, and both must print the same path."""
    if TOOLCHAIN_PROBLEM is not None:
        pytest.skip(f"cannot build the CUDA library here: {TOOLCHAIN_PROBLEM}")
    env = dict(os.environ)
    if not HAS_GPU and not env.get(build.ENV_ARCHS):
        env[build.ENV_ARCHS] = CI_ARCHS
    logs = tmp_path_factory.mktemp("build")
    start = time.perf_counter()
    procs = []
    for i in range(2):  # output to files: a pipe nobody reads could fill up and stall a compiler
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-m", "rnnfast.build"], stdout=out, stderr=err, env=env))
    for i, proc in enumerate(procs):
        code = proc.wait(timeout=3600)
        assert code == 0, f"python -m rnnfast.build failed:\n{(logs / f'{i}.err').read_text()[-6000:]}"
    printed = {(logs / f"{i}.out").read_text().strip().splitlines()[-1] for i in range(2)}
    assert len(printed) == 1, printed
    messages = [(logs / f"{i}.err").read_text() for i in range(2)]
    assert sum("rnnfast: building" in m for m in messages) <= 1, messages  # the second found it built
    print(f"\nrnnfast GPU library ready in {time.perf_counter() - start:.0f} s: {printed}")
    return printed.pop()


# -- importing, refusing, building ------------------------------------------------------------------------------

def test_import_builds_nothing_and_registers_the_backend():
    code = ("import rnnfast, rnnfast.backends.cuda as rc; from rnnfast import backends; "
            "assert rc._loaded is None and rc._load_error is None; assert 'cuda' in backends._REGISTRY; "
            "assert backends.get('cuda:fused').mode == 'fused'; print('ok')")
    env = dict(os.environ, CUDA_HOME="/nonexistent/cuda")  # even without nvcc, importing never raises
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_tensors_on_the_other_device_are_refused_with_the_reason():
    other = "cuda" if EMULATED else "cpu"
    spec = _spec(device=other)
    reason = backends.why_unavailable("cuda", spec)
    assert reason is not None and ("RNNFAST_CUDA_EMULATE" in reason or "CUDA tensors" in reason)
    assert backends.available(spec)["cuda"] == reason
    if spec.device.type == "cpu" or HAS_GPU:
        assert backends.select("auto", spec) != "cuda"
    a = make_layer_inputs("gru", 5, 3, 4, 8, dtype=torch.float32)
    if not EMULATED:
        with pytest.raises(backends.BackendUnavailableError, match="CUDA tensors"):
            ops.gru(**a, backend="cuda:fused")


def test_auto_never_runs_the_emulation():
    if not EMULATED:
        pytest.skip("checks the emulation")
    spec = _spec()
    assert backends.why_unavailable("cuda", spec) is None
    assert "emulation" in backends.why_unavailable("cuda", spec, for_auto=True)
    assert backends.select("auto", spec) == "torch"


@pytest.mark.parametrize("spec,needle", [
    (_spec("lstm", proj=2), "proj_size"),
    (_spec(dtype=torch.complex64), "dtype"),
    (_spec(dtype=torch.int32), "dtype"),
    (_spec("lstm", dtype=torch.float64, H=8192), "too large"),
], ids=["proj", "complex", "int", "too-large"])
def test_unsupported_layers_are_refused(spec, needle):
    assert needle in backends.why_unavailable("cuda", spec)


@pytest.mark.skipif(HAS_GPU or EMULATED, reason="checks the reason given without a GPU or the emulation")
def test_no_gpu_is_the_reason_for_cuda_tensors_without_a_gpu():
    assert "no CUDA GPU" in backends.why_unavailable("cuda", _spec(device="cuda"))


def test_missing_nvcc_is_reported(monkeypatch):
    monkeypatch.setenv("CUDA_HOME", "/nonexistent/cuda")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    monkeypatch.setattr(build.Path, "exists", lambda self: False)
    problem = build.toolchain_problem()
    assert problem is not None and "nvcc" in problem and "CUDA_HOME" in problem
    with pytest.raises(RuntimeError, match="nvcc"):
        build.build()


def test_missing_sources_are_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "source_dir", lambda: tmp_path)
    for problem in (build.toolchain_problem(), build.emulation_problem()):
        assert problem is not None and "editable" in problem and str(tmp_path) in problem


def test_build_settings_are_read_in_one_place(monkeypatch, tmp_path):
    assert build.parse_archs("8.0;9.0") == [80, 90]
    assert build.parse_archs("90, sm_86 compute_80") == [80, 86, 90]
    for bad in ("7.5", "sm_70", "hopper", " ; "):
        with pytest.raises(ValueError, match=build.ENV_ARCHS):
            build.parse_archs(bad)
    monkeypatch.setenv(build.ENV_ARCHS, "9.0")
    assert build.target_archs() == [90]
    monkeypatch.delenv(build.ENV_ARCHS)
    assert {80, 90} <= set(build.target_archs())
    flags = build.nvcc_flags([80, 90])
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=compute_90" in flags
    monkeypatch.setenv(build.ENV_BUILD_DIR, str(tmp_path))
    d80, d90, emu = build.build_dir([80]), build.build_dir([90]), build.build_dir(emulate=True)
    assert d80.parent == tmp_path == emu.parent and len({d80, d90, emu}) == 3
    assert "torch" not in d80.name  # the library does not depend on torch, so neither does its folder


@pytest.mark.slow
def test_gpu_library_has_a_c_abi_free_of_torch_and_of_the_cuda_runtime(gpu_library):
    """What lets one build load under any torch: it links neither torch nor libcudart (static runtime), and it
    exports exactly the C entry points of csrc/capi.h."""
    deps = subprocess.run(["ldd", gpu_library], capture_output=True, text=True).stdout
    assert not any(name in deps for name in ("libtorch", "libc10", "libcudart", "libpython")), deps
    syms = subprocess.run(["nm", "-D", "--defined-only", gpu_library], capture_output=True, text=True).stdout
    exported = {line.split()[-1] for line in syms.splitlines() if " T " in line}
    expected = {f"rnnfast_{c}_{d}_{t}" for c in CELLS for d in ("forward", "backward")
                for t in ("f32", "f64", "f16", "bf16")}
    expected |= {"rnnfast_abi_version", "rnnfast_emulated", "rnnfast_last_error", "rnnfast_forward_smem_bytes",
                 "rnnfast_backward_smem_bytes", "rnnfast_grid_barrier"}
    assert exported == expected
    # It loads without torch, in a plain interpreter, and says what it is.
    code = f"import ctypes; lib = ctypes.CDLL({gpu_library!r}); print(lib.rnnfast_abi_version(), lib.rnnfast_emulated())"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == [str(rc.ABI_VERSION), "0"], out.stderr


@pytest.mark.slow
def test_build_module_prints_the_library_path(gpu_library, monkeypatch, capsys):
    if not HAS_GPU:
        monkeypatch.setenv(build.ENV_ARCHS, CI_ARCHS)
    assert build.main([]) == 0
    assert capsys.readouterr().out.strip() == gpu_library


def test_library_refuses_what_cannot_be_co_resident(library):
    """The C side checks again at launch, rather than starting a grid that could not all be resident, and says why
    in the error that Python raises."""
    a = _inputs("rnn_tanh", 2, 1, 1, 300, torch.float32, seed=0, scale=0.01)
    T, B, H = 2, 1, 300
    ws = torch.zeros(2 * T * B * H, dtype=torch.float32, device=DEVICE)  # gates, hs
    y, h_n, hc = torch.empty(T, B, H, device=DEVICE), torch.empty(B, H, device=DEVICE), torch.zeros(B, H, device=DEVICE)
    gx = torch.zeros(T, B, H, device=DEVICE)

    def params(block_h):
        return rc.ForwardParams(gx=gx.data_ptr(), w_hh=a["w_hh"].data_ptr(), y=y.data_ptr(), h_n=h_n.data_ptr(),
                                gates=ws.data_ptr(), hs=ws[T * B * H:].data_ptr(), hc=hc.data_ptr(), T=T, B=B, I=1,
                                H=H, block_h=block_h, directions=1, cluster=1)

    fn = library.rnnfast_rnn_tanh_forward_f32
    with pytest.raises(backends.BackendUnavailableError, match="must be resident at once"):
        rc._check(fn(ctypes.byref(params(1)), rc._stream(DEVICE)), "test")  # 300 blocks > 132 multiprocessors
    with pytest.raises(backends.BackendUnavailableError, match="shared memory"):
        rc._check(fn(ctypes.byref(params(300)), rc._stream(DEVICE)), "test")  # 300 x 300 x 4 bytes > 227 KiB
    with pytest.raises(RuntimeError, match="block_h"):
        rc._check(fn(ctypes.byref(params(0)), rc._stream(DEVICE)), "test")
    rc._check(fn(ctypes.byref(params(3)), rc._stream(DEVICE)), "test")  # 100 blocks fit


# -- numbers (on the GPU, or emulated) ------------------------------------------------------------------------------

def _inputs(cell, T, B, I, H, dtype, lengths=None, seed=0, scale=0.25):
    g = torch.Generator().manual_seed(seed)
    a = make_layer_inputs(cell, T, B, I, H, dtype=dtype, lengths=lengths, generator=g, scale=scale)
    return {k: v.to(DEVICE) for k, v in a.items()}


def _upstream(cell, T, B, H, dtype, seed=7):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)  # noqa: E731
    return r(T, B, H), r(B, H), (r(B, H) if cell == "lstm" else None)


def _run_backend(cell, a, reverse, mode, upstream):
    """Forward and backward through CudaBackend; returns ((y, h_n, c_n), grads)."""
    be = backends.get(f"cuda:{mode}")
    inputs = layer_inputs(cell, a, reverse)
    out = be.forward(inputs)
    grads = be.backward(inputs, out, backends.LayerOutputs(*upstream))
    return (out.y, out.h_n, out.c_n), grads.astuple()[:7]


@pytest.fixture
def poisoned_cuda(poison_torch_memory):
    """Python allocations return NaN (conftest), and so do the C++ ones: the caching allocator hands out blocks
    that were just filled with NaN, so an output element a kernel forgot to write fails the test."""
    if HAS_GPU:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        junk = [torch.full((n,), float("nan"), device=DEVICE) for n in [1 << 17] * 64 + [1 << 24] * 4]
        del junk
    yield


LENGTHS = [7, 3, 0, 1, 5, 7, 2]


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference(library, cell, dtype, mode, reverse, lengths, poisoned_cuda):
    T, B, I, H = 7, 7, 5, 37
    seed = zlib.crc32(f"{cell}-{dtype}-{mode}-{reverse}-{lengths}".encode())
    a = _inputs(cell, T, B, I, H, dtype, lengths=LENGTHS if lengths else None, seed=seed)
    up = _upstream(cell, T, B, H, dtype)
    outs, grads = _run_backend(cell, a, reverse, mode, up)
    ref_outs, ref_grads = reference_layer(cell, a, reverse, up)
    assert_layer_matches(cell, dtype, outs, grads, ref_outs, ref_grads)


@pytest.mark.parametrize("T,B,I,H", [(1, 1, 3, 37), (5, 1, 3, 1), (1, 4, 1, 5), (9, 3, 3, 200), (4, 2, 70, 300)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", CELLS)
def test_odd_sizes(library, cell, mode, T, B, I, H, poisoned_cuda):
    a = _inputs(cell, T, B, I, H, torch.float64, lengths=[T] + [max(0, T - 2 - b) for b in range(B - 1)],
                seed=T * 1000 + B * 100 + H, scale=0.3)
    up = _upstream(cell, T, B, H, torch.float64)
    for reverse in (False, True):
        outs, grads = _run_backend(cell, a, reverse, mode, up)
        ref_outs, ref_grads = reference_layer(cell, a, reverse, up)
        assert_layer_matches(cell, torch.float64, outs, grads, ref_outs, ref_grads)


@pytest.mark.parametrize("cell", CELLS)
def test_no_bias_and_many_blocks(library, cell):
    """Every multiprocessor holds a block (H=512: 128 blocks of 4 units), waiting on the grid barrier every step
    (fewer steps and sequences emulated, where every thread is a fiber)."""
    T, B, I, H = (6, 9, 33, 512) if EMULATED else (50, 64, 33, 512)
    assert -(-H // rc.plan(cell, H, torch.float32, DEVICE)[0]) >= 64
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, T + 1, (B,), generator=g).tolist()
    # Weights ~ N(0, (0.5/sqrt(H))^2): the recurrence contracts, so float32 rounding does not grow chaotically.
    a = _inputs(cell, T, B, I, H, torch.float32, lengths=lengths, seed=4, scale=0.5 / math.sqrt(H))
    a.pop("b_ih"), a.pop("b_hh")
    up = _upstream(cell, T, B, H, torch.float32)
    for mode, reverse in (("hoisted", True), ("fused", False)):
        outs, grads = _run_backend(cell, a, reverse, mode, up)
        ref_outs, ref_grads = reference_layer(cell, a, reverse, up)
        assert_layer_matches(cell, torch.float32, outs, grads, ref_outs, ref_grads)


@pytest.mark.parametrize("kind", rc.STEP_BARRIERS)
@pytest.mark.parametrize("cell,dtype", [("lstm", torch.bfloat16), ("gru", torch.float32), ("rnn_relu", torch.float64)],
                         ids=lambda v: DTYPE_IDS.get(v, str(v)))
def test_every_step_barrier(library, cell, dtype, kind, monkeypatch, poisoned_cuda):
    """The split-phase barriers (every block arrives once a step: the counter ends at blocks x steps, every flag at
    the steps) and the cooperative grid barrier, forward and backward, against the float64 reference (half types:
    the cuDNN baseline)."""
    T, B, I, H = 5, 4, 6, 150
    monkeypatch.setattr(rc, "STEP_BARRIER", kind)
    counters = []
    real = rc._barrier_counter
    monkeypatch.setattr(rc, "_barrier_counter", lambda *a: counters.append(real(*a)) or counters[-1])
    a = _inputs(cell, T, B, I, H, dtype, seed=H + len(kind), scale=0.5 / math.sqrt(H))
    up = _upstream(cell, T, B, H, dtype)
    outs, grads = _run_backend(cell, a, False, "hoisted", up)
    blocks = -(-H // rc.plan(cell, H, dtype, DEVICE)[0])
    assert blocks > 1
    # The forward waits between steps (T - 1 barriers), the backward within each (T).
    if kind == "counter":
        assert [c.tolist() for c in counters] == [[blocks * (T - 1)], [blocks * T]]
    elif kind == "flags":
        assert [c.tolist() for c in counters] == [[T - 1] * blocks, [T] * blocks]
    else:
        assert counters == [None, None]
    _assert_layer_correct(cell, dtype, a, False, up, outs, grads)


@pytest.mark.parametrize("cluster,kind", [(2, "counter"), (8, "flags")])
@pytest.mark.parametrize("cell,dtype,mode", [("lstm", torch.bfloat16, "hoisted"), ("gru", torch.float32, "fused"),
                                             ("rnn_tanh", torch.float16, "hoisted")],
                         ids=lambda v: DTYPE_IDS.get(v, str(v)))
def test_clusters_share_the_tensor_core_operand(library, cell, dtype, mode, cluster, kind, monkeypatch,
                                                poisoned_cuda):
    """CLUSTER > 1: the blocks of a cluster stage each batch tile (three of 16 rows) from their shares of the L2 reads,
    forward and backward; H=152 makes 76 blocks, rounded up to whole clusters by blocks that own no units. Half types
    within the cuDNN baseline, float32 (3xTF32) within its tolerance; clusters with the grid barrier are refused."""
    T, B, I, H = 3, 37, 5, 152
    monkeypatch.setattr(rc, "M_TILE_LIMIT", 16)
    monkeypatch.setattr(rc, "CLUSTER", cluster)
    monkeypatch.setattr(rc, "STEP_BARRIER", kind)
    block_h = rc.plan(cell, H, dtype, DEVICE)[0]
    assert rc._launch_blocks(H, block_h) % cluster == 0 and rc._launch_blocks(H, block_h) > -(-H // block_h) - 1
    a = _inputs(cell, T, B, I, H, dtype, seed=cluster + H, scale=0.5 / math.sqrt(H))
    up = _upstream(cell, T, B, H, dtype)
    outs, grads = _run_backend(cell, a, cell == "gru", mode, up)
    _assert_layer_correct(cell, dtype, a, cell == "gru", up, outs, grads)
    monkeypatch.setattr(rc, "STEP_BARRIER", "grid")
    with pytest.raises(ValueError, match="clusters need a split-phase"):
        _run_backend(cell, a, False, mode, up)


# -- both directions of a bidirectional layer in one launch --------------------------------------------------------

def _launches(monkeypatch):
    """The library launches made from here on, by what each was (``"lstm forward"``), and how many directions."""
    calls = []
    real = rc._check

    def check(code, what):
        calls.append(what)
        return real(code, what)

    monkeypatch.setattr(rc, "_check", check)
    return calls


@pytest.mark.parametrize("cell,dtype,mode", [("lstm", torch.float64, "hoisted"), ("gru", torch.float32, "fused"),
                                             ("rnn_tanh", torch.float64, "fused"), ("rnn_relu", torch.float32,
                                                                                    "hoisted")],
                         ids=lambda v: DTYPE_IDS.get(v, str(v)))
def test_both_directions_in_one_launch_match_the_reference(library, cell, dtype, mode, monkeypatch, poisoned_cuda):
    """forward_directions / backward_directions with two directions (the second reversed), unequal lengths, blocks
    of several units (each direction on half the multiprocessors): one launch each way, every output and gradient of
    each direction against the float64 reference."""
    T, B, I, H = 5, 3, 4, 150
    g = torch.Generator().manual_seed(zlib.crc32(f"bi-{cell}-{dtype}-{mode}".encode()))
    dirs = [make_layer_inputs(cell, T, B, I, H, dtype=dtype, lengths=[5, 0, 3], generator=g,
                              scale=0.5 / math.sqrt(H)) for _ in range(2)]
    x, lengths = dirs[0]["x"], dirs[0]["lengths"]
    for a in dirs:
        a["x"], a["lengths"] = x, lengths
    stack = lambda k: torch.stack([a[k] for a in dirs]) if k in dirs[0] else None  # noqa: E731
    assert rc.plan(cell, H, dtype, DEVICE, dirs=2)[0] > rc.plan(cell, H, dtype, DEVICE)[0]  # half the blocks each
    calls = _launches(monkeypatch)
    y, h_n, c_n, ws = rc.forward_directions(cell, x, stack("h0"), stack("c0"), [a["w_ih"] for a in dirs],
                                            [a["w_hh"] for a in dirs], [a["b_ih"] for a in dirs],
                                            [a["b_hh"] for a in dirs], lengths, False, fused=mode == "fused")
    assert y.shape == (T, B, 2 * H) and calls == [f"{cell} forward"]
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    gh = torch.randn(h_n.shape, generator=g, dtype=torch.float64).to(dtype)
    gc = torch.randn(h_n.shape, generator=g, dtype=torch.float64).to(dtype) if cell == "lstm" else None
    dx, dh0, dc0, weights = rc.backward_directions(cell, gy, gh, gc, x, [a["w_ih"] for a in dirs],
                                                   [a["w_hh"] for a in dirs], True, lengths, False, ws)
    assert calls == [f"{cell} forward", f"{cell} backward"]
    dx_ref = torch.zeros(x.shape, dtype=torch.float64)
    for d, a in enumerate(dirs):
        cols = slice(d * H, (d + 1) * H)
        (ry, rh, rc_), rg = reference_layer(cell, a, d == 1, (gy[:, :, cols], gh[d], None if gc is None else gc[d]))
        assert_close(y[:, :, cols], ry, msg=f"y of direction {d}")
        assert_close(h_n[d], rh, msg=f"h_n of direction {d}")
        if cell == "lstm":
            assert_close(c_n[d], rc_, msg=f"c_n of direction {d}")
            assert_close(dc0[d], rg[2], msg=f"dc0 of direction {d}")
        assert_close(dh0[d], rg[1], msg=f"dh0 of direction {d}")
        for name, got, want in zip(("w_ih", "w_hh", "b_ih", "b_hh"), weights[d], rg[3:]):
            assert_close(got, want, msg=f"gradient of {name} of direction {d}")
        dx_ref += rg[0].double()
    assert_close(dx, dx_ref)


def test_library_refuses_directions_of_different_shapes(library):
    """Two directions of one launch must agree; a third is refused."""
    def params(**kw):
        base = dict(T=2, B=1, I=1, H=4, block_h=1, directions=2, cluster=1)
        return rc.ForwardParams(**{**base, **kw})
    for second, needle in ((dict(H=5), "same sizes"), (dict(block_h=2), "same sizes")):
        pair = (rc.ForwardParams * 2)(params(), params(**second))
        assert library.rnnfast_lstm_forward_f64(pair, None) == 1
        assert needle in library.rnnfast_last_error().decode()
    assert library.rnnfast_lstm_forward_f64((rc.ForwardParams * 1)(params(directions=3)), None) == 1
    assert "directions must be 1 or 2" in library.rnnfast_last_error().decode()


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_bidirectional_modules_run_both_directions_of_a_layer_in_one_launch(library, cls, monkeypatch):
    calls = _launches(monkeypatch)
    torch.manual_seed(0)
    ours = getattr(rnnfast.nn, cls)(4, 6, num_layers=2, bidirectional=True, dtype=torch.float64, device=DEVICE,
                                    backend="cuda")
    theirs = getattr(torch.nn, cls)(4, 6, num_layers=2, bidirectional=True, dtype=torch.float64, device=DEVICE)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, _ = ours(x)
    out.sum().backward()
    want, _ = theirs(x2)
    want.sum().backward()
    cell = cls.lower()
    assert calls == [f"{cell} forward"] * 2 + [f"{cell} backward"] * 2, "per layer: one launch each way"
    assert_close(out, want)
    assert_close(x.grad, x2.grad)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_bidirectional_layer_gradcheck_and_gradgradcheck_float64(library, cell):
    assert bidirectional_gradchecks("cuda", cell, DEVICE)


@pytest.mark.parametrize("cell,dtype,H", [("gru", torch.float32, 1100), ("lstm", torch.float64, 600),
                                          ("rnn_tanh", torch.float32, 2000)], ids=lambda v: str(v))
def test_blocks_with_several_unit_chunks(library, cell, dtype, H, monkeypatch, poisoned_cuda):
    """Blocks owning more units than one warp computes together on FMA (8 in float32, 4 in float64): several
    chunks."""
    monkeypatch.setattr(rc, "TENSOR_CORES", False)
    T, B, I = 4, 3, 9
    block_h = rc.plan(cell, H, dtype, DEVICE)[0]
    assert block_h > (4 if dtype == torch.float64 else 8)
    a = _inputs(cell, T, B, I, H, dtype, lengths=[4, 2, 3], seed=H, scale=0.5 / math.sqrt(H))
    up = _upstream(cell, T, B, H, dtype)
    for mode, reverse in (("hoisted", False), ("fused", True)):
        outs, grads = _run_backend(cell, a, reverse, mode, up)
        ref_outs, ref_grads = reference_layer(cell, a, reverse, up)
        assert_layer_matches(cell, dtype, outs, grads, ref_outs, ref_grads)


def _cudnn(cell, a, reverse, upstream):
    """torch.nn (cuDNN) in the inputs' dtype: outputs and gradients of the same-precision PyTorch computation."""
    m = torch_nn_layer(cell, a)
    x = a["x"].detach().clone().requires_grad_()
    h0 = a["h0"].detach().clone().requires_grad_()
    c0 = a["c0"].detach().clone().requires_grad_() if cell == "lstm" else None
    # Without lengths, reverse is the forward run on the time-flipped sequence.
    y, hn = m(x.flip(0) if reverse else x, (h0[None], c0[None]) if cell == "lstm" else h0[None])
    y = y.flip(0) if reverse else y
    hn = hn if isinstance(hn, tuple) else (hn,)
    gy, gh, gc = upstream
    loss = (y.float() * gy.float()).sum() + (hn[0][0].float() * gh.float()).sum()
    if cell == "lstm":
        loss = loss + (hn[1][0].float() * gc.float()).sum()
    loss.backward()
    outs = (y, hn[0][0], hn[1][0] if cell == "lstm" else None)
    grads = (x.grad, h0.grad, c0.grad if c0 is not None else None, m.weight_ih_l0.grad, m.weight_hh_l0.grad,
             m.bias_ih_l0.grad, m.bias_hh_l0.grad)
    return outs, grads


def _assert_layer_correct(cell, dtype, a, reverse, up, outs, grads):
    """Outputs and every gradient against the float64 reference: float32/float64 within the table's tolerance, the
    half types by the baseline rule against cuDNN (torch.nn) in the same dtype (``a`` without lengths)."""
    ref_outs, ref_grads = reference_layer(cell, a, reverse, up)
    if dtype not in (torch.float16, torch.bfloat16):
        assert_layer_matches(cell, dtype, outs, grads, ref_outs, ref_grads)
        return
    base_outs, base_grads = _cudnn(cell, a, reverse, up)
    for name, o, r, b in zip(("y", "h_n", "c_n") + GRAD_NAMES, outs + grads, ref_outs + ref_grads,
                             base_outs + base_grads):
        if r is not None:
            assert o.dtype == dtype and o.shape == r.shape, name
            assert_within_baseline(o, r, b, msg=f"{cell} {dtype} {name}")


@pytest.mark.parametrize("tensor_cores", [True, False], ids=["mma", "fma"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("cell", CELLS)
def test_half_precision_within_cudnn_baseline(library, cell, dtype, mode, reverse, tensor_cores, monkeypatch,
                                                  poisoned_cuda):
    """Error against float64 at most BASELINE_FACTOR x cuDNN's in the same dtype (+ atol): outputs and every
    gradient, the initial states' included; the forward's recurrent product on tensor cores and on FMA."""
    T, B, I, H = (5, 20, 24, 37) if EMULATED else (33, 20, 24, 75)
    monkeypatch.setattr(rc, "TENSOR_CORES", tensor_cores)
    assert rc.use_tensor_cores(cell, B, H, dtype, DEVICE, rc.plan(cell, H, dtype, DEVICE)[0]) == tensor_cores
    a = _inputs(cell, T, B, I, H, dtype, seed=zlib.crc32(f"{cell}-{dtype}-{mode}-{reverse}".encode()),
                scale=0.5 / math.sqrt(H))
    up = _upstream(cell, T, B, H, dtype)
    outs, grads = _run_backend(cell, a, reverse, mode, up)
    ref_outs, ref_grads = reference_layer(cell, a, reverse, up)
    base_outs, base_grads = _cudnn(cell, a, reverse, up)
    for name, o, r, b in zip(("y", "h_n", "c_n") + GRAD_NAMES, outs + grads, ref_outs + ref_grads,
                             base_outs + base_grads):
        if r is None:
            continue
        assert o.dtype == dtype and o.shape == r.shape, name
        assert_within_baseline(o, r, b, msg=f"{cell} {mode} {dtype} {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_tensor_cores_with_several_units_a_block(library, cell, dtype, poisoned_cuda):
    """Blocks of 3 units: the forward's N = G*3 columns and the backward's W_hh^T slice of 3 columns go to tensor
    cores, each product's K split over the warps; outputs and every gradient within the cuDNN baseline."""
    T, B, I, H = 4, 5, 9, 300
    block_h = rc.plan(cell, H, dtype, DEVICE)[0]
    assert block_h == 3
    assert rc.use_tensor_cores(cell, B, H, dtype, DEVICE, block_h)
    assert rc.use_tensor_cores(cell, B, H, dtype, DEVICE, block_h, "backward")
    a = _inputs(cell, T, B, I, H, dtype, seed=7, scale=0.5 / math.sqrt(H))
    up = _upstream(cell, T, B, H, dtype)
    outs, grads = _run_backend(cell, a, True, "hoisted", up)
    _assert_layer_correct(cell, dtype, a, True, up, outs, grads)


@pytest.mark.parametrize("cell,dtype,mode", [("lstm", torch.bfloat16, "hoisted"), ("gru", torch.float16, "fused"),
                                             ("rnn_tanh", torch.bfloat16, "hoisted"), ("gru", torch.float32, "hoisted"),
                                             ("lstm", torch.float32, "fused")],
                         ids=lambda v: DTYPE_IDS.get(v, str(v)))
def test_batch_tiles_on_tensor_cores(library, cell, dtype, mode, monkeypatch, poisoned_cuda):
    """B=37 in tiles of 16 rows (the last one 5 rows): every tile's product, its epilogue, and the next step's input
    prefetched during the first tile, forward and backward. Half types within the cuDNN baseline; float32 (3xTF32),
    with unequal lengths, within the float32 tolerance."""
    T, B, I, H = 4, 37, 9, 40
    monkeypatch.setattr(rc, "M_TILE_LIMIT", 16)
    block_h = rc.plan(cell, H, dtype, DEVICE)[0]
    for kind in ("forward", "backward"):
        assert rc.tensor_core_rows(cell, B, H, dtype, DEVICE, block_h, kind) == 16
    # Unequal lengths in float32 (torch.nn's baseline of the half types has none here).
    lengths = [4, 1, 0, 3] + [4 - b % 5 for b in range(B - 4)] if dtype == torch.float32 else None
    a = _inputs(cell, T, B, I, H, dtype, lengths=lengths, seed=B + H, scale=0.5 / math.sqrt(H))
    up = _upstream(cell, T, B, H, dtype)
    reverse = cell != "gru"
    outs, grads = _run_backend(cell, a, reverse, mode, up)
    _assert_layer_correct(cell, dtype, a, reverse, up, outs, grads)


def test_tf32_only_for_cuda_tensors_under_the_switch(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert rc.tensor_core_mode(torch.float32, torch.device("cuda")) == rc.TF32
    assert rc.tensor_core_mode(torch.float32, torch.device("cpu")) == rc.TF32X3  # torch has no TF32 on the CPU
    assert rc.tensor_core_mode(torch.bfloat16, torch.device("cpu")) == 1
    assert rc.tensor_core_mode(torch.float64, torch.device("cuda")) == 0
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert rc.tensor_core_mode(torch.float32, torch.device("cuda")) == rc.TF32X3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", CELLS)
def test_tf32_under_the_switch_torch_nn_rnns_obey(library, cell, mode, monkeypatch, poisoned_cuda):
    """float32 under torch.backends.cudnn.allow_tf32: the recurrent products in TF32, within the baseline of the
    reference computing them in TF32 (float32 otherwise); and further from float64 than 3xTF32, which runs with the
    switch off, so TF32 is what ran."""
    T, B, I, H = 5, 20, 9, 37
    a = _inputs(cell, T, B, I, H, torch.float32, seed=zlib.crc32(f"tf32-{cell}-{mode}".encode()),
                scale=0.5 / math.sqrt(H))
    up = _upstream(cell, T, B, H, torch.float32)
    monkeypatch.setattr(rc, "EMULATE_TF32", True)  # the emulation's CPU tensors too
    assert rc.tensor_core_mode(torch.float32, DEVICE) == rc.TF32X3  # conftest: IEEE float32 unless a test asks
    ieee_outs, ieee_grads = _run_backend(cell, a, False, mode, up)
    torch.backends.cudnn.allow_tf32 = True
    try:
        assert rc.tensor_core_mode(torch.float32, DEVICE) == rc.TF32
        outs, grads = _run_backend(cell, a, False, mode, up)
    finally:
        torch.backends.cudnn.allow_tf32 = False
    ref_outs, ref_grads = reference_layer(cell, a, False, up)
    f32 = lambda t: t.float() if t is not None and t.is_floating_point() else t  # noqa: E731
    args = (f32(a["x"]), f32(a["h0"]), f32(a.get("c0")), f32(a["w_ih"]), f32(a["w_hh"]), f32(a.get("b_ih")),
            f32(a.get("b_hh")), None, None, False)
    base_outs = reference.layer_forward(cell, *args, tf32=True)
    base_grads = reference.layer_backward(cell, *up, *args, tf32=True)[:7]
    worse = 0
    for name, o, i, r, b in zip(("y", "h_n", "c_n") + GRAD_NAMES, outs + grads, ieee_outs + ieee_grads,
                                ref_outs + ref_grads, base_outs + base_grads):
        if r is None:
            continue
        assert_within_baseline(o, r, b, msg=f"{cell} {mode} TF32 {name}")
        assert_close(i, r, msg=f"{cell} {mode} 3xTF32 {name}")
        worse += (o.double() - r).abs().max() > 4 * (i.double() - r).abs().max()
    assert worse >= 3, "TF32 is no less accurate than 3xTF32: the switch did not reach the kernels"


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_tensor_cores_at_benchmark_size(library, cell):
    """bf16, B=64, H=1024 (the issue's largest target): the WMMA tiles fill most of shared memory; every block
    holds 8 units; against float64 and cuDNN's error, forward only."""
    T, B, I, H = 16, 64, 256, 1024
    block_h = rc.plan(cell, H, torch.bfloat16, DEVICE)[0]
    assert rc.use_tensor_cores(cell, B, H, torch.bfloat16, DEVICE, block_h)
    a = _inputs(cell, T, B, I, H, torch.bfloat16, seed=9, scale=0.5 / math.sqrt(H))
    zero = (torch.zeros(T, B, H, dtype=torch.bfloat16, device=DEVICE),
            torch.zeros(B, H, dtype=torch.bfloat16, device=DEVICE),
            torch.zeros(B, H, dtype=torch.bfloat16, device=DEVICE) if cell == "lstm" else None)
    out = backends.get("cuda").forward(layer_inputs(cell, a))
    y, h_n = out.y, out.h_n
    ref_outs, _ = reference_layer(cell, a, False, zero)
    base_outs, _ = _cudnn(cell, a, False, zero)
    assert_within_baseline(y, ref_outs[0], base_outs[0], msg=f"{cell} y")
    assert_within_baseline(h_n, ref_outs[1], base_outs[1], msg=f"{cell} h_n")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_float64(library, cell, mode):
    a = _inputs(cell, 4, 3, 2, 5, torch.float64, lengths=[4, 1, 0], seed=1)
    keys = [k for k in GRAD_NAMES if k in a]
    fn = ops.LAYER_FUNCTIONS[cell]

    def f(*tensors):
        return fn(**dict(zip(keys, tensors)), lengths=a["lengths"], reverse=mode == "fused",
                  backend=f"cuda:{mode}")

    assert torch.autograd.gradcheck(f, [a[k].detach().requires_grad_() for k in keys])


@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_through_the_layer_op(library, cell):
    a = _inputs(cell, 5, 3, 4, 6, torch.float32, lengths=[5, 2, 0], seed=2)
    for t in a.values():
        if t.is_floating_point():
            t.requires_grad_()
    fwd = ops.OPS[cell][0]
    names, _ = ops._names(cell)
    torch.library.opcheck(fwd, (*(a.get(n) for n in names), a["lengths"], True, "cuda:fused"))


@pytest.mark.gpu
def test_gpu_modules_and_compile(library):
    torch.manual_seed(0)
    m = rnnfast.nn.LSTM(5, 40, num_layers=2, bidirectional=True, device=DEVICE, backend="cuda")
    theirs = torch.nn.LSTM(5, 40, num_layers=2, bidirectional=True, device=DEVICE)
    theirs.load_state_dict(m.state_dict())
    x = torch.randn(9, 4, 5, device=DEVICE)
    out, (h, c) = m(x)
    with torch.backends.cudnn.flags(enabled=False):
        ref, (hr, cr) = theirs(x)
    for o, r in ((out, ref), (h, hr), (c, cr)):
        assert_close(o, r)
    torch._dynamo.reset()
    out_c, _ = torch.compile(m, fullgraph=True)(x)
    assert_close(out_c, out)


@pytest.mark.gpu
def test_gpu_grid_barrier_measurement(library):
    """The barrier every step pays: its cost is measured (and printed) and every block passes every barrier."""
    for kind in rc.STEP_BARRIERS:
        us = rc.measure_grid_barrier(iters=2000, repeats=3, kind=kind)
        print(f"\n{kind} step barrier, one block per multiprocessor: {us:.2f} us")
        assert 0 < us < 1000


SANITIZER_SCRIPT = textwrap.dedent("""
    import torch, rnnfast
    from rnnfast import ops
    torch.manual_seed(0)
    for cell in ("rnn_tanh", "rnn_relu", "gru", "lstm"):
        for dtype in (torch.float32, torch.bfloat16):
            for mode in ("hoisted", "fused"):
                G = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}[cell]
                T, B, I, H = 4, 3, 5, 37
                t = lambda *s: (torch.randn(*s, device="cuda") * 0.3).to(dtype).requires_grad_()
                a = dict(x=t(T, B, I), h0=t(B, H), w_ih=t(G * H, I), w_hh=t(G * H, H), b_ih=t(G * H), b_hh=t(G * H))
                if cell == "lstm":
                    a["c0"] = t(B, H)
                out = ops.LAYER_FUNCTIONS[cell](**a, lengths=torch.tensor([4, 0, 2]), reverse=mode == "fused",
                                                backend="cuda:" + mode)
                sum(o.float().sum() for o in out).backward()
    torch.cuda.synchronize()
    print("done")
""")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_gpu_compute_sanitizer_clean(library, tool, tmp_path):
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not Path(sanitizer).exists():
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "run.py"
    script.write_text(SANITIZER_SCRIPT)
    out = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable, str(script)],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0 and "done" in out.stdout, out.stdout[-4000:] + out.stderr[-4000:]


EMULATION_SCRIPT = textwrap.dedent("""
    import sys, torch
    import rnnfast
    from rnnfast import backends
    from rnnfast.backends import cuda as rc
    from rnnfast.testing import layer_inputs
    assert rc.EMULATED
    cases = torch.load(sys.argv[1])
    results = []
    for cell, mode, reverse, a, upstream in cases:
        be = backends.get("cuda:" + mode)
        inputs = layer_inputs(cell, a, reverse)
        out = be.forward(inputs)
        grads = be.backward(inputs, out, backends.LayerOutputs(*upstream))
        results.append([out.y, out.h_n, out.c_n] + list(grads.astuple()))
    torch.save(results, sys.argv[2])
""")


@pytest.mark.gpu
def test_gpu_matches_the_emulation_on_the_same_inputs(library, tmp_path):
    """The same kernel source on the GPU and in the CPU execution mode, on the same inputs: float64 agrees to
    rounding (the only differences are the order of the warp sums and FMA contraction), and float32 closely."""
    cases = []
    for cell in CELLS:
        for dtype, mode, reverse in ((torch.float64, "hoisted", False), (torch.float32, "fused", True)):
            a = make_layer_inputs(cell, 6, 5, 4, 37, dtype=dtype, lengths=[6, 0, 3, 1, 6],
                                  generator=torch.Generator().manual_seed(zlib.crc32(cell.encode())))
            g = torch.Generator().manual_seed(1)
            up = [torch.randn(6, 5, 37, generator=g, dtype=dtype), torch.randn(5, 37, generator=g, dtype=dtype),
                  torch.randn(5, 37, generator=g, dtype=dtype) if cell == "lstm" else None]
            cases.append((cell, mode, reverse, a, up))
    torch.save(cases, tmp_path / "cases.pt")
    env = dict(os.environ, RNNFAST_CUDA_EMULATE="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", EMULATION_SCRIPT, str(tmp_path / "cases.pt"),
                          str(tmp_path / "emulated.pt")], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    emulated = torch.load(tmp_path / "emulated.pt")
    for (cell, mode, reverse, a, up), emu in zip(cases, emulated):
        be = backends.get("cuda:" + mode)
        inputs = layer_inputs(cell, {k: v.to(DEVICE) for k, v in a.items()}, reverse)
        o = be.forward(inputs)
        grads = be.backward(inputs, o, backends.LayerOutputs(*(u.to(DEVICE) if u is not None else None for u in up)))
        for i, (gpu, cpu) in enumerate(zip([o.y, o.h_n, o.c_n] + list(grads.astuple()), emu)):
            assert (gpu is None) == (cpu is None), (cell, i)
            if gpu is not None:
                assert_close(gpu.cpu(), cpu, msg=f"{cell} {mode} output {i}: GPU against the emulation")


# -- what the compiler made of the kernels (SASS of the GPU library, built here for sm_90) -------------------------

@pytest.mark.slow
def test_half_kernels_use_tensor_cores_forward_and_backward_and_nothing_spills(gpu_library):
    rows = build.kernel_report(gpu_library)
    assert {(r["cell"], r["dtype"], r["kind"]) for r in rows} == {
        (c, d, k) for c in CELLS for d in ("f16", "bf16", "f32", "f64") for k in ("forward", "backward")}
    for r in rows:
        name = f"{r['cell']} {r['dtype']} {r['kind']}"
        assert r["local"] == 0 and r["stack"] == 0, f"{name}: spills to local memory ({r})"
        if r["dtype"] in ("f16", "bf16", "f32"):
            # float32's are TF32 (one pass under cudnn.allow_tf32, three without).
            assert r["hmma"] > 0, f"{name}: no tensor-core instruction"
            # The 16-bit types' fragments come from shared memory through ldmatrix (bf16 WMMA had none).
            assert (r["ldsm"] > 0) == (r["dtype"] != "f32"), f"{name}: {r['ldsm']} ldmatrix"
            # Both stage the product's A operand with cp.async (LDGSTS); the forward also prefetches the next
            # step's input part.
            assert r["ldgsts"] >= (3 if r["kind"] == "forward" else 1), f"{name}: {r['ldgsts']} cp.async"
        else:
            assert r["hmma"] == 0, f"{name}: float64 must not round its operands on tensor cores"


@pytest.mark.slow
def test_build_report_prints_each_kernel_and_the_anchor_plans(gpu_library, monkeypatch, capsys):
    if not HAS_GPU:
        monkeypatch.setenv(build.ENV_ARCHS, CI_ARCHS)
    assert build.main(["--report"]) == 0
    out = capsys.readouterr().out
    assert "HMMA" in out and out.strip().endswith(gpu_library)
    for anchor in ("(a) lstm bfloat16 B=16 H=768: 128 blocks x 6 units, forward mma.sync", "(b) lstm float32",
                   "(c) gru bfloat16 B=256 H=1024"):
        assert anchor in out


def test_shared_memory_of_a_plan_is_the_library_s_own(library):
    """Python decides tensor cores from the same shared-memory size the library launches with."""
    ids = {c: i for i, c in enumerate(CELLS)}
    for cell in CELLS:
        for dtype, did in ((torch.float16, 2), (torch.bfloat16, 3), (torch.float32, 0)):
            size = rc._ITEMSIZE[dtype]
            for B, H, bh, m_tile in ((1, 37, 1, 16), (20, 37, 3, 32), (16, 768, 6, 16), (64, 512, 4, 64),
                                     (256, 1024, 8, 48), (37, 40, 1, 16)):
                G = reference.GATES[cell]
                for kind, query in (("forward", library.rnnfast_forward_smem_bytes),
                                    ("backward", library.rnnfast_backward_smem_bytes)):
                    assert query(ids[cell], did, B, H, bh, m_tile) == \
                        rc.tensor_core_smem_bytes(kind, cell, B, H, bh, size, m_tile), (cell, kind, B, H, bh, m_tile)
                    assert query(ids[cell], did, B, H, bh, 0) == size * G * bh * H
    assert library.rnnfast_forward_smem_bytes(ids["lstm"], 1, 16, 64, 1, 16) == 8 * 4 * 64  # float64: FMA only


def test_cuda_cost_model_charges_batch_tiles_passes_and_padding():
    """Properties of the per-step model (kernels/cost.py, a prediction): each batch tile adds a dependent L2 round
    trip and its own MMA chain; 3xTF32 triples the MMA work; TF32 tiles are 8 wide, so a backward slice of 4 units
    pads to 8, not 16; FMA is slower than tensor cores at the anchors."""
    from rnnfast.kernels import cost

    one = cost.cuda_kernel_step("forward", "gru", torch.bfloat16, 256, 1024, 8, True, m_tile=256)
    six = cost.cuda_kernel_step("forward", "gru", torch.bfloat16, 256, 1024, 8, True, m_tile=48)
    assert six["load"] - one["load"] == pytest.approx(5 * cost.L2_LATENCY_S * 1e6)
    assert six["mma"] > one["mma"]
    # A cluster reads each tile from L2 once: less load at (c), for two cluster barriers a tile.
    four = cost.cuda_kernel_step("forward", "gru", torch.bfloat16, 256, 1024, 8, True, m_tile=48, cluster=4)
    assert four["load"] < six["load"] and four["mma"] == six["mma"]
    tf32 = cost.cuda_kernel_step("backward", "lstm", torch.float32, 64, 512, 4, True, m_tile=16)
    x3 = cost.cuda_kernel_step("backward", "lstm", torch.float32, 64, 512, 4, True, m_tile=16, passes=3)
    assert x3["mma"] == pytest.approx(3 * tf32["mma"]) and x3["load"] == tf32["load"]
    # Throughput-bound (B=256): 4 and 8 units fill one 8-wide TF32 tile alike, 9 need two; bf16 pads 4 to 16.
    mma = lambda dt, n: cost.cuda_kernel_step("backward", "lstm", dt, 256, 512, n, True, m_tile=256)["mma"]  # noqa
    assert mma(torch.float32, 4) == mma(torch.float32, 8) < mma(torch.float32, 9)
    assert mma(torch.bfloat16, 4) == mma(torch.bfloat16, 16)
    for key, (cell, dtype, B, H) in rc.ANCHORS.items():
        line, pred = rc.anchor_plan(cell, dtype, B, H)
        assert "FMA" not in line, f"({key}) {line}"
        fma = cost.cuda_kernel_step("forward", cell, dtype, B, H, int(line.split(" x ")[1].split()[0]), False)
        assert pred["forward"]["us"] < fma["us"], key
