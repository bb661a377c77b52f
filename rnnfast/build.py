"""Build the CUDA library of ``csrc/`` (ninja, cached) and its CPU emulation, and say where they are.

Two shared libraries from the same kernel source, both free of torch (a C ABI, ``csrc/capi.h``, called with
ctypes), so a build loads under any torch and can be made on a machine without a GPU and carried to one:

- ``librnnfast_cuda.so``: nvcc, for the GPU; the CUDA runtime is linked statically, so it needs only a driver;
- ``librnnfast_emu.so``: the host compiler with ``-DRNNFAST_EMULATE`` (``csrc/emulate.h``), the CPU execution mode
  that ``RNNFAST_CUDA_EMULATE=1`` selects: every CUDA thread a fiber.

``python -m rnnfast.build`` builds the GPU library ahead of time and prints its path (``--emulate``: the emulation's;
``--report``: also what the compiler made of each kernel, and the anchors' plans); otherwise the ``cuda`` backend
builds on first use. Every build setting is read here, and only here:

- ``RNNFAST_CUDA_ARCHS``: compute capabilities to compile for, e.g. ``"80;90"`` or ``"8.0 9.0"`` (default: the
  GPUs found plus 8.0 and 9.0; PTX of the highest is embedded too, for newer GPUs).
- ``RNNFAST_BUILD_DIR``: where builds are cached (default ``$XDG_CACHE_HOME/rnnfast`` or ``~/.cache/rnnfast``);
  each toolkit / architecture / checkout combination gets its own subdirectory.
- ``CUDA_HOME`` (or ``CUDA_PATH``): the CUDA toolkit; default ``/usr/local/cuda``, else the ``nvcc`` on ``PATH``.
- ``CXX``: the host compiler of the emulation (default ``c++``, else ``g++``).

rnnfast writes the ``build.ninja`` and runs ninja. Each build folder is named by a hash of the sources, headers and
flags, so a changed source builds into a new folder and a library found in its folder is current (one built on
another machine and carried over is used as is). A lock file makes two processes building at once take turns; the
second finds the library built.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging import version

ENV_ARCHS = "RNNFAST_CUDA_ARCHS"
ENV_BUILD_DIR = "RNNFAST_BUILD_DIR"
GPU_LIBRARY = "librnnfast_cuda.so"
EMU_LIBRARY = "librnnfast_emu.so"
KERNEL_SOURCES = ("capi.cu", "rnn_tanh.cu", "rnn_relu.cu", "gru.cu", "lstm.cu", "barrier.cu")
EMU_SOURCES = ("emulate.cpp",)
HEADERS = ("capi.h", "rnnfast.h", "layer.cuh", "primitives.cuh", "emulate.h")
# The kernels use cooperative grid barriers and bfloat16, and are only tuned for Ampere and newer.
MIN_ARCH = 80
DEFAULT_ARCHS = (80, 90)
# sm_90 needs CUDA 11.8; the GPU machine has 13.0.
MIN_CUDA = version.Version("11.8")


def source_dir() -> Path:
    """``csrc/`` next to the package: present in a source checkout and an editable install."""
    return Path(__file__).resolve().parent.parent / "csrc"


def sources_problem(emulate: bool = False) -> str | None:
    names = KERNEL_SOURCES + HEADERS + (EMU_SOURCES if emulate else ())
    missing = [name for name in names if not (source_dir() / name).is_file() and (emulate or name != "emulate.h")]
    if missing:
        return (f"the CUDA sources are not installed (looked for {', '.join(missing)} in {source_dir()}); "
                "install rnnfast from a source checkout in editable mode (pip install -e .)")
    return None


def cuda_home() -> str | None:
    """The CUDA toolkit root, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # A wrapper script on PATH (e.g. /usr/local/bin/nvcc) says nothing about where the libraries are.
    root = Path(nvcc).resolve().parent.parent
    return str(root) if (root / "include" / "cuda_runtime.h").exists() else None


@functools.cache
def nvcc_version(home: str) -> version.Version | None:
    try:
        out = subprocess.run([str(Path(home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return version.Version(m.group(1)) if m else None


def _ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the pip package puts the binary next to the interpreter

        return str(Path(ninja.BIN_DIR) / "ninja")
    except (ImportError, AttributeError):
        return None


def toolchain_problem() -> str | None:
    """None when the GPU library can be built (or is built) here, else the reason it cannot."""
    problem = sources_problem()
    if problem:
        return problem
    home = cuda_home()
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        return "nvcc was not found: install the CUDA toolkit and set CUDA_HOME (e.g. CUDA_HOME=/usr/local/cuda)"
    found = nvcc_version(home)
    if found is None:
        return f"{Path(home) / 'bin' / 'nvcc'} --version did not say its release"
    if found < MIN_CUDA:
        return f"nvcc {found} is too old; the kernels need CUDA {MIN_CUDA} or newer"
    if _ninja() is None:
        return "ninja is not installed (pip install ninja)"
    return None


def host_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def emulation_problem() -> str | None:
    """None when the CPU emulation library can be built here, else the reason it cannot."""
    problem = sources_problem(emulate=True)
    if problem:
        return problem
    if host_compiler() is None:
        return "no host C++ compiler was found (set CXX, or install g++)"
    if _ninja() is None:
        return "ninja is not installed (pip install ninja)"
    return None


def parse_archs(text: str) -> list[int]:
    """``"8.0;9.0"``, ``"80 90"``, ``"sm_90,8.6"`` -> ``[80, 86, 90]``."""
    archs = set()
    for token in re.split(r"[;,\s]+", text.strip()):
        if not token:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?", token)
        if m is None:
            raise ValueError(f"{ENV_ARCHS}: cannot read {token!r}; write capabilities like '8.0;9.0' or '80;90'")
        cap = int(m.group(1)) * 10 + int(m.group(2)) if m.group(2) is not None else int(m.group(1))
        if cap < MIN_ARCH:
            raise ValueError(f"{ENV_ARCHS}: sm_{cap} is below sm_{MIN_ARCH}, the oldest GPU the kernels support")
        archs.add(cap)
    if not archs:
        raise ValueError(f"{ENV_ARCHS} is set but names no architecture")
    return sorted(archs)


def target_archs() -> list[int]:
    text = os.environ.get(ENV_ARCHS, "")
    if text.strip():
        return parse_archs(text)
    found = set(DEFAULT_ARCHS)
    torch = sys.modules.get("torch")  # the GPUs present, when torch is loaded; the build itself needs no torch
    if torch is not None and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            if major * 10 + minor >= MIN_ARCH:
                found.add(major * 10 + minor)
    return sorted(found)


def nvcc_flags(archs: list[int]) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # PTX of the highest architecture, which the driver compiles for GPUs newer than any listed.
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags + ["-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
                    "-Xcompiler", "-fvisibility=hidden"]


# The emulation: every CUDA thread a fiber on one OS thread. -O1 keeps the build quick; the tests run small grids.
EMU_FLAGS = ["-std=c++17", "-O1", "-g0", "-fPIC", "-fvisibility=hidden", "-DRNNFAST_EMULATE", "-Wall",
             "-Wno-unknown-pragmas"]


def _cache_root() -> Path:
    base = os.environ.get(ENV_BUILD_DIR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "rnnfast")
    return Path(base)


def _sources_key(emulate: bool) -> str:
    """A hash of what the library is made of: every source and header, and the flags. A folder named by it holds
    exactly one build, so a library built on another machine and carried over (bench/gpu_run.sh) is used as is."""
    h = hashlib.sha256()
    names = KERNEL_SOURCES + HEADERS + (EMU_SOURCES if emulate else ())
    for name in sorted(n for n in names if emulate or n != "emulate.h"):
        path = source_dir() / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    h.update(" ".join(EMU_FLAGS if emulate else nvcc_flags(target_archs())).encode())
    return h.hexdigest()[:12]


def build_dir(archs: list[int] | None = None, *, emulate: bool = False) -> Path:
    """The build folder of the GPU library for ``archs`` (default: :func:`target_archs`), or of the emulation."""
    if emulate:
        key = f"emu-{Path(host_compiler() or 'cxx').name}-{_sources_key(True)}"
    else:
        archs = archs or target_archs()
        home = cuda_home()
        nvcc = nvcc_version(home) if home else None
        key = f"cuda{nvcc or 'none'}-sm{'_'.join(map(str, archs))}-{_sources_key(False)}"
    return _cache_root() / re.sub(r"[^A-Za-z0-9._-]", "_", key)


def _q(path) -> str:
    return str(path).replace(" ", "$ ").replace(":", "$:")


def write_ninja(directory: Path, *, emulate: bool) -> Path:
    """Write ``build.ninja`` for one library into ``directory``; returns the library's path."""
    src = source_dir()
    headers = " ".join(_q(src / h) for h in HEADERS if emulate or h != "emulate.h")
    lines = ["ninja_required_version = 1.3"]
    objects = []
    if emulate:
        cxx = host_compiler()
        flags = " ".join(EMU_FLAGS + [f"-I{src}"])
        lines += [f"cxx = {cxx}", f"flags = {flags}",
                  "rule compile", "  command = $cxx $flags -x c++ -c $in -o $out", "  description = emulation $in",
                  "rule link", "  command = $cxx -shared $in -o $out", "  description = link $out"]
        for name in KERNEL_SOURCES + EMU_SOURCES:
            obj = f"{name}.o"
            lines.append(f"build {obj}: compile {_q(src / name)} | {headers}")
            objects.append(obj)
        library = EMU_LIBRARY
    else:
        home = Path(cuda_home())
        flags = " ".join(nvcc_flags(target_archs()) + [f"-I{src}"])
        lines += [f"nvcc = {home / 'bin' / 'nvcc'}", f"flags = {flags}",
                  "rule compile", "  command = $nvcc $flags -c $in -o $out", "  description = nvcc $in",
                  # Static CUDA runtime: the library needs a driver, not a libcudart of one version.
                  "rule link", "  command = $nvcc -shared -cudart static $in -o $out", "  description = link $out"]
        for name in KERNEL_SOURCES:
            obj = f"{name}.o"
            lines.append(f"build {obj}: compile {_q(src / name)} | {headers}")
            objects.append(obj)
        library = GPU_LIBRARY
    lines.append(f"build {library}: link {' '.join(objects)}")
    lines.append(f"default {library}")
    text = "\n".join(lines) + "\n"
    path = directory / "build.ninja"
    if not path.exists() or path.read_text() != text:  # an unchanged file keeps ninja's state
        path.write_text(text)
    return directory / library


def build(*, emulate: bool = False, verbose: bool = False) -> str:
    """Build one library if needed; returns its path. Raises RuntimeError with the reason when it cannot."""
    problem = emulation_problem() if emulate else toolchain_problem()
    if problem:
        raise RuntimeError(f"cannot build the rnnfast {'CUDA emulation' if emulate else 'CUDA'} library: {problem}")
    directory = build_dir(emulate=emulate)
    library = directory / (EMU_LIBRARY if emulate else GPU_LIBRARY)
    if library.is_file():  # the folder is named by the sources' hash: a library there is current
        return str(library)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the library built
        if not library.is_file():
            write_ninja(directory, emulate=emulate)
            what = "the CPU emulation of the CUDA kernels" if emulate else "the CUDA kernels"
            print(f"rnnfast: building {what} in {directory} (a minute or two, once)", file=sys.stderr, flush=True)
            out = subprocess.run([_ninja(), "-C", str(directory)] + (["-v"] if verbose else []),
                                 capture_output=not verbose, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"building {library.name} failed:\n{(out.stdout or '')[-6000:]}"
                                   f"{(out.stderr or '')[-2000:]}")
    return str(library)


# -- what the compiler made of the kernels -------------------------------------------------------------------------

CELL_NAMES = ("rnn_tanh", "rnn_relu", "gru", "lstm")  # csrc/rnnfast.h's cell ids
# How a kernel's mangled name spells its layer dtype (the first template argument).
_MANGLED_DTYPES = (("I13__nv_bfloat16", "bf16"), ("I6__half", "f16"), ("Iff", "f32"), ("Idd", "f64"))


def cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the one Triton ships, else the one on PATH."""
    home = cuda_home()
    for candidate in ([Path(home) / "bin" / "cuobjdump"] if home else []) + [_triton_tool("cuobjdump")]:
        if candidate is not None and candidate.exists():
            return str(candidate)
    return shutil.which("cuobjdump")


def _triton_tool(name: str) -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def kernel_report(library: str) -> list[dict]:
    """Per kernel of the GPU library: its kind, cell and dtype, registers, stack and local memory (spills),
    static shared memory, and how many tensor-core (HMMA), ldmatrix (LDSM), FMA and cp.async (LDGSTS)
    instructions its SASS has."""
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump was not found (CUDA_HOME's bin, Triton's, or PATH)")
    usage = subprocess.run([tool, "-res-usage", library], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([tool, "-sass", library], capture_output=True, text=True, check=True).stdout
    counts: dict[str, dict[str, int]] = {}
    name = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            counts.setdefault(name, {"HMMA": 0, "LDSM": 0, "FFMA": 0, "DFMA": 0, "LDGSTS": 0})
        elif name is not None:
            for op in ("HMMA", "LDSM", "FFMA", "DFMA", "LDGSTS"):
                if re.search(rf"\b{op}\b", line):
                    counts[name][op] += 1
    rows = []
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage):
        fn = m.group(1)
        kind = ("forward" if "layer_forward_kernel" in fn else
                "backward" if "layer_backward_recurrent_kernel" in fn else None)
        if kind is None:
            continue
        cell = re.search(r"Li(\d)EE", fn)
        dtype = next((d for token, d in _MANGLED_DTYPES if token in fn), "?")
        rows.append(dict(kind=kind, cell=CELL_NAMES[int(cell.group(1))] if cell else "?", dtype=dtype,
                         registers=int(m.group(2)), stack=int(m.group(3)), shared=int(m.group(4)),
                         local=int(m.group(5)), **{k.lower(): v for k, v in counts.get(fn, {}).items()}))
    return sorted(rows, key=lambda r: (r["cell"], r["dtype"], r["kind"]))


def print_report(library: str) -> None:
    print(f"kernels of {library}:")
    print(f"  {'cell':9} {'dtype':5} {'kernel':8} {'regs':>4} {'stack':>5} {'local':>5} {'smem':>5} {'HMMA':>5} "
          f"{'LDSM':>5} {'FFMA':>5} {'DFMA':>5} {'cp.async':>8}")
    for r in kernel_report(library):
        print(f"  {r['cell']:9} {r['dtype']:5} {r['kind']:8} {r['registers']:4} {r['stack']:5} {r['local']:5} "
              f"{r['shared']:5} {r['hmma']:5} {r['ldsm']:5} {r['ffma']:5} {r['dfma']:5} {r['ldgsts']:8}")
    from .backends import cuda  # torch, only for the plans

    print("plans on an H100/H200 (132 multiprocessors, 227 KiB of shared memory a block):")
    for name, (cell, dtype, B, H) in cuda.ANCHORS.items():
        line, predicted = cuda.anchor_plan(cell, dtype, B, H)
        print(f"  ({name}) {cell} {str(dtype)[6:]} B={B} H={H}: {line}")
        for kind, pred in predicted.items():
            parts = " + ".join(f"{k} {pred[k]:.2f}" for k in ("load", "mma", "epilogue", "sync"))
            print(f"      {kind}: predicted {pred['us']:.2f} us/step ({parts}; a model, not measured)")
        _, clustered = cuda.anchor_plan(cell, dtype, B, H, cluster=4)
        if clustered:
            print("      with CLUSTER = 4 (a switch, off until measured): predicted " +
                  ", ".join(f"{kind} {pred['us']:.2f}" for kind, pred in clustered.items()) + " us/step")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rnnfast.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    parser.add_argument("--emulate", action="store_true", help="build the CPU emulation library instead")
    parser.add_argument("--report", action="store_true",
                        help="also print registers, shared memory, spills and tensor-core instructions per kernel of "
                             "the GPU library, and the plans for the anchors on an H100/H200")
    args = parser.parse_args(argv)
    try:
        path = build(emulate=args.emulate, verbose=args.verbose)
        if args.report and not args.emulate:
            print_report(path)
    except (RuntimeError, ValueError, OSError, subprocess.CalledProcessError) as exc:
        print(f"rnnfast.build: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
