"""What one GPU lease needs, and the checks that it fits the device tool (shared/GPU.md).

The command line to give the device tool is the one line of ``bench/gpu_command.txt`` (the README quotes it), run
with ``timeout_s`` :data:`TIMEOUT_S`; it runs ``bench/gpu_run.sh``, whose default budget :data:`RUN_BUDGET_S`
leaves room in a 15-minute lease for the machine start and one rerun. The paths to carry are :data:`CARRY`.

``python -m bench.lease``: the command, its length and the size of what travels, against the tool's limits.
``python -m bench.lease check-out OUT``: whether the files under OUT all come back (count, size, depth, names).
``python -m bench.lease env``: the versions a result is stamped with, for the run's log.
``python -m bench.lease install-check``: what the offline install needs (the dry run's install phase).
``python -m bench.lease imports``: where rnnfast is imported from and which backends loaded, with the reasons.

Nothing here imports torch, except ``env`` and ``imports``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND_FILE = REPO / "bench" / "gpu_command.txt"
# The device tool's limits.
MAX_COMMAND_CHARS = 2000
MAX_TRAVEL_BYTES = 64 << 20
MAX_OUT_FILES = 8
MAX_OUT_FILE_BYTES = 16 << 20
MAX_OUT_DEPTH = 2  # folders below OUT
COMMAND_LIMIT_S = 600
LEASE_S = 900
# gpu_run.sh's default budget, and the timeout_s to give the tool: the budget plus the last phase's kill delay and
# the results phase, well under the 600 s a command may take.
RUN_BUDGET_S = 480
TIMEOUT_S = 540
# Ignored paths to carry with the working tree: the GPU library, free of torch, built here before the call with
# `RNNFAST_BUILD_DIR=build/cuda RNNFAST_CUDA_ARCHS=9.0 python -m rnnfast.build` (its folder is named by a hash of
# the sources and flags, so gpu_run.sh's cuda phase finds it current there and builds nothing; without it, the
# phase builds it, about a minute).
CARRY: tuple[str, ...] = ("build/cuda",)
INSTALL = "python3 -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e ."
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def command() -> str:
    """The command line to give the device tool."""
    lines = [line for line in COMMAND_FILE.read_text().splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"{COMMAND_FILE} must hold exactly one command line, found {len(lines)}")
    return lines[0].strip()


def travelling_files(repo: Path = REPO, carry=CARRY) -> list[Path]:
    """The files that travel to the device: tracked, untracked but not ignored, and everything under ``carry``."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True).stdout
    files = {repo / name for name in out.decode().split("\0") if name}
    for path in carry:
        p = repo / path
        files |= {f for f in p.rglob("*") if f.is_file()} if p.is_dir() else ({p} if p.is_file() else set())
    return sorted(f for f in files if f.is_file() and not f.is_symlink())  # a tracked file deleted here does not


def travelling_bytes(repo: Path = REPO, carry=CARRY) -> int:
    return sum(f.stat().st_size for f in travelling_files(repo, carry))


def out_problems(out: Path) -> list[str]:
    """Why some file under ``out`` would not come back from the device (empty when all of them do)."""
    out = Path(out)
    problems, files = [], []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            problems.append(f"{rel}: not a plain file or folder")
        elif p.is_file():
            files.append(p)
            if len(rel.parts) - 1 > MAX_OUT_DEPTH:
                problems.append(f"{rel}: more than {MAX_OUT_DEPTH} folders down")
            if p.stat().st_size > MAX_OUT_FILE_BYTES:
                problems.append(f"{rel}: {p.stat().st_size} bytes, over {MAX_OUT_FILE_BYTES}")
        if not all(_NAME.match(part) for part in rel.parts):
            problems.append(f"{rel}: a name with characters the device tool does not return")
    if len(files) > MAX_OUT_FILES:
        problems.append(f"{len(files)} files, over the {MAX_OUT_FILES} that come back")
    return problems


# -- subcommands --------------------------------------------------------------------------------------------------

def _report() -> int:
    cmd = command()
    size = travelling_bytes()
    print(f"command ({len(cmd)} of {MAX_COMMAND_CHARS} characters), timeout_s {TIMEOUT_S}:\n  {cmd}")
    print(f"carry: {', '.join(CARRY) or 'nothing'}")
    print(f"travels: {size / 2 ** 20:.2f} MiB of {MAX_TRAVEL_BYTES >> 20} MiB")
    bad = len(cmd) > MAX_COMMAND_CHARS or size > MAX_TRAVEL_BYTES
    if bad:
        print("does NOT fit the device tool")
    return 1 if bad else 0


def _check_out(out: Path) -> int:
    files = sorted(p for p in Path(out).rglob("*") if p.is_file())
    for p in files:
        print(f"  {p.relative_to(out)}  {p.stat().st_size} bytes")
    problems = out_problems(out)
    print(f"{len(files)} files of at most {MAX_OUT_FILES} under {out}" + ("" if problems else ": all come back"))
    for msg in problems:
        print(f"  PROBLEM: {msg}")
    return 1 if problems else 0


def _run(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{cmd[0]}: {type(exc).__name__}"
    return (proc.stdout or proc.stderr).strip()


def _env() -> int:
    import platform

    print(f"python {platform.python_version()} ({sys.executable}), {os.cpu_count()} CPUs")
    print(_run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv"]))
    nvcc = shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda") / "bin" / "nvcc")
    print((_run([nvcc, "--version"]).splitlines() or ["?"])[-1] if os.path.exists(nvcc) else "nvcc: not found")
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    print(f"compute-sanitizer: {sanitizer if os.path.exists(sanitizer) else 'not found'}")
    free = shutil.disk_usage(REPO).free
    print(f"disk free: {free / 2 ** 30:.1f} GiB")
    import torch

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"gpu {p.name}, sm {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2 ** 30:.0f} GiB")
    else:
        print("gpu: none (torch.cuda.is_available() is False)")
    for mod in ("triton", "numpy", "pytest", "pytest_benchmark", "matplotlib", "tqdm", "ninja", "setuptools", "pip",
                "packaging"):
        try:
            m = __import__(mod)
            print(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError:
            print(f"{mod}: not installed")
    return 0


def _install_check() -> int:
    """The pieces the offline editable install uses, without installing (no network, nothing written)."""
    print(f"the lease runs: {INSTALL}")
    problems = []
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True)
    print(pip.stdout.strip() or pip.stderr.strip())
    if pip.returncode != 0:
        problems.append("pip is missing")
    try:
        import setuptools
        from packaging.version import Version

        print(f"setuptools {setuptools.__version__} (the build backend; --no-build-isolation uses this one)")
        if Version(setuptools.__version__) < Version("64"):
            problems.append(f"setuptools {setuptools.__version__} is older than 64 (editable installs)")
        elif Version(setuptools.__version__) < Version("70.1"):  # bdist_wheel moved into setuptools in 70.1
            try:
                import wheel  # noqa: F401
            except ImportError:
                problems.append(f"setuptools {setuptools.__version__} builds wheels with the wheel package, "
                                "which is not installed")
    except ImportError as exc:
        problems.append(f"cannot import the build backend: {exc}")
    if not (REPO / "pyproject.toml").is_file():
        problems.append("no pyproject.toml")
    for msg in problems:
        print(f"PROBLEM: {msg}")
    return 1 if problems else 0


def _imports() -> int:
    import rnnfast
    from rnnfast import backends

    print(f"rnnfast {rnnfast.__version__} from {Path(rnnfast.__file__).parent}")
    names = getattr(backends, "BACKENDS", None) or getattr(backends, "AUTO_ORDER", ())
    missing = 0
    for name in names:
        try:
            be = backends.get(name)
        except backends.BackendUnavailableError as exc:
            print(f"  {name}: not loaded: {exc}")
            missing += name in getattr(backends, "KERNEL_BACKENDS", ("triton", "cuda"))
        else:
            print(f"  {name}: loaded" + (f", modes {', '.join(be.modes)}" if be.modes else ""))
    return 1 if missing else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lease", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what")
    check = sub.add_parser("check-out", help="whether every file under OUT comes back from the device")
    check.add_argument("out", type=Path)
    sub.add_parser("env", help="versions, for the log")
    sub.add_parser("install-check", help="what the offline install needs, without installing")
    sub.add_parser("imports", help="where rnnfast comes from and which backends loaded")
    args = ap.parse_args(argv)
    if args.what == "check-out":
        return _check_out(args.out)
    if args.what == "env":
        return _env()
    if args.what == "install-check":
        return _install_check()
    if args.what == "imports":
        return _imports()
    return _report()


if __name__ == "__main__":
    sys.exit(main())
