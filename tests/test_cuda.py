"""The CUDA C++ backend (csrc/, rnnfast/cuda.py, rnnfast/build.py).

On the CPU: the extension compiles and links against the installed torch (for one architecture, to keep CI
short), the library loads and registers its ops, the fake kernels give the right shapes and dtypes, and the
backend refuses, with the reason, whatever it cannot run (CPU tensors, no GPU, no nvcc, no sources). On a GPU:
every cell and dtype against the float64 reference and cuDNN, both input modes, reverse, unequal lengths, odd
sizes, every gradient, outputs poisoned first, float64 gradcheck, compute-sanitizer, and the refusal of a layer
too large for the co-resident grid.
"""

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
                      make_layer_inputs,
                      reference_layer, torch_nn_layer)

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
TOOLCHAIN_PROBLEM = build.toolchain_problem()
# The CPU build compiles for one architecture only; a GPU run builds for the GPU found (build.target_archs).
CI_ARCHS = "90"
MODES = ("hoisted", "fused")
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _spec(cell="gru", device="cpu", dtype=torch.float32, H=8, proj=0):
    return backends.LayerSpec(cell=cell, device=torch.device(device), dtype=dtype, seq_len=5, batch=3, input_size=4,
                              hidden_size=H, proj_size=proj, bias=True, has_lengths=False)


@pytest.fixture(scope="session")
def library(tmp_path_factory):
    """The extension, built once per test session (cached across sessions in the default build directory).

    Two ``python -m rnnfast.build`` processes build it at the same time: one compiles while the other waits on the
    build directory's lock, and both must print the same library, which this process then loads."""
    if TOOLCHAIN_PROBLEM is not None:
        pytest.skip(f"cannot build the CUDA extension here: {TOOLCHAIN_PROBLEM}")
    with pytest.MonkeyPatch.context() as mp:
        if not HAS_GPU and not os.environ.get(build.ENV_ARCHS):
            mp.setenv(build.ENV_ARCHS, CI_ARCHS)
        start = time.perf_counter()
        logs = tmp_path_factory.mktemp("build")
        procs = []
        for i in range(2):  # output to files: a pipe nobody reads could fill up and stall a compiler
            with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
                procs.append(subprocess.Popen([sys.executable, "-m", "rnnfast.build"], stdout=out, stderr=err))
        for i, proc in enumerate(procs):
            code = proc.wait(timeout=3600)
            assert code == 0, f"python -m rnnfast.build failed:\n{(logs / f'{i}.err').read_text()[-6000:]}"
        printed = {(logs / f"{i}.out").read_text().strip().splitlines()[-1] for i in range(2)}
        assert len(printed) == 1, printed
        path = rc.load_library()
        assert printed == {path}
        print(f"\nrnnfast CUDA extension ready in {time.perf_counter() - start:.0f} s: {path}")
    return path


# -- CPU: importing, refusing, building -----------------------------------------------------------------------------

def test_import_builds_nothing_and_registers_the_backend():
    code = ("import rnnfast, rnnfast.backends.cuda as rc; from rnnfast import backends; "
            "assert rc._loaded is None and rc._load_error is None; assert 'cuda' in backends._REGISTRY; "
            "assert backends.get('cuda:fused').mode == 'fused'; print('ok')")
    env = dict(os.environ, CUDA_HOME="/nonexistent/cuda")  # even without nvcc, importing never raises
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_cpu_tensors_are_refused_with_the_reason():
    spec = _spec(device="cpu")
    reason = backends.why_unavailable("cuda", spec)
    assert reason is not None and "CUDA tensors" in reason
    assert backends.available(spec)["cuda"] == reason
    assert backends.select("auto", spec) != "cuda"
    a = make_layer_inputs("gru", 5, 3, 4, 8, dtype=torch.float32)
    with pytest.raises(backends.BackendUnavailableError, match="CUDA tensors"):
        ops.gru(**a, backend="cuda")
    with pytest.raises(backends.BackendUnavailableError, match="CUDA tensors"):
        ops.gru(**a, backend="cuda:fused")
    # auto runs it elsewhere.
    y, _ = ops.gru(**a, backend="auto")
    assert y.shape == (5, 3, 8)
    # The backend itself refuses CPU tensors too, rather than failing inside the dispatcher.
    with pytest.raises(backends.BackendUnavailableError, match="CUDA tensors"):
        rc.CudaBackend().forward(layer_inputs("gru", a))


@pytest.mark.parametrize("spec,needle", [
    (_spec("lstm", proj=2), "proj_size"),
    (_spec(dtype=torch.complex64), "dtype"),
    (_spec(dtype=torch.int32), "dtype"),
], ids=["proj", "complex", "int"])
def test_unsupported_layers_are_refused(spec, needle):
    assert needle in backends.why_unavailable("cuda", spec)


@pytest.mark.skipif(HAS_GPU, reason="checks the reason given without a GPU")
def test_no_gpu_is_the_reason_for_cuda_tensors_without_a_gpu():
    assert "no CUDA GPU" in backends.why_unavailable("cuda", _spec(device="cuda"))


def test_missing_nvcc_is_reported(monkeypatch):
    monkeypatch.setenv("CUDA_HOME", "/nonexistent/cuda")
    problem = build.toolchain_problem()
    assert problem is not None and "nvcc" in problem and "CUDA_HOME" in problem
    monkeypatch.setattr(build, "_loaded_path", None)
    with pytest.raises(RuntimeError, match="nvcc"):
        build.load()


def test_missing_sources_are_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "source_dir", lambda: tmp_path)
    problem = build.toolchain_problem()
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
    d80, d90 = build.build_dir([80]), build.build_dir([90])
    assert d80.parent == tmp_path and d80 != d90 and torch.version.cuda in d80.name


@pytest.mark.slow
def test_extension_compiles_links_and_registers_its_ops(library):
    assert Path(library).is_file()
    for cell in CELLS:
        fwd = getattr(torch.ops.rnnfast_cuda, f"{cell}_forward").default
        bwd = getattr(torch.ops.rnnfast_cuda, f"{cell}_backward_recurrent").default
        assert "Tensor? gx" in str(fwd._schema) and "int block_h" in str(fwd._schema)
        assert "Tensor workspace" in str(bwd._schema)
    assert "int iters" in str(torch.ops.rnnfast_cuda.grid_barrier.default._schema)
    # The Python-defined public ops are untouched by the C++ library.
    assert hasattr(torch.ops.rnnfast, "lstm") and hasattr(torch.ops.rnnfast, "lstm_backward")


@pytest.mark.slow
def test_build_module_prints_the_library_path(library, monkeypatch, capsys):
    if not HAS_GPU:
        monkeypatch.setenv(build.ENV_ARCHS, CI_ARCHS)
    assert build.main([]) == 0
    assert capsys.readouterr().out.strip() == library


def _fake_args(cell, T=7, B=3, I=5, H=6, dtype=torch.float32, device="meta", fused=False):
    G = reference.GATES[cell]
    ct = reference.compute_dtype(dtype)
    e = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device=device)  # noqa: E731
    c0 = e(B, H) if cell == "lstm" else None
    gx = None if fused else e(T, B, G * H, dt=ct)
    bias = e(G * H, dt=ct) if fused else None
    b_hn = e(H, dt=ct) if cell == "gru" else None
    lengths = torch.empty(B, dtype=torch.int64, device=device)
    return (e(T, B, I), e(B, H), c0, e(G * H, I), e(G * H, H), gx, bias, b_hn, lengths, True, 2,
            dtype in (torch.float16, torch.bfloat16))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("cell", CELLS)
def test_fake_kernels_give_shapes_and_dtypes(library, cell, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    T, B, I, H, G = 7, 3, 5, 6, reference.GATES[cell]
    ct = reference.compute_dtype(dtype)
    with FakeTensorMode():
        args = _fake_args(cell, T, B, I, H, dtype, device="cpu")
        y, h_n, c_n, ws = getattr(torch.ops.rnnfast_cuda, f"{cell}_forward")(*args)
        assert (y.shape, y.dtype, h_n.shape, h_n.dtype) == ((T, B, H), dtype, (B, H), dtype)
        assert c_n.shape == ((B, H) if cell == "lstm" else (0,)) and c_n.dtype == dtype
        assert ws.shape == (rc.workspace_numel(cell, T, B, H),) and ws.dtype == ct
        gc = torch.empty(B, H, dtype=dtype) if cell == "lstm" else None
        d_in, d_hid, dh0, dc0 = getattr(torch.ops.rnnfast_cuda, f"{cell}_backward_recurrent")(
            torch.empty(T, B, H, dtype=dtype), torch.empty(B, H, dtype=dtype), gc, args[4], ws, args[8], False, 2)
        assert d_in.shape == (T, B, G * H) and d_in.dtype == ct
        assert d_hid.shape == ((T, B, G * H) if cell == "gru" else (0,)) and d_hid.dtype == ct
        assert dh0.shape == (B, H) and dh0.dtype == ct
        assert dc0.shape == ((B, H) if cell == "lstm" else (0,)) and dc0.dtype == ct
    # The workspace the backend promises to torch.compile matches what the op returns.
    x = torch.empty(T, B, I, dtype=dtype, device="meta")
    inputs = backends.LayerInputs(cell, x, None, None, None, args[4].to("meta"))
    assert rc.CudaBackend().workspace(inputs).shape == ws.shape


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_on_meta_tensors(library, cell):
    """Schema and fake kernel agree (meta tensors run the fake kernel; the CUDA kernels are checked on a GPU)."""
    op = getattr(torch.ops.rnnfast_cuda, f"{cell}_forward").default
    torch.library.opcheck(op, _fake_args(cell, fused=cell in ("gru", "rnn_relu")),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
@pytest.mark.skipif(HAS_GPU, reason="checks the error without a GPU")
def test_calling_the_kernels_on_cpu_tensors_is_a_clear_error(library):
    args = [a.to("cpu") if isinstance(a, torch.Tensor) else a for a in _fake_args("gru", device="cpu")]
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.rnnfast_cuda.gru_forward(*args)


# -- GPU: numbers ---------------------------------------------------------------------------------------------------

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


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_matches_reference(library, cell, dtype, mode, reverse, lengths, poisoned_cuda):
    T, B, I, H = 7, 7, 5, 37
    seed = zlib.crc32(f"{cell}-{dtype}-{mode}-{reverse}-{lengths}".encode())
    a = _inputs(cell, T, B, I, H, dtype, lengths=LENGTHS if lengths else None, seed=seed)
    up = _upstream(cell, T, B, H, dtype)
    outs, grads = _run_backend(cell, a, reverse, mode, up)
    ref_outs, ref_grads = reference_layer(cell, a, reverse, up)
    assert_layer_matches(cell, dtype, outs, grads, ref_outs, ref_grads)


@pytest.mark.gpu
@pytest.mark.parametrize("T,B,I,H", [(1, 1, 3, 37), (5, 1, 3, 1), (1, 4, 1, 5), (9, 3, 3, 200), (4, 2, 70, 300)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_odd_sizes(library, cell, mode, T, B, I, H, poisoned_cuda):
    a = _inputs(cell, T, B, I, H, torch.float64, lengths=[T] + [max(0, T - 2 - b) for b in range(B - 1)],
                seed=T * 1000 + B * 100 + H, scale=0.3)
    up = _upstream(cell, T, B, H, torch.float64)
    for reverse in (False, True):
        outs, grads = _run_backend(cell, a, reverse, mode, up)
        ref_outs, ref_grads = reference_layer(cell, a, reverse, up)
        assert_layer_matches(cell, torch.float64, outs, grads, ref_outs, ref_grads)


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_no_bias_and_many_blocks(library, cell):
    """Every multiprocessor holds a block (H=512: several units each), waiting on the grid barrier 49 times."""
    T, B, I, H = 50, 64, 33, 512
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


@pytest.mark.gpu
@pytest.mark.parametrize("cell,dtype,H", [("gru", torch.float32, 1100), ("lstm", torch.float64, 600),
                                          ("rnn_tanh", torch.float32, 2000)], ids=lambda v: str(v))
def test_gpu_blocks_with_several_unit_chunks(library, cell, dtype, H, poisoned_cuda):
    """Blocks owning more units than one warp computes together (8 in float32, 4 in float64): several chunks."""
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


@pytest.mark.gpu
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["mma", "fma"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_half_precision_within_cudnn_baseline(library, cell, dtype, mode, reverse, tensor_cores, monkeypatch,
                                                  poisoned_cuda):
    """Error against float64 at most BASELINE_FACTOR x cuDNN's in the same dtype (+ atol): outputs and every
    gradient, the initial states' included; the forward's recurrent product on tensor cores and on FMA."""
    T, B, I, H = 33, 20, 24, 75
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


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_gradcheck_float64(library, cell, mode):
    a = _inputs(cell, 4, 3, 2, 5, torch.float64, lengths=[4, 1, 0], seed=1)
    keys = [k for k in GRAD_NAMES if k in a]
    fn = ops.LAYER_FUNCTIONS[cell]

    def f(*tensors):
        return fn(**dict(zip(keys, tensors)), lengths=a["lengths"], reverse=mode == "fused",
                  backend=f"cuda:{mode}")

    assert torch.autograd.gradcheck(f, [a[k].detach().requires_grad_() for k in keys])


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_opcheck(library, cell):
    a = _inputs(cell, 5, 3, 4, 6, torch.float32, lengths=[5, 2, 0], seed=2)
    fused = cell in ("gru", "rnn_relu")
    args = list(_fake_args(cell, 5, 3, 4, 6, torch.float32, device=DEVICE, fused=fused))
    args[0], args[1], args[3], args[4] = a["x"], a["h0"], a["w_ih"], a["w_hh"]
    args[2] = a.get("c0")
    for i in (5, 6, 7):
        if args[i] is not None:
            args[i] = torch.randn_like(args[i])
    args[8] = a["lengths"]
    torch.library.opcheck(getattr(torch.ops.rnnfast_cuda, f"{cell}_forward").default, tuple(args))
    y, h_n, c_n, ws = getattr(torch.ops.rnnfast_cuda, f"{cell}_forward")(*args)
    up = _upstream(cell, 5, 3, 6, torch.float32)
    torch.library.opcheck(getattr(torch.ops.rnnfast_cuda, f"{cell}_backward_recurrent").default,
                          (up[0], up[1], up[2], a["w_hh"], ws, a["lengths"], True, 2))


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
def test_gpu_too_large_layers_are_refused(library):
    spec = _spec("lstm", device="cuda", dtype=torch.float32, H=64)
    assert backends.why_unavailable("cuda", spec) is None
    from rnnfast import dispatch

    row = dispatch.table().get(dispatch.key_of(dispatch.ModuleSpec.of_layer(spec, False)))
    assert backends.select("auto", spec) == (row.backend if row else "torch")  # measured, else torch
    big = _spec("lstm", device="cuda", dtype=torch.float64, H=8192)
    reason = backends.why_unavailable("cuda", big)
    assert reason is not None and "too large" in reason and "shared memory" in reason
    assert backends.select("auto", big) != "cuda"
    # The C++ side refuses too, rather than launching a grid that could not all be resident.
    a = _inputs("rnn_tanh", 2, 1, 1, 2048, torch.float64, seed=0, scale=0.01)
    with pytest.raises(RuntimeError, match="shared memory"):
        torch.ops.rnnfast_cuda.rnn_tanh_forward(a["x"], a["h0"], None, a["w_ih"], a["w_hh"], None, None, None, None,
                                                False, 2048, False)


@pytest.mark.gpu
def test_gpu_grid_barrier_measurement(library):
    """The barrier every step pays: its cost is measured (and printed) and every block passes every barrier."""
    us = rc.measure_grid_barrier(iters=2000, repeats=3)
    print(f"\ngrid barrier, one block per multiprocessor: {us:.2f} us")
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
