"""A time limit on every test, so that one hung GPU kernel cannot eat a lease.

As a pytest plugin (``-p bench.watchdog --case-timeout S --journal FILE``) it arms
:func:`faulthandler.dump_traceback_later` around each test: a watchdog thread written in C, which fires even while
the main thread waits in the CUDA driver holding the GIL, prints every thread's traceback and ends the process.
Before a test starts, its id goes to the journal, and its outcome when it ends; a test the journal already shows as
started is deselected when pytest starts again. A marker ``case_timeout(seconds)`` gives one test a longer limit.

``python -m bench.watchdog [--case-timeout S] -- PYTEST_ARGS...`` runs pytest that way, and again past each test
that hung or ended the process, until every test has run or been cut off. Exit status 0 when every test passed or
skipped, else 1; the tests cut off are named at the end.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

DEFAULT_TIMEOUT_S = 60.0
_outcomes: dict[str, str] = {}
_stderr_fd: int | None = None


def read_journal(path) -> tuple[list[str], dict[str, str]]:
    """``(started, outcomes)``: the ids of the tests started, in order, and the outcome of each that ended."""
    started, outcomes = [], {}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return started, outcomes
    for line in text.splitlines():
        kind, _, rest = line.partition("\t")
        if kind == "start":
            started.append(rest)
        elif kind == "done":
            nodeid, _, outcome = rest.rpartition("\t")
            outcomes[nodeid] = outcome
    return started, outcomes


def _write(config, line: str) -> None:
    path = config.getoption("journal")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")  # closed at once: what a killed process wrote is in the file


# -- the pytest plugin --------------------------------------------------------------------------------------------

def pytest_addoption(parser):
    group = parser.getgroup("watchdog", "per-test time limit (bench.watchdog)")
    group.addoption("--case-timeout", type=float, default=None, metavar="S",
                    help="end the process when a test runs longer than S seconds (marker case_timeout overrides)")
    group.addoption("--journal", default=None, metavar="FILE",
                    help="record each test's start and outcome in FILE; tests FILE shows as started are deselected")


def pytest_configure(config):
    global _stderr_fd
    config.addinivalue_line("markers", "case_timeout(seconds): this test's own time limit under bench.watchdog")
    if _stderr_fd is None:
        # Capture is suspended while plugins are configured: fd 2 is the real stderr, where the tracebacks must go.
        _stderr_fd = os.dup(sys.stderr.fileno() if hasattr(sys.stderr, "fileno") else 2)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    path = config.getoption("journal")
    if not path:
        return
    started = set(read_journal(path)[0])
    drop = [it for it in items if it.nodeid in started]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [it for it in items if it.nodeid not in started]


@pytest.hookimpl(hookwrapper=True)  # the old style: any pytest the GPU machine may have
def pytest_runtest_protocol(item, nextitem):
    limit = item.config.getoption("case_timeout")
    marker = item.get_closest_marker("case_timeout")
    if limit is not None and marker is not None:
        limit = max(limit, float(marker.args[0]))
    _write(item.config, f"start\t{item.nodeid}")
    if limit:
        faulthandler.dump_traceback_later(limit, exit=True, file=_stderr_fd if _stderr_fd is not None else 2)
    try:
        yield
    finally:
        if limit:
            faulthandler.cancel_dump_traceback_later()
        _write(item.config, f"done\t{item.nodeid}\t{_outcomes.get(item.nodeid, 'passed')}")


def pytest_runtest_logreport(report):
    if report.failed:
        _outcomes[report.nodeid] = "failed"
    elif report.skipped and _outcomes.get(report.nodeid) != "failed":
        _outcomes[report.nodeid] = "skipped"


# -- the driver ---------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, pytest_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    ap = argparse.ArgumentParser(prog="python -m bench.watchdog", description=__doc__.split("\n\n")[0])
    ap.add_argument("--case-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                    help=f"seconds a test may take (default {DEFAULT_TIMEOUT_S:g})")
    ap.add_argument("--journal", type=Path, default=None, help="the journal file (default: a new temporary file)")
    args = ap.parse_args(ours)
    if args.journal is not None:
        return _drive(args.journal, args.case_timeout, pytest_args)
    with tempfile.TemporaryDirectory(prefix="rnnfast-watchdog-") as tmp:
        return _drive(Path(tmp) / "journal", args.case_timeout, pytest_args)


def _drive(journal: Path, case_timeout: float, pytest_args: list[str]) -> int:
    cut: list[str] = []
    rc = 0
    while True:
        cmd = [sys.executable, "-m", "pytest", "-p", "bench.watchdog", "--case-timeout", str(case_timeout),
               "--journal", str(journal), *pytest_args]
        rc = subprocess.run(cmd).returncode
        started, outcomes = read_journal(journal)
        hung = [n for n in started if n not in outcomes and n not in cut]
        if not hung:
            break
        cut += hung
        print(f"\nbench.watchdog: CUT OFF {hung[-1]}: it did not finish within its time limit (or it ended the "
              f"process; exit status {rc}); running pytest again past it", flush=True)
    started, outcomes = read_journal(journal)
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "skipped", "failed")}
    print(f"bench.watchdog: {counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed, "
          f"{len(cut)} cut off" + "".join(f"\n  cut off: {n}" for n in cut)
          + "".join(f"\n  failed: {n}" for n, o in outcomes.items() if o == "failed"), flush=True)
    if cut or counts["failed"]:
        return 1
    if rc == 5 and started:  # the last start found nothing left to run: every test had run before it
        return 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
