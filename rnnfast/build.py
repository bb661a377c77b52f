"""Build the CUDA C++ extension in ``csrc/`` (JIT, ninja, cached) and say where it is.

``python -m rnnfast.build`` builds ahead of time and prints the path of the shared library; otherwise the
``cuda`` backend builds on first use. Every build setting is read here, and only here:

- ``RNNFAST_CUDA_ARCHS``: compute capabilities to compile for, e.g. ``"80;90"`` or ``"8.0 9.0"`` (default: the
  GPUs found plus 8.0 and 9.0; PTX of the highest is embedded too, for newer GPUs).
- ``RNNFAST_BUILD_DIR``: where builds are cached (default ``$XDG_CACHE_HOME/rnnfast`` or ``~/.cache/rnnfast``);
  each torch / CUDA / Python / architecture combination gets its own subdirectory.
- ``CUDA_HOME`` (or ``CUDA_PATH``): the CUDA toolkit; default ``/usr/local/cuda``, else the ``nvcc`` on ``PATH``.

``torch.utils.cpp_extension.load`` drives ninja, which rebuilds when a source, a header or a flag changed, and
it holds a lock file in the build directory while it builds, so two processes building at once take turns and
the second loads what the first built.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from packaging import version

ENV_ARCHS = "RNNFAST_CUDA_ARCHS"
ENV_BUILD_DIR = "RNNFAST_BUILD_DIR"
EXTENSION_NAME = "rnnfast_cuda"
SOURCES = ("ops.cpp", "rnn_tanh.cu", "rnn_relu.cu", "gru.cu", "lstm.cu", "barrier.cu")
HEADERS = ("rnnfast.h", "layer.cuh")
# The kernels use cooperative grid barriers and bfloat16, and are only tuned for Ampere and newer.
MIN_ARCH = 80
DEFAULT_ARCHS = (80, 90)
# sm_90 needs CUDA 11.8; the GPU machine has 13.0.
MIN_CUDA = version.Version("11.8")


def source_dir() -> Path:
    """``csrc/`` next to the package: present in a source checkout and an editable install."""
    return Path(__file__).resolve().parent.parent / "csrc"


def sources_problem() -> str | None:
    missing = [name for name in SOURCES + HEADERS if not (source_dir() / name).is_file()]
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


def toolchain_problem() -> str | None:
    """None when the extension can be built (or is built) here, else the reason it cannot."""
    problem = sources_problem()
    if problem:
        return problem
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) was built without CUDA"
    home = cuda_home()
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        return "nvcc was not found: install the CUDA toolkit and set CUDA_HOME (e.g. CUDA_HOME=/usr/local/cuda)"
    found = nvcc_version(home)
    if found is None:
        return f"{Path(home) / 'bin' / 'nvcc'} --version did not say its release"
    if found < MIN_CUDA:
        return f"nvcc {found} is too old; the kernels need CUDA {MIN_CUDA} or newer"
    if version.Version(torch.version.cuda).major != found.major:
        return (f"nvcc {found} (CUDA_HOME={home}) does not match the CUDA {torch.version.cuda} this torch was "
                "built with; point CUDA_HOME at a matching toolkit")
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary next to the interpreter)
        except ImportError:
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
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            if major * 10 + minor >= MIN_ARCH:
                found.add(major * 10 + minor)
    return sorted(found)


def nvcc_flags(archs: list[int]) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # PTX of the highest architecture, which the driver compiles for GPUs newer than any listed.
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags + ["-O3", "-lineinfo"]


def build_dir(archs: list[int]) -> Path:
    base = os.environ.get(ENV_BUILD_DIR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "rnnfast")
    key = (f"torch{torch.__version__}-cuda{torch.version.cuda}-py{sys.version_info.major}{sys.version_info.minor}"
           f"-sm{'_'.join(map(str, archs))}"
           # Two checkouts must not share (and relink under each other) one build folder.
           f"-src{hashlib.sha1(str(source_dir()).encode()).hexdigest()[:8]}")
    return Path(base) / re.sub(r"[^A-Za-z0-9._-]", "_", key)


def _include_paths() -> list[str]:
    # ATen's CUDAContext.h includes the cuBLAS/cuSPARSE headers, which torch's pip wheels ship in nvidia/cu*/include.
    site = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    return [str(p) for p in sorted(site.glob("cu[0-9]*/include")) if p.is_dir()]


_loaded_path: str | None = None


def load(verbose: bool = False) -> str:
    """Build (if needed) and load the extension; returns the shared library's path. Raises RuntimeError saying
    why when it cannot be built. Loads at most once per process: a second library registering the same ops (say,
    built for other architectures) would abort the process."""
    global _loaded_path
    if _loaded_path is not None:
        return _loaded_path
    problem = toolchain_problem()
    if problem:
        raise RuntimeError(f"cannot build the rnnfast CUDA extension: {problem}")
    home = cuda_home()
    os.environ.setdefault("CUDA_HOME", home)
    from torch.utils import cpp_extension

    # cpp_extension reads CUDA_HOME once, at its import; it may have been imported earlier with a worse guess.
    cpp_extension.CUDA_HOME = home
    archs = target_archs()
    directory = build_dir(archs)
    directory.mkdir(parents=True, exist_ok=True)
    src = source_dir()
    path = cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(src / name) for name in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=nvcc_flags(archs),
        extra_include_paths=[str(src)] + _include_paths(),
        build_directory=str(directory),
        with_cuda=True,
        is_python_module=False,
        verbose=verbose,
    )
    if not isinstance(path, str):  # older torch returns None here; the library is the newest build of the name
        path = max(directory.glob(f"{EXTENSION_NAME}*.so"), key=lambda p: p.stat().st_mtime)
    _loaded_path = str(path)
    return _loaded_path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rnnfast.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    try:
        path = load(verbose=args.verbose)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"rnnfast.build: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
