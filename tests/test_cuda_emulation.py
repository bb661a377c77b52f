"""The CPU emulation of the CUDA primitives (csrc/emulate.h, csrc/emulate.cpp), each primitive on its own.

The test kernels in tests/cuda_emulation/kernels.cu include csrc/primitives.cuh with ``-DRNNFAST_EMULATE`` and
are built with the host compiler, with the flags rnnfast/build.py uses, into a shared library together with
csrc/emulate.cpp (cached under pytest's cache, keyed on the sources). Every launch runs in a subprocess with a
timeout, so a scheduler that hangs fails the test instead of the run. Checked: the block barrier orders writes
and reads (and a kernel without it goes wrong), the grid barrier over 132 x 256 fibers and a grid of more than
32k threads, shuffles (butterfly sums bit for bit, every lane permutation, 4- and 8-byte and 16-bit types),
half_t/bf16_t rounding against torch and an exact reference, TF32 rounding, ldmatrix + mma.sync (16-bit and TF32)
against a float64 product in their register layouts, cp.async, the split-phase barrier, dynamic shared memory
poisoned and guarded, and every failure the emulation reports instead of hanging: deadlock (a spinning one too),
divergent warps, misaligned rows, an exception, a stack overflow, and refused launches.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnfast.testing import tf32_oracle

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
KERNELS = Path(__file__).resolve().parent / "cuda_emulation" / "kernels.cu"
# rnnfast/build.py's EMU_FLAGS, plus -Wextra, which the emulation's own files must pass cleanly.
FLAGS = ["-std=c++17", "-O1", "-g0", "-fPIC", "-fvisibility=hidden", "-DRNNFAST_EMULATE", "-Wall", "-Wextra",
         "-Wno-unknown-pragmas"]
RUN_TIMEOUT = 60  # seconds per subprocess; the slowest run here takes about one

# Runs one entry point of the test library: `python -c DRIVER lib name in.npz out.npz`, printing one JSON line.
DRIVER = r"""
import ctypes, json, sys
import numpy as np
lib, name, path_in, path_out = sys.argv[1:]
data = np.load(path_in)
bufs = [np.ascontiguousarray(data[f"b{i}"]) for i in range(int(data["count"]))]
ints = [int(v) for v in data["ints"]]
f = getattr(ctypes.CDLL(lib), "emu_" + name)
f.restype = ctypes.c_int
f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
ptrs = (ctypes.c_void_p * max(1, len(bufs)))(*[b.ctypes.data for b in bufs])
iv = (ctypes.c_longlong * max(1, len(ints)))(*ints)
err = ctypes.create_string_buffer(8192)
rc = f(ptrs, iv, err, len(err))
np.savez(path_out, *bufs)
print(json.dumps({"rc": rc, "error": err.value.decode(errors="replace")}))
"""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def _build(directory: Path, tag: str, extra: list[str]) -> tuple[Path, str]:
    """Compile emulate.cpp and kernels.cu (in parallel) and link them; returns the library and the warnings."""
    cxx = _compiler()
    sources = sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh")) + [CSRC / "emulate.cpp", KERNELS]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha1("\0".join([version, " ".join(FLAGS + extra)] + [p.read_text() for p in sources])
                       .encode()).hexdigest()[:16]
    out = directory / f"{tag}-{key}"
    lib, log = out / "libemu_tests.so", out / "warnings.txt"
    if lib.exists() and log.exists():
        return lib, log.read_text()
    out.mkdir(parents=True, exist_ok=True)
    base = [cxx] + FLAGS + extra + [f"-I{CSRC}", "-x", "c++", "-c"]
    jobs = [(src, out / f"{src.stem}.{os.getpid()}.o") for src in (CSRC / "emulate.cpp", KERNELS)]
    procs = [subprocess.Popen(base + [str(src), "-o", str(obj)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for src, obj in jobs]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, logs):
        if p.returncode != 0:
            pytest.fail(f"compiling the emulation test library failed:\n{text[-6000:]}")
    tmp = out / f"libemu_tests.{os.getpid()}.so"
    link = subprocess.run([cxx, "-shared", *[str(obj) for _, obj in jobs], "-o", str(tmp)], capture_output=True,
                          text=True)
    if link.returncode != 0:
        pytest.fail(f"linking the emulation test library failed:\n{link.stderr[-6000:]}")
    os.replace(tmp, lib)  # atomic: a concurrent session sees the old library or the new one
    (out / f"warnings.{os.getpid()}.txt").write_text("".join(logs))
    os.replace(out / f"warnings.{os.getpid()}.txt", log)
    for stale in directory.glob(f"{tag}-*"):  # builds of sources that have changed since
        if stale != out:
            shutil.rmtree(stale, ignore_errors=True)
    return lib, log.read_text()


def _build_dir(request, tmp_path_factory) -> Path:
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("cuda_emulation")) if cache is not None else tmp_path_factory.mktemp("cuda_emulation")


@pytest.fixture(scope="session")
def built(request, tmp_path_factory):
    """The test library (fibers switched by the x86-64 assembly where there is one) and the compiler warnings."""
    if _compiler() is None:
        pytest.skip("no host C++ compiler (g++ not on PATH and CXX not set): the CPU emulation cannot be built")
    return _build(_build_dir(request, tmp_path_factory), "asm", [])


@pytest.fixture(scope="session")
def lib(built):
    return built[0]


@pytest.fixture(scope="session")
def lib_ucontext(request, tmp_path_factory):
    """The same library with the portable fiber switch (swapcontext), as other architectures get."""
    if _compiler() is None:
        pytest.skip("no host C++ compiler (g++ not on PATH and CXX not set): the CPU emulation cannot be built")
    return _build(_build_dir(request, tmp_path_factory), "ucontext", ["-DRF_EMULATE_UCONTEXT"])[0]


class Run:
    def __init__(self, rc: int, error: str, bufs: list[np.ndarray]):
        self.rc, self.error, self.bufs = rc, error, bufs


def run(lib: Path, tmp_path: Path, name: str, bufs: list[np.ndarray], ints: list[int]) -> Run:
    """Call emu_<name>(bufs, ints) in a subprocess; the buffers come back as the kernel left them."""
    src, dst = tmp_path / f"{name}-in.npz", tmp_path / f"{name}-out.npz"
    np.savez(src, count=len(bufs), ints=np.array(ints, dtype=np.int64), **{f"b{i}": b for i, b in enumerate(bufs)})
    try:
        p = subprocess.run([sys.executable, "-c", DRIVER, str(lib), name, str(src), str(dst)], capture_output=True,
                           text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        p = None
    if p is None:
        pytest.fail(f"emu_{name}{ints} did not finish in {RUN_TIMEOUT} s: the emulation hung")
    if p.returncode != 0:
        pytest.fail(f"emu_{name}{ints} crashed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    out = np.load(dst)
    return Run(result["rc"], result["error"], [out[f"arr_{i}"] for i in range(len(bufs))])


def assert_fails(r: Run, *needles: str):
    assert r.rc == 1, f"expected a failed launch, got rc {r.rc} ({r.error!r})"
    for needle in needles:
        assert needle in r.error, f"{needle!r} not in the error: {r.error!r}"


def test_emulation_sources_compile_without_warnings(built):
    _, warnings = built
    ours = re.findall(r".*(?:emulate\.(?:h|cpp)|kernels\.cu):\d+:\d+: warning.*", warnings)
    assert not ours, "\n".join(ours)


# ------------------------------------------------------------------------------------------- sync_block ---

def test_sync_block_orders_writes_and_reads(lib, tmp_path):
    blocks, threads = 3, 96
    t = np.arange(threads)
    expected = (np.arange(blocks)[:, None] * 1000 + (t + 1) % threads).ravel().astype(np.int32)
    r = run(lib, tmp_path, "sync_block", [np.zeros(blocks * threads, np.int32)], [blocks, threads, 0])
    assert r.rc == 0, r.error
    np.testing.assert_array_equal(r.bufs[0], expected)
    # Without the barrier each thread runs to its end before its neighbour starts, and reads the poison.
    r = run(lib, tmp_path, "sync_block", [np.zeros(blocks * threads, np.int32)], [blocks, threads, 1])
    assert r.rc == 0, r.error
    wrong = r.bufs[0] != expected
    assert wrong.sum() == blocks * (threads - 1)
    assert (r.bufs[0][wrong] == -1).all()  # 0xFFFFFFFF: the neighbour's word not yet written


def test_cp_async_lands_in_shared_memory_for_the_block(lib, tmp_path):
    blocks, threads = 2, 96
    src = np.arange(blocks * threads, dtype=np.int32) * 7 + 1
    r = run(lib, tmp_path, "cp_async", [src, np.zeros(blocks * threads, np.int32)], [blocks, threads, 0, 0])
    assert r.rc == 0, r.error
    np.testing.assert_array_equal(r.bufs[1], np.roll(src.reshape(blocks, threads), 1, axis=1).ravel())


def test_cp_async16_copies_aligned_16_byte_chunks(lib, tmp_path):
    blocks, threads = 2, 64
    src = np.arange(blocks * threads * 4, dtype=np.int32) * 5 - 3
    r = run(lib, tmp_path, "cp_async", [src, np.zeros(src.size, np.int32)], [blocks, threads, 1, 0])
    assert r.rc == 0, r.error
    np.testing.assert_array_equal(r.bufs[1], np.roll(src.reshape(blocks, threads, 4), 1, axis=1).ravel())
    r = run(lib, tmp_path, "cp_async", [src, np.zeros(src.size, np.int32)], [blocks, threads, 1, 1])
    assert_fails(r, "cp_async16 needs 16-byte aligned addresses", "global 4 bytes", "block 0 thread 0")


def test_sync_block_separates_the_levels_of_a_tree_sum(lib, tmp_path):
    blocks, threads = 2, 256
    x = np.random.default_rng(1).integers(-1000, 1000, blocks * threads).astype(np.int32)
    r = run(lib, tmp_path, "tree_sum", [x, np.zeros(blocks, np.int32)], [blocks, threads, 0])
    assert r.rc == 0, r.error
    np.testing.assert_array_equal(r.bufs[1], x.reshape(blocks, threads).sum(1))
    r = run(lib, tmp_path, "tree_sum", [x, np.zeros(blocks, np.int32)], [blocks, threads, 1])
    assert r.rc == 0, r.error
    assert (r.bufs[1] != x.reshape(blocks, threads).sum(1)).all()


# -------------------------------------------------------------------------------------------- sync_grid ---

def grid_exchange_reference(n: int, rounds: int) -> np.ndarray:
    gid = np.arange(n, dtype=np.uint64)
    v = gid.copy()
    for r in range(rounds):
        v = (v * 3 + v[(gid + 257 * (r + 1)) % n]) % 2**32
    return v.astype(np.uint32)


def grid_exchange(lib, tmp_path, blocks, threads, rounds, barrier=0):
    """barrier: 0 sync_grid, 1 the split-phase one on a counter, 2 on one flag a block."""
    n = blocks * threads
    r = run(lib, tmp_path, "sync_grid", [np.zeros(2 * n, np.uint32), np.zeros(n, np.uint32), np.zeros(1),
                                         np.zeros(blocks, np.uint32)], [blocks, threads, rounds, barrier])
    assert r.rc == 0, r.error
    np.testing.assert_array_equal(r.bufs[1], grid_exchange_reference(n, rounds))
    if barrier == 1:
        assert r.bufs[3][0] == blocks * rounds, "every block arrives once a round"
    if barrier == 2:
        assert (r.bufs[3] == rounds).all(), "every block raises its flag once a round"
    return float(r.bufs[2][0])


def test_sync_grid_over_the_full_grid(lib, tmp_path):
    # 132 blocks x 256 threads, the layer kernels' grid on an H100/H200: blocks trade values every round.
    seconds = grid_exchange(lib, tmp_path, 132, 256, 8)
    print(f"\n132 x 256 fibers, 8 grid barriers: {seconds:.2f} s")


@pytest.mark.parametrize("barrier", [1, 2], ids=["counter", "flags"])
def test_split_phase_barriers_over_the_full_grid(lib, tmp_path, barrier):
    # The same exchange through rf::grid_arrive / grid_wait on a counter (thread 0 of each block spins), or
    # rf::flag_arrive / flag_wait on one flag a block (a thread of each block spins on each flag).
    seconds = grid_exchange(lib, tmp_path, 132, 256, 8, barrier=barrier)
    print(f"\n132 x 256 fibers, 8 split-phase barriers: {seconds:.2f} s")


def test_a_grid_of_more_than_32k_threads_runs(lib, tmp_path):
    # OS threads run out near 32k; fibers do not. 40,960 threads through 50 grid barriers.
    seconds = grid_exchange(lib, tmp_path, 160, 256, 50)
    print(f"\n160 x 256 fibers, 50 grid barriers: {seconds:.2f} s")
    assert seconds < 30, "the scheduler is far slower than it should be (about 0.5 s here)"


# --------------------------------------------------------------------------------------------- clusters ---

@pytest.mark.parametrize("cluster", [1, 2, 4, 8])
def test_blocks_of_a_cluster_write_each_others_shared_memory(lib, tmp_path, cluster):
    """map_shared reaches the same place in every block of the cluster, and cluster_sync orders those writes
    before the reads: every block sees the index of each block of its own cluster in that block's rank's slot."""
    blocks, threads = 16, 64
    r = run(lib, tmp_path, "cluster", [np.full(blocks * cluster, -1, np.int32)], [blocks, threads, cluster, 0])
    assert r.rc == 0, r.error
    b = np.arange(blocks)[:, None]
    np.testing.assert_array_equal(r.bufs[0].reshape(blocks, cluster), b // cluster * cluster + np.arange(cluster))


def test_cluster_failures_are_reported(lib, tmp_path):
    r = run(lib, tmp_path, "cluster", [np.zeros(8, np.int32)], [4, 32, 2, 1])  # block 1 leaves before the barrier
    assert_fails(r, "cluster_sync")
    r = run(lib, tmp_path, "cluster", [np.zeros(8, np.int32)], [4, 32, 2, 2])  # rank 2 of a cluster of 2
    assert_fails(r, "map_shared: rank 2 of a cluster of 2 blocks")
    r = run(lib, tmp_path, "cluster", [np.zeros(9, np.int32)], [3, 32, 2, 0])  # 3 blocks in clusters of 2
    assert_fails(r, "clusters of 2 blocks must divide the grid of 3")


# --------------------------------------------------------------------------------------------- shfl_xor ---

def butterfly(v: np.ndarray) -> np.ndarray:
    """Every lane's v += shfl_xor(v, o) for o = 16, 8, 4, 2, 1, in v's precision: the emulation's bits."""
    w = v.reshape(-1, 32)
    lanes = np.arange(32)
    for o in (16, 8, 4, 2, 1):
        w = w + w[:, lanes ^ o]
    return w.ravel()


def test_shfl_xor_butterfly_sum_and_every_lane_permutation(lib, tmp_path):
    blocks, threads = 2, 128
    n = blocks * threads
    rng = np.random.default_rng(2)
    xf = rng.standard_normal(n).astype(np.float32)
    xd = rng.standard_normal(n)
    bufs = [xf, np.zeros(n, np.float32), xd, np.zeros(n), np.zeros(n * 32, np.int32), np.zeros(n * 32, np.uint32),
            np.zeros(n * 32, np.int64), np.zeros(n * 32, np.uint16)]
    r = run(lib, tmp_path, "shfl", bufs, [blocks, threads])
    assert r.rc == 0, r.error
    _, out_f, _, out_d, perm_i, perm_u, perm_ll, perm_h = r.bufs
    np.testing.assert_array_equal(out_f, butterfly(xf))
    np.testing.assert_array_equal(out_d, butterfly(xd))
    # Every lane holds the warp's total (to rounding: the butterfly adds in a different order on each lane).
    np.testing.assert_allclose(out_d.reshape(-1, 32), np.repeat(xd.reshape(-1, 32).sum(1, keepdims=True), 32, 1),
                               rtol=1e-12, atol=1e-12)
    gid = np.arange(n)[:, None]
    src = (gid & ~31) | ((gid & 31) ^ np.arange(32)[None, :])  # lane L reads lane L ^ mask
    np.testing.assert_array_equal(perm_i.reshape(n, 32), src)
    np.testing.assert_array_equal(perm_u.reshape(n, 32), (~src.astype(np.uint32)).astype(np.uint32))
    np.testing.assert_array_equal(perm_ll.reshape(n, 32), src.astype(np.int64) * 2**33 + 7)
    half_bits = torch.from_numpy((src % 2048).astype(np.float32)).half().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(perm_h.reshape(n, 32), half_bits)


# ---------------------------------------------------------------------------------------- half_t, bf16_t ---

FORMATS = {"half": (torch.float16, 0x7C00), "bf16": (torch.bfloat16, 0x7F80)}


def format_values(fmt: str) -> np.ndarray:
    """Every non-negative finite value of the format, then inf's stand-in 2^(emax+1), as float64 (exact)."""
    dtype, inf_bits = FORMATS[fmt]
    bits = torch.arange(inf_bits + 1, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).double().numpy().copy()
    values[-1] = 65536.0 if fmt == "half" else 2.0**128
    return values


def exact_rounding(x, fmt: str) -> np.ndarray:
    """The bits of x (float64 array, or Python ints) rounded to nearest, ties to even, from the exact value."""
    table = format_values(fmt)
    x_list = list(x)
    out = np.zeros(len(x_list), np.uint16)
    for i, v in enumerate(x_list):
        if isinstance(v, float) and v != v:
            out[i] = 0x7FFF
            continue
        neg = (v < 0) or (isinstance(v, float) and v == 0 and np.signbit(v))
        a = abs(Fraction(v)) if not (isinstance(v, float) and np.isinf(v)) else None
        if a is None or a >= Fraction(table[-1]):
            idx = len(table) - 1
        else:
            lo = int(np.searchsorted(table, float(a), side="right")) - 1  # float(a) is only a hint
            while Fraction(table[lo]) > a:
                lo -= 1
            while Fraction(table[lo + 1]) <= a:
                lo += 1
            mid = (Fraction(table[lo]) + Fraction(table[lo + 1])) / 2
            idx = lo + 1 if a > mid or (a == mid and lo % 2 == 1) else lo
        out[i] = idx | (0x8000 if neg else 0)
    return out


def torch_bits(x: np.ndarray, fmt: str) -> np.ndarray:
    return torch.from_numpy(x).to(FORMATS[fmt][0]).view(torch.int16).numpy().view(np.uint16)


def is_nan_bits(bits: np.ndarray, fmt: str) -> np.ndarray:
    inf = FORMATS[fmt][1]
    return (bits & 0x7FFF) > inf


def assert_same_rounding(got: np.ndarray, want: np.ndarray, fmt: str, x, what: str):
    nan = is_nan_bits(want, fmt)
    np.testing.assert_array_equal(is_nan_bits(got, fmt), nan, err_msg=f"{what}: NaN must stay NaN")
    bad = np.nonzero((got != want) & ~nan)[0]
    assert bad.size == 0, (f"{what}: {bad.size} values round wrongly, e.g. {[x[i] for i in bad[:4]]} -> "
                           f"{[hex(got[i]) for i in bad[:4]]}, expected {[hex(want[i]) for i in bad[:4]]}")


def conversion_inputs():
    rng = np.random.default_rng(3)
    f = [rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)]
    for fmt in FORMATS:
        v = format_values(fmt)[:-1]
        mids = (v[:-1] + v[1:]) / 2  # every tie, exact in float32
        mids32 = mids.astype(np.float32)
        f += [v.astype(np.float32), mids32, np.nextafter(mids32, np.float32(np.inf)),
              np.nextafter(mids32, np.float32(0))]
    f.append(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 65504, 65519.996, 65520, 3.4e38, -3.4e38,
                       2**-24, 2**-25, 2**-25 * 1.0000001, 2**-26, 1e-45, 2**-133, 2**-134, 2**-134 * 1.5],
                      np.float32))
    xf = np.concatenate(f)
    xf = np.concatenate([xf, -xf])
    # Doubles: ties of both formats nudged by far less than a float's ulp, which a float in between would lose.
    d = []
    for fmt in FORMATS:
        v = format_values(fmt)[:-1]
        mids = ((v[:-1] + v[1:]) / 2)[rng.integers(0, len(v) - 1, 1500)]
        d += [mids, mids * (1 + 2.0**-40), mids * (1 - 2.0**-40)]
    d += [rng.standard_normal(1000) * 10.0 ** rng.integers(-10, 10, 1000),
          np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e300, -1e300, 1e-300, 5e-324, 65520.0, 65519.99999999,
                    2.0**-25, 2.0**-25 * (1 + 2.0**-50)])]
    xd = np.concatenate(d)
    # Integers: around the half overflow, and past 2^53, where a double in between would round.
    big = [2**60 + 2**52 + 1, 2**60 + 2**52, 2**60 + 2**52 - 1, 3 * 2**55 + 2**47, 3 * 2**55 + 2**47 + 1,
           2**63 - 1, -(2**63), -(2**60 + 2**52 + 1)]
    xi = np.concatenate([rng.integers(-2**31, 2**31, 2000), rng.integers(-2**62, 2**62, 500),
                         np.arange(65500, 65530), -np.arange(65500, 65530), np.array(big, dtype=np.int64)])
    return xf, xd, xi.astype(np.int64)


def test_half_and_bf16_conversions_round_like_cuda(lib, tmp_path):
    xf, xd, xi = conversion_inputs()
    outs = [np.zeros(len(x), np.uint16) for x in (xf, xf, xd, xd, xi, xi, xi)]
    outs += [np.zeros(65536, np.float32) for _ in range(2)]
    r = run(lib, tmp_path, "convert", [xf, xd, xi] + outs, [len(xf), len(xd), len(xi)])
    assert r.rc == 0, "half_t(0), half_t(1.5f), from_float or to_float gave the wrong bits"
    h_f, b_f, h_d, b_d, h_i, b_i, h_i32, h2f, b2f = r.bufs[3:]
    # From float: torch's float32 -> float16/bfloat16 (round to nearest even, subnormals, overflow to inf).
    assert_same_rounding(h_f, torch_bits(xf, "half"), "half", xf, "half_t(float)")
    assert_same_rounding(b_f, torch_bits(xf, "bf16"), "bf16", xf, "bf16_t(float)")
    # From double: one rounding, as CUDA's __double2half (torch goes through float, so the exact reference here).
    want_hd = exact_rounding([float(v) for v in xd], "half")
    assert_same_rounding(h_d, want_hd, "half", xd, "half_t(double)")
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(want_hd[~np.isnan(xd)],
                                      xd[~np.isnan(xd)].astype(np.float16).view(np.uint16))  # numpy agrees
        exact_f = np.isfinite(xd) & (xd.astype(np.float32).astype(np.float64) == xd)  # floats: torch agrees too
    assert_same_rounding(b_d, exact_rounding([float(v) for v in xd], "bf16"), "bf16", xd, "bf16_t(double)")
    np.testing.assert_array_equal(h_d[exact_f], torch_bits(xd[exact_f].astype(np.float32), "half"))
    # From integers (int64 and int), exactly rounded.
    ints = [int(v) for v in xi]
    assert_same_rounding(h_i, exact_rounding(ints, "half"), "half", ints, "half_t(long long)")
    assert_same_rounding(b_i, exact_rounding(ints, "bf16"), "bf16", ints, "bf16_t(long long)")
    i32 = [int(np.sign(v)) * (abs(v) % 100000) for v in ints]  # C's % truncates toward zero
    assert_same_rounding(h_i32, exact_rounding(i32, "half"), "half", i32, "half_t(int)")
    # To float: every bit pattern, against torch.
    pattern = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for got, dtype, fmt in ((h2f, torch.float16, "half"), (b2f, torch.bfloat16, "bf16")):
        want = pattern.view(dtype).float().numpy()
        nan = np.isnan(want)
        np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{fmt} -> float: NaN must stay NaN")
        np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32),
                                      err_msg=f"{fmt} -> float")


# ------------------------------------------------------------------------------------------ tensor cores ---

def tf32_rna(v: np.ndarray) -> np.ndarray:
    return tf32_oracle(torch.from_numpy(v)).numpy()


def test_float_to_tf32_rounds_to_nearest_ties_away(lib, tmp_path):
    """cvt.rna.tf32.f32 on random values, exact ties of both signs, values that round into the next binade, the
    largest float (to inf), subnormals, zeros, inf and NaN."""
    g = np.random.default_rng(5)
    one = np.float32(1.0).view(np.uint32)
    ties = np.array([one | 0x1000, one | 0x3000, (one | 0x1000) | 0x80000000, one | 0x0FFF, one | 0x1FFF,
                     0x3FFFF000, 0x7F7FFFFF, 0x00001000, 0x00003000, 0x807FFFFF], dtype=np.uint32).view(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, -3e-39], dtype=np.float32)
    v = np.concatenate([(g.standard_normal(4000) * 10.0 ** g.integers(-30, 30, 4000)).astype(np.float32), ties,
                        special])
    r = run(lib, tmp_path, "tf32", [v.copy()], [v.size])
    got = r.bufs[0]
    want = tf32_rna(v)
    assert got[4000 + 6] == np.inf  # the largest float rounds up
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    nan = run(lib, tmp_path, "tf32", [np.array([np.nan], dtype=np.float32)], [1]).bufs[0]
    assert np.isnan(nan).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_ldmatrix_and_mma_m16n8k16_match_a_float64_product(lib, tmp_path, dtype):
    """D = A B + C for A 16 x 48 and B 48 x 8 (given as B^T, the layer kernels' W[n][k]) through ldmatrix and
    mma.sync in their PTX register layouts, rows padded by 8 elements as the kernels pad them."""
    g = torch.Generator().manual_seed(3)
    k, ld = 48, 56
    A = torch.randn(16, k, generator=g).to(dtype)
    Bt = torch.randn(8, k, generator=g).to(dtype)
    C = torch.randn(16, 8, generator=g)
    a_mem = torch.full((16, ld), float("nan"), dtype=dtype)
    a_mem[:, :k] = A
    b_mem = torch.full((8, ld), float("nan"), dtype=dtype)
    b_mem[:, :k] = Bt
    bits = lambda t: t.contiguous().view(torch.int16).numpy().view(np.uint16).copy()  # noqa: E731
    bufs = [bits(a_mem), bits(b_mem), C.numpy().copy(), np.full(128, np.nan, np.float32)]
    r = run(lib, tmp_path, "mma", bufs, [0 if dtype == torch.float16 else 1, k, ld, ld, 0])
    assert r.rc == 0, r.error
    D = torch.from_numpy(r.bufs[3]).view(16, 8).double()
    ref = A.double() @ Bt.double().t() + C.double()
    bound = (A.double().abs() @ Bt.double().abs().t() + C.double().abs()) * 2.0**-18
    assert ((D - ref).abs() <= bound).all(), f"max error {(D - ref).abs().max():.3g}"
    r = run(lib, tmp_path, "mma", bufs, [0, k, ld, ld, 4])  # A's rows 8 bytes off 16
    assert_fails(r, "ldmatrix", "not 16-byte aligned")


def test_mma_m16n8k8_tf32_matches_a_float64_product(lib, tmp_path):
    """The TF32 mma in its PTX register layout from float32 operands: rounded with to_tf32, the product is that of
    the rounded operands (tf32_oracle); unconverted, the tensor core reads the operands truncated."""
    g = torch.Generator().manual_seed(4)
    k = 40
    A, Bt, C = torch.randn(16, k, generator=g), torch.randn(8, k, generator=g), torch.randn(16, 8, generator=g)
    bufs = [A.numpy().copy(), Bt.numpy().copy(), C.numpy().copy(), np.full(128, np.nan, np.float32)]
    bound = (A.double().abs() @ Bt.double().abs().t() + C.double().abs()) * 2.0**-18
    truncate = lambda t: torch.from_numpy((t.numpy().view(np.uint32) & 0xFFFFE000).view(np.float32))  # noqa: E731
    for kind, rounding in ((2, tf32_oracle), (3, truncate)):
        r = run(lib, tmp_path, "mma", bufs, [kind, k, k, k, 0])
        assert r.rc == 0, r.error
        D = torch.from_numpy(r.bufs[3]).view(16, 8).double()
        ref = rounding(A).double() @ rounding(Bt).double().t() + C.double()
        assert ((D - ref).abs() <= bound).all(), f"kind {kind}: max error {(D - ref).abs().max():.3g}"
        assert ((D - (A.double() @ Bt.double().t() + C.double())).abs() > bound).any()  # not float32's product


# ----------------------------------------------------------------------------------- dynamic shared memory ---

def smem(lib, tmp_path, mode, write_at=0, writer=(0, 0), blocks=3, threads=64, nbytes=1000):
    bufs = [np.zeros(2 * blocks * nbytes, np.uint8), np.full(blocks, -1, np.int32)]
    return run(lib, tmp_path, "smem", bufs, [blocks, threads, nbytes, mode, write_at, *writer])


def test_dynamic_smem_starts_poisoned_at_every_launch(lib, tmp_path):
    r = smem(lib, tmp_path, 0)  # two launches; the first scribbles zeros over its memory at the end
    assert r.rc == 0, r.error
    assert (r.bufs[0] == 0xFF).all(), "dynamic shared memory must start as 0xFF bytes at every launch"
    assert (r.bufs[1] == 0).all(), "dynamic shared memory must be 128-byte aligned"


def test_dynamic_smem_overrun_is_reported(lib, tmp_path):
    assert smem(lib, tmp_path, 1, write_at=999, writer=(2, 37)).rc == 0  # the last byte is the block's
    # One past the end: found when the writer reaches its barrier, so the thread is named.
    assert_fails(smem(lib, tmp_path, 1, write_at=1000, writer=(2, 37)), "block 2 thread 37", "overrun")
    # Far past: found by the check of every guard byte after the launch.
    assert_fails(smem(lib, tmp_path, 1, write_at=3000, writer=(1, 5)), "block 1", "overrun", "bytes 3000 to 3000")
    assert_fails(smem(lib, tmp_path, 1, write_at=-1, writer=(0, 9)), "block 0 thread 9", "underrun")
    assert_fails(smem(lib, tmp_path, 1, write_at=-2000, writer=(0, 9)), "block 0", "underrun", "bytes -2000 to -2000")


# ---------------------------------------------------------------------------- failures, never a hang ---

FAILURES = {
    # mode: (blocks, threads, words in the error)
    "thread 0 skips sync_block": (0, 2, 64, ["sync_block", "block 0 thread 0 has exited"]),
    "block 1 skips sync_grid": (1, 3, 64, ["block 1 thread 0 exited while 64 threads of the grid wait at sync_grid"]),
    "a lane shuffles while its warp waits at sync_block": (2, 1, 64, ["block 0 thread 3", "shfl_xor",
                                                                       "3 lanes of its warp wait"]),
    "a warp waits at sync_block while a lane shuffles": (9, 1, 64, ["block 0 thread 1: reaches sync_block while 1 "
                                                                     "lanes of its warp wait at shfl_xor"]),
    "half a warp shuffles, half multiplies": (3, 1, 32, ["different warp collectives", "shfl_xor", "mma_m16n8k16"]),
    "warps split between sync_grid and sync_block": (4, 1, 256, ["deadlock", "threads 0-127 wait at sync_grid",
                                                                  "threads 128-255 wait at sync_block"]),
    "the kernel throws": (5, 1, 64, ["block 0 thread 7", "thrown by the test kernel"]),
    "a lane exits while its warp shuffles": (6, 1, 64, ["block 0 thread 63 exited", "31 lanes of its warp wait at "
                                                                                     "shfl_xor"]),
    "shuffles in a block of 48 threads": (7, 1, 48, ["whole warps", "48"]),
    "a stack overflow": (8, 1, 32, ["stack overflow"]),
    "block 1 never arrives at the split-phase barrier": (11, 3, 64, ["deadlock", "spin on a flag", "grid_arrive"]),
    "half a warp leaves before an mma": (12, 1, 32, ["mma_m16n8k16", "exited"]),
    "block 1 never raises its flag": (13, 3, 64, ["deadlock", "spin on a flag"]),
}


@pytest.mark.parametrize("case", list(FAILURES), ids=[c.replace(" ", "-") for c in FAILURES])
def test_failures_are_reported_not_hung(lib, tmp_path, case):
    mode, blocks, threads, words = FAILURES[case]
    r = run(lib, tmp_path, "fail", [np.zeros(threads, np.int32), np.zeros(1)], [mode, blocks, threads])
    assert r.rc != 3, f"the next launch after the failed one did not run right: {r.error}"
    assert_fails(r, *words)
    assert r.bufs[1][0] < 10, f"the failure took {r.bufs[1][0]:.1f} s to find"


def test_a_warp_spinning_on_another_warps_flag_gets_it(lib, tmp_path):
    # On a GPU, warps run side by side; here a warp's lanes run on while they are in cache, but not forever.
    r = run(lib, tmp_path, "fail", [np.zeros(64, np.int32), np.zeros(1)], [10, 1, 64])
    assert r.rc == 0, r.error
    assert r.bufs[0][1] == 1, "warp 0 was meant to spin at least once"


@pytest.mark.parametrize("which,words", [(0, ["empty grid"]), (1, ["2048 threads per block"]),
                                         (2, ["inside a kernel"]), (3, ["rf::sync_block called outside"])],
                         ids=["empty-grid", "too-many-threads", "nested-launch", "barrier-outside-a-launch"])
def test_refusals(lib, tmp_path, which, words):
    assert_fails(run(lib, tmp_path, "refuse", [], [which]), *words)


# --------------------------------------------------------------------------------------- ucontext ---

def test_the_portable_fiber_switch_too(lib_ucontext, tmp_path):
    # The build other architectures get (swapcontext): the grid barrier, a deadlock and a stack overflow.
    grid_exchange(lib_ucontext, tmp_path, 132, 256, 4)
    for case in ("thread 0 skips sync_block", "a stack overflow"):
        mode, blocks, threads, words = FAILURES[case]
        r = run(lib_ucontext, tmp_path, "fail", [np.zeros(threads, np.int32), np.zeros(1)], [mode, blocks, threads])
        assert r.rc != 3, r.error
        assert_fails(r, *words)
